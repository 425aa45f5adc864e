"""One DPM-Solver++(2M) step (eps-prediction model, second-order multistep update), timed
four ways side by side in one run:

  * fastdiff: one ``fastdiff::sampler_step`` call with the step's coefficient row, as
    ``fastdiff.Sampler.step`` makes it (a sampler computes every step's coefficients once
    per run, on the host in float64; the "coeffs" column is what building one step's
    row on the fly would add: scalars -> ``StepCoeffs`` -> float32 tensor);
  * fastdiff in place: ``sampler_step.out`` writing x_next over x and x0 over x0_prev,
    as ``fastdiff.sample`` (``Sampler.step(..., donate=True)``) does: the same bytes,
    but every store hits a line the step has just read, so no memory is fetched to be
    overwritten (the inputs are restored, untimed, before each timed call);
  * diffusers: ``DPMSolverMultistepScheduler.step`` (set_timesteps(20), one step taken so
    that it is in second-order mode; each timed call restores that state first);
  * eager: the same update as plain torch ops;
  * compile: ``torch.compile`` of that eager function (coefficients passed as Python
    floats, which dynamo keeps dynamic, so a real loop would not recompile), and of its
    in-place form (results copied into x and x0_prev; inductor fuses that into its loop).

Reports medians (after warm-up; the candidates are timed round-robin, so a change of
machine load mid-run hits all alike; warm caches, or cold with --cold), speed-ups, and
the fused step's byte rate (3 tensors read + 2 written) against a plain
``Tensor.copy_`` moving the same number of bytes, measured in the same run. Outputs are
checked against diffusers before timing.
On a machine shared with other busy processes, multi-threaded timings are dominated by
OpenMP threads waiting for a core (medians in multiples of the 4 ms scheduler tick);
``--threads 1`` then gives the meaningful comparison.

On a GPU (``--device cuda``) the same columns are timed with CUDA events, and the Triton
kernel of the step (``fastdiff.triton``, compiled for the device) gets columns of its own
next to the CUDA kernel; %copy is then against the device's own copy bandwidth.

    python benchmarks/bench_step.py [--quick] [--json PATH] [--no-compile] [--threads N]
                                    [--cold] [--dtypes fp32,bf16,fp16] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from fastdiff._ops import resolve
from fastdiff.step import StepCoeffs

SHAPES = [(1, 4, 64, 64), (8, 4, 64, 64), (16, 4, 128, 128), (4, 4, 512, 512)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUICK = [((1, 4, 64, 64), "fp32"), ((16, 4, 128, 128), "fp32"), ((4, 4, 512, 512), "fp32")]


_SCRATCH = {}


def flush_caches(device="cpu"):
    """Write 64 MiB on the CPU (twice the last-level cache here) or 512 MiB on a GPU (several
    times an H100/H200's L2): the next call starts cold."""
    dev = torch.device(device)
    if dev.type not in _SCRATCH:
        _SCRATCH[dev.type] = torch.zeros((16 if dev.type == "cpu" else 128) << 20, device=dev)
    _SCRATCH[dev.type].add_(1.0)


def race(fns, cold=False, min_time=1.0, min_rounds=15, max_rounds=2000, warmup=3, device="cpu"):
    """Seconds per call of each fn in ``fns`` (a dict) as (median, min).

    Round-robin (every round times each fn once, so a change in machine load mid-run hits
    all alike). Warm (default): each timed call directly follows an untimed call of the
    same fn, so every candidate is timed in its own steady state (inputs in cache as far
    as they fit). ``cold``: each timed call follows flush_caches() instead, as a sampler
    step follows the model's forward pass. A value may be a pair (prepare, fn): prepare()
    runs untimed before each timed fn() instead (an in-place fn restores its inputs).
    On a GPU each call is timed by a pair of CUDA events on the current stream (what the
    device spends between them, launch gaps included), read once per round.
    """
    on_gpu = torch.device(device).type == "cuda"
    pairs = {k: v if isinstance(v, tuple) else (v, v) for k, v in fns.items()}
    for prep, fn in pairs.values():
        for _ in range(warmup):
            prep()
            fn()
    times = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < min_time):
        events = []
        for k, (prep, fn) in pairs.items():
            if not cold or prep is not fn:
                prep()
            if cold:
                flush_caches(device)
            if on_gpu:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                events.append((k, e0, e1))
            else:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        if on_gpu:
            torch.cuda.synchronize()
            for k, e0, e1 in events:
                times[k].append(e0.elapsed_time(e1) * 1e-3)
        rounds += 1
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def alpha_sigma(sig):
    """diffusers' sigma parametrisation -> (alpha_t, sigma_t) of the VP process."""
    alpha = 1.0 / math.sqrt(sig * sig + 1.0)
    return alpha, sig * alpha


def dpmpp_2m_scalars(sig_t, sig_s0, sig_s1):
    """Scalars of DPM-Solver++(2M), midpoint form (diffusers' second-order update):

        x0   = (x - sigma_s0 eps) / alpha_s0
        x_t  = (sigma_t / sigma_s0) x + A (1 + 1/(2 r0)) x0 - A/(2 r0) x0_prev,
        A    = -alpha_t (exp(-h) - 1),  h = lambda_t - lambda_s0,  r0 = h_0 / h.
    Returns (p_x, p_m, c_x, c_d, c_h) with x0 = p_x x + p_m eps, x_t = c_x x + c_d x0 + c_h x0_prev.
    """
    (a_t, s_t), (a_s0, s_s0), (a_s1, s_s1) = map(alpha_sigma, (sig_t, sig_s0, sig_s1))
    lam_t, lam_s0, lam_s1 = (math.log(a / s) for a, s in ((a_t, s_t), (a_s0, s_s0), (a_s1, s_s1)))
    h, h0 = lam_t - lam_s0, lam_s0 - lam_s1
    r0 = h0 / h
    A = -a_t * math.expm1(-h)
    return 1.0 / a_s0, -s_s0 / a_s0, s_t / s_s0, A * (1.0 + 0.5 / r0), -0.5 * A / r0


def make_coeffs(sigmas, device="cpu"):
    """What a sampler does on the host each step: float64 scalars -> the coeffs tensor."""
    p_x, p_m, c_x, c_d, c_h = dpmpp_2m_scalars(*sigmas)
    c = StepCoeffs(1, n_out=2, n_history=1)
    c.convert(p_x=p_x, p_m=p_m, w_x=p_x, w_m=p_m)  # d = x0
    c.out(0, x=c_x, d=c_d, h=[c_h])               # x_next
    c.out(1, d=1.0)                                # x0, the next step's history
    return c.tensor(device=device)


def eager_update(x, eps, x0_prev, p_x: float, p_m: float, c_x: float, c_d: float, c_h: float):
    x0 = p_x * x + p_m * eps
    return c_x * x + c_d * x0 + c_h * x0_prev, x0


def eager_update_(x, eps, x0_prev, p_x: float, p_m: float, c_x: float, c_d: float, c_h: float):
    """The same update written into x (x_next) and x0_prev (x0)."""
    x_next, x0 = eager_update(x, eps, x0_prev, p_x, p_m, c_x, c_d, c_h)
    x.copy_(x_next)
    x0_prev.copy_(x0)


def bench_one(shape, dtype_name, use_compile, compiled, cold=False, device="cpu"):
    from diffusers import DPMSolverMultistepScheduler

    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(0)
    x0_in = torch.randn(shape, generator=gen).to(device, dtype)
    eps0 = torch.randn(shape, generator=gen).to(device, dtype)
    eps1 = torch.randn(shape, generator=gen).to(device, dtype)

    sched = DPMSolverMultistepScheduler()  # dpmsolver++, order 2, midpoint, eps-prediction
    sched.set_timesteps(20, device=device)
    x1 = sched.step(eps0, sched.timesteps[0], x0_in).prev_sample  # first-order warm-up step
    saved_outputs = list(sched.model_outputs)
    x0_prev = saved_outputs[-1]
    t1 = sched.timesteps[1]
    sig = sched.sigmas.double()
    sigmas = (float(sig[2]), float(sig[1]), float(sig[0]))  # sigma_t, sigma_s0, sigma_s1

    def diffusers_step():
        sched.model_outputs = list(saved_outputs)
        sched.lower_order_nums = 1
        sched._step_index = 1
        return sched.step(eps1, t1, x1).prev_sample

    scal = dpmpp_2m_scalars(*sigmas)
    ct = make_coeffs(sigmas, device)
    step_op = resolve("sampler_step", x1.device)  # what Sampler.step calls
    step_out = resolve("sampler_step.out", x1.device)
    xi, hi = x1.clone(), x0_prev.clone()  # the in-place candidates' state and history

    def fused():
        return step_op(x1, None, eps1, None, [x0_prev], None, ct, False, 2)

    def restore():
        xi.copy_(x1)
        hi.copy_(x0_prev)

    def fused_():
        step_out(xi, None, eps1, None, [hi], None, ct, False, out=[xi, hi])

    def coeffs_only():
        return make_coeffs(sigmas, device)

    def eager():
        return eager_update(x1, eps1, x0_prev, *scal)

    # Correctness first: against diffusers (x_next and the stored x0 estimate).
    ref = diffusers_step()
    ref_x0 = sched.model_outputs[-1]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    xf, x0f = fused()
    torch.testing.assert_close(xf.float(), ref.float(), **tol)
    torch.testing.assert_close(x0f.float(), ref_x0.float(), **tol)
    restore()
    fused_()
    assert torch.equal(xi, xf) and torch.equal(hi, x0f)  # in place: the same bits
    # The eager update rounds every intermediate to the sample dtype: looser for bf16/fp16.
    tol_eager = tol if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-1)
    torch.testing.assert_close(eager()[0].float(), ref.float(), **tol_eager)

    nbytes = 5 * x1.numel() * x1.element_size()  # x, eps, x0_prev read; x_next, x0 written
    src = torch.randn(nbytes // 2 // 4, device=device)
    dst = torch.empty_like(src)
    fns = {"diffusers": diffusers_step, "eager": eager, "fastdiff": fused,
           "fastdiff_inplace": (restore, fused_), "coeffs": coeffs_only,
           "copy": lambda: dst.copy_(src)}
    res = {"shape": list(shape), "dtype": dtype_name, "threads": torch.get_num_threads(),
           "device": str(device)}
    if torch.device(device).type == "cuda":
        # The Triton kernel next to the CUDA kernel, on the same inputs.
        from fastdiff._ops import triton_fn
        tri, tri_out = triton_fn("sampler_step"), triton_fn("sampler_step.out")
        xt, x0t = tri(x1, None, eps1, None, [x0_prev], None, ct, False, 2)
        torch.testing.assert_close(xt.float(), xf.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0t.float(), x0f.float(), rtol=1e-5, atol=1e-5)
        fns["triton"] = lambda: tri(x1, None, eps1, None, [x0_prev], None, ct, False, 2)
        fns["triton_inplace"] = (restore, lambda: tri_out(xi, None, eps1, None, [hi], None, ct,
                                                           False, out=[xi, hi]))
    if use_compile:
        if dtype_name not in compiled:
            compiled[dtype_name] = (torch.compile(eager_update, fullgraph=True),
                                    torch.compile(eager_update_, fullgraph=True))
        fn, fn_ = compiled[dtype_name]
        t0 = time.perf_counter()
        torch.testing.assert_close(fn(x1, eps1, x0_prev, *scal)[0].float(), ref.float(),
                                   **tol_eager)
        res["compile_first_call_s"] = time.perf_counter() - t0
        restore()
        fn_(xi, eps1, hi, *scal)
        torch.testing.assert_close(xi.float(), ref.float(), **tol_eager)
        fns["compile"] = lambda: fn(x1, eps1, x0_prev, *scal)
        fns["compile_inplace"] = (restore, lambda: fn_(xi, eps1, hi, *scal))
    for k, (med, best) in race(fns, cold=cold, device=device).items():
        res[f"{k}_s"] = med
        res[f"{k}_min_s"] = best
    res["bytes"] = nbytes
    for k in ("fastdiff", "fastdiff_inplace", "copy", "triton", "triton_inplace"):
        if f"{k}_s" in res:
            res[f"{k}_GBps"] = nbytes / res[f"{k}_s"] / 1e9
    return res


def print_table(rows):
    head = (f"{'':42}{'new tensors (Sampler.step)':^33} | {'in place (fastdiff.sample)':^33} |\n"
            f"{'shape':>17} {'dtype':>5} {'diffusers':>9} {'eager':>7} {'compile':>8} "
            f"{'fastdiff':>8} {'x diff':>7} {'x comp':>7} | {'compile':>8} {'fastdiff':>8} "
            f"{'x diff':>7} {'x comp':>7} | {'coeffs':>6} {'GB/s':>5} {'copy':>5} {'%copy':>5}")
    print(head)
    print("-" * len(head.splitlines()[-1]))
    for r in rows:
        ms = lambda k: f"{r[k] * 1e3:.3f}" if k in r else "-"  # noqa: E731
        ratio = lambda a, b: f"{r[a] / r[b]:.1f}" if a in r else "-"  # noqa: E731
        print(f"{str(tuple(r['shape'])):>17} {r['dtype']:>5} {ms('diffusers_s'):>9} "
              f"{ms('eager_s'):>7} {ms('compile_s'):>8} {ms('fastdiff_s'):>8} "
              f"{ratio('diffusers_s', 'fastdiff_s'):>7} {ratio('compile_s', 'fastdiff_s'):>7} | "
              f"{ms('compile_inplace_s'):>8} {ms('fastdiff_inplace_s'):>8} "
              f"{ratio('diffusers_s', 'fastdiff_inplace_s'):>7} "
              f"{ratio('compile_inplace_s', 'fastdiff_inplace_s'):>7} | "
              f"{r['coeffs_s'] * 1e3:>6.3f} {r['fastdiff_GBps']:>5.1f} {r['copy_GBps']:>5.1f} "
              f"{100 * r['fastdiff_GBps'] / r['copy_GBps']:>4.0f}%")
    print("Medians in ms. fastdiff: the fused step with the step's precomputed coefficient "
          "row, into new tensors (as Sampler.step)\nor in place (as fastdiff.sample); 'x diff' "
          "/ 'x comp': its speed-up over diffusers' step / over torch.compile of the same\n"
          "update (new tensors, or in place). coeffs: building one row on the fly (scalars + "
          "StepCoeffs + tensor). GB/s: (3 reads +\n2 writes) / fastdiff's new-tensor time; "
          "copy: Tensor.copy_ on the same bytes; %copy: fastdiff's byte rate as % of copy's.")
    tri = [r for r in rows if "triton_s" in r]
    if tri:
        print(f"\n{'shape':>17} {'dtype':>5} {'CUDA':>8} {'Triton':>8} {'T/C':>5} {'CUDA ip':>8} "
              f"{'Triton ip':>9} {'CUDA %copy':>10} {'Triton %copy':>12}")
        for r in tri:
            print(f"{str(tuple(r['shape'])):>17} {r['dtype']:>5} {r['fastdiff_s'] * 1e3:>8.4f} "
                  f"{r['triton_s'] * 1e3:>8.4f} {r['triton_s'] / r['fastdiff_s']:>5.2f} "
                  f"{r['fastdiff_inplace_s'] * 1e3:>8.4f} {r['triton_inplace_s'] * 1e3:>9.4f} "
                  f"{100 * r['fastdiff_GBps'] / r['copy_GBps']:>9.0f}% "
                  f"{100 * r['triton_GBps'] / r['copy_GBps']:>11.0f}%")
        print("CUDA: fastdiff's CUDA kernel; Triton: its Triton kernel (ip: in place); T/C: Triton "
              "time / CUDA time; %copy: against the device's copy of the same bytes.")


def write_json(path, payload):
    from fastdiff._files import atomic_write_text
    atomic_write_text(json.dumps(payload, indent=2), path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fp32 at three shapes only")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--cold", action="store_true",
                    help="flush the caches before every timed call (default: warm)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice, one per core)")
    ap.add_argument("--dtypes", default=",".join(DTYPES),
                    help=f"comma-separated sample dtypes (default: {','.join(DTYPES)})")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: CUDA events, Triton columns)")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        ap.error(f"--dtypes: expected names among {', '.join(DTYPES)}, got {args.dtypes!r}")

    import fastdiff
    info = fastdiff.backends()
    kernels = info["cuda_kernels"] if torch.device(args.device).type == "cuda" else info["cpu_kernels"]
    if not kernels:
        print(f"warning: fastdiff's compiled kernels for {args.device} are not loaded "
              f"({info['load_error']}); timing the reference", file=sys.stderr)
    load0 = os.getloadavg()[0]
    configs = QUICK if args.quick else [(s, d) for d in dtypes for s in SHAPES]
    compiled = {}
    rows = []
    with torch.inference_mode():
        for shape, dname in configs:
            rows.append(bench_one(shape, dname, not args.no_compile, compiled, args.cold, args.device))
            print(f"done {shape} {dname}", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cold' if args.cold else 'warm'} caches, load average "
          f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (all processes on this machine)")
    print_table(rows)
    if args.json:
        write_json(args.json, {"benchmark": "dpmpp_2m_step", "torch": torch.__version__,
                               "device": where,
                               "threads": torch.get_num_threads(), "cold": args.cold,
                               "load_average": [load0, os.getloadavg()[0]], "results": rows})


if __name__ == "__main__":
    main()
