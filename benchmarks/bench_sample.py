"""Sampler overhead: a whole sampling loop, fastdiff's fused samplers vs diffusers' schedulers.

With a cheap model (a 1x1 convolution) the loop's cost outside the model call is what a
sampler adds per step: diffusers' scheduler math (many small tensor ops, host scalars)
versus one fused kernel pass with precomputed coefficients. Three loops run the same
model on the same noise:

  * diffusers: ``scheduler.step`` in the usual pipeline loop;
  * Sampler.step: the same hand-written loop with ``fastdiff.Sampler`` (each step returns
    a new tensor, as diffusers' does; the sampler's history is updated in place);
  * fastdiff.sample: fastdiff's own loop (``fastdiff.sample(model, x_T=..., sampler=<the
    prebuilt Sampler>)``), which also updates its state in place (``donate=True``).

The table reports the median time per step outside the model call (loop time minus the
time spent inside model calls, minus the one-off set-up: ``set_timesteps(device=)`` /
building the Sampler and ``Sampler.prepare(device, dtype, batch)``), the speed-ups over diffusers, two floors for it (the run's fused passes
alone on prepared tensors, caches warm; and the "loop floor": the same model calls each
followed by only the fused op on prepared tensors, no sampler object, so the model
evicts the step's tensors from cache as in any real loop), the bytes one fused step
reads and writes, and the max abs difference of the final samples to diffusers' (a
parity check, not a timing). On CPU with one thread (the default) times are the thread's
CPU time, so that other processes on a shared machine do not count.

    python benchmarks/bench_sample.py                    # (8, 4, 64, 64), 20 steps, CPU
    python benchmarks/bench_sample.py --device cuda --json out/bench_sample.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import diffusers
import fastdiff
from fastdiff._files import atomic_write_text
from fastdiff.samplers import Sampler

SCHEDULERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # flow matching, the SD3 / Flux default (SD3's shift; no init_noise_sigma / scale_model_input)
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
}


class TimedModel:
    """Wraps the model; accumulates the wall time spent inside its calls (device-synced)."""

    def __init__(self, model, device):
        self.model, self.device, self.seconds, self.calls = model, device, 0.0, 0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, x, t):
        self._sync()
        start = _now()
        out = self.model(x, t)
        self._sync()
        self.seconds += _now() - start
        self.calls += 1
        return out


def diffusers_run(sched, steps, model, x_T):
    start = _now()
    sched.set_timesteps(steps, device=x_T.device)
    setup = _now() - start
    x = x_T * getattr(sched, "init_noise_sigma", 1.0)
    scale = getattr(sched, "scale_model_input", None)  # flow matching has none
    for t in sched.timesteps:
        x = sched.step(model(x if scale is None else scale(x, t), t), t, x).prev_sample
    return x, setup


def fastdiff_run(sched, steps, model, x_T):
    start = _now()
    s = Sampler.from_diffusers(sched, steps).prepare(x_T.device, x_T.dtype, x_T.shape[0])
    setup = _now() - start
    x = s.init_noise(x_T)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), None, x)
    return x, setup


def sample_run(sched, steps, model, x_T):
    start = _now()
    s = Sampler.from_diffusers(sched, steps).prepare(x_T.device, x_T.dtype, x_T.shape[0])
    setup = _now() - start
    return fastdiff.sample(model, x_T=x_T, sampler=s, progress=False), setup


def timed(run, sched, steps, model, x_T, device, repeats, warmup):
    """Median seconds per model call outside the model, median setup seconds, final x."""
    outside, setups, x = [], [], None
    for i in range(warmup + repeats):
        tm = TimedModel(model, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = _now()
        x, setup = run(sched, steps, tm, x_T)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = _now() - start
        if i >= warmup:
            outside.append((total - tm.seconds - setup) / tm.calls)
            setups.append(setup)
    return statistics.median(outside), statistics.median(setups), x


def _prepared(sampler: Sampler, x_T):
    """Every call's fused op with prepared tensors (history, noise, outputs; the state x
    updated in place, the next model input into its own buffer, as fastdiff.sample
    does): (op, x, per-call arguments, model input)."""
    from fastdiff import _ops
    op_out = _ops.resolve("sampler_step.out", x_T.device)
    coeffs = sampler._table(x_T.device, x_T.dtype)["coeffs"]
    pool = [torch.randn_like(x_T) for _ in range(8)]
    x, x_in, z = x_T.clone(), torch.randn_like(x_T), torch.randn_like(x_T)
    args = []
    for k, call in enumerate(sampler.plan.calls):
        op = call.op
        h = len(op.history)
        outs = [x] + pool[h + 1:h + len(op.outputs)]
        if "x_in" in op.outputs:
            outs[op.outputs.index("x_in")] = x_in
        args.append((pool[h] if op.x_base is not None else None, pool[:h], z if op.noise else None,
                     coeffs[k], op.clamp, outs))
    return op_out, x, args, x_in


def kernel_alone(sampler: Sampler, x_T, repeats: int) -> float:
    """Median seconds per call of the run's fused passes alone on prepared tensors
    (:func:`_prepared`), with no model and no loop around them (caches stay warm)."""
    op_out, x, args, _ = _prepared(sampler, x_T)
    m = torch.randn_like(x_T)
    times = []
    for _ in range(repeats + 1):
        x.copy_(x_T)
        _sync(x_T.device)
        start = _now()
        for xb, hist, z, c, clamp, outs in args:
            op_out(x, xb, m, None, hist, z, c, clamp, out=outs)
        _sync(x_T.device)
        times.append((_now() - start) / len(args))
    return statistics.median(times[1:])


def floor_run(sched, steps, model, x_T):
    """The loop floor: the same model calls, each followed by its fused pass on prepared
    tensors, with no sampler object in between: the op called from Python through
    ``torch.ops``, as a hand-made loop would (the model evicts the step's tensors from
    cache, as in any real loop). fastdiff's prepared step enters C++ once and skips the
    dispatcher's Python and autograd layers, so it can come in below this."""
    start = _now()
    s = Sampler.from_diffusers(sched, steps).prepare(x_T.device, x_T.dtype, x_T.shape[0])
    op_out, x, args, x_in = _prepared(s, s.init_noise(x_T))
    t = s.timesteps
    setup = _now() - start
    for k, (xb, hist, z, c, clamp, outs) in enumerate(args):
        op_out(x, xb, model(x_in, t[k]), None, hist, z, c, clamp, out=outs)
    return x, setup


def _now():
    """The benchmark's clock (set in main): wall time, or on CPU with one thread the
    thread's CPU time, so that other processes on a shared machine do not count."""
    return _CLOCK[0]()


_CLOCK = [time.perf_counter]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fused_bytes(sampler: Sampler, numel: int, itemsize: int) -> float:
    """Mean bytes one fused step reads and writes (x, model output, history, x_base,
    noise in; its outputs out)."""
    total = 0
    for call in sampler.plan.calls:
        op = call.op
        tensors_in = 2 + len(op.history) + (op.x_base is not None) + op.noise
        total += (tensors_in + len(op.outputs)) * numel * itemsize
    return total / len(sampler.plan.calls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8,4,64,64", help="sample shape B,C,H,W")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--samplers", default=",".join(SCHEDULERS), help="comma-separated subset of "
                   + ", ".join(SCHEDULERS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="cpu: the thread's CPU time (one thread on CPU only); auto: cpu on CPU with "
                        "one thread, else wall")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and args.device == "cpu" and args.threads == 1)
    if cpu_clock and (args.device != "cpu" or args.threads != 1):
        p.error("--clock cpu measures one thread's CPU time: it needs --device cpu --threads 1")
    _CLOCK[0] = time.thread_time if cpu_clock else time.perf_counter
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    shape = tuple(int(v) for v in args.shape.split(","))
    names = [n.strip() for n in args.samplers.split(",") if n.strip()]
    for n in names:
        if n not in SCHEDULERS:
            p.error(f"unknown sampler {n!r}; choose from {', '.join(SCHEDULERS)}")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], shape[1], 1).to(device, dtype).eval()
    with torch.no_grad():
        conv.weight.mul_(0.1)

    def model(x, t):  # cheap; eps ~ x keeps the samples O(1) like a real denoiser's
        return x + conv(x)

    x_T = torch.randn(shape, device=device, dtype=dtype)
    rows = []
    print(f"fastdiff {fastdiff.__version__} | torch {torch.__version__} | diffusers {diffusers.__version__} | "
          f"device {device} | dtype {args.dtype} | shape {shape} | {args.steps} steps | "
          f"median of {args.repeats} (warm-up {args.warmup}) | backend {fastdiff.get_backend()} | "
          f"{torch.get_num_threads()} thread(s) | {'thread CPU' if cpu_clock else 'wall'} time")
    header = (f"{'sampler':<10} {'diffusers':>10} {'Sampler.step':>13} {'speed-up':>9} "
              f"{'fastdiff.sample':>16} {'speed-up':>9} {'kernel alone':>13} {'sample/kernel':>14} "
              f"{'loop floor':>11} {'sample/floor':>13} "
              f"{'fused MB/step':>14} {'setup ms d/f':>14} {'max|diff|':>10}")
    print(header)
    print("-" * len(header))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            cls, config = SCHEDULERS[name]
            sched = getattr(diffusers, cls)(**config)
            d_out, d_setup, x_d = timed(diffusers_run, sched, args.steps, model, x_T, device,
                                        args.repeats, args.warmup)
            f_out, f_setup, x_f = timed(fastdiff_run, sched, args.steps, model, x_T, device,
                                        args.repeats, args.warmup)
            s_out, _, x_s = timed(sample_run, sched, args.steps, model, x_T, device,
                                  args.repeats, args.warmup)
            built = Sampler.from_diffusers(sched, args.steps)
            nbytes = fused_bytes(built, x_T.numel(), x_T.element_size())
            kernel = kernel_alone(built, built.init_noise(x_T), args.repeats)
            floor, _, _ = timed(floor_run, sched, args.steps, model, x_T, device, args.repeats, args.warmup)
            row = {"sampler": name, "scheduler": cls, "steps": args.steps, "shape": list(shape),
                   "device": str(device), "dtype": args.dtype,
                   "diffusers_us_per_step": d_out * 1e6, "fastdiff_us_per_step": f_out * 1e6,
                   "sample_us_per_step": s_out * 1e6, "kernel_us_per_step": kernel * 1e6,
                   "sample_over_kernel": s_out / kernel, "floor_us_per_step": floor * 1e6,
                   "sample_over_floor": s_out / floor,
                   "speedup": d_out / f_out if f_out > 0 else float("inf"),
                   "sample_speedup": d_out / s_out if s_out > 0 else float("inf"),
                   "fused_bytes_per_step": nbytes,
                   "setup_ms_diffusers": d_setup * 1e3, "setup_ms_fastdiff": f_setup * 1e3,
                   "max_abs_diff": max((x_d.float() - x.float()).abs().max().item() for x in (x_f, x_s)),
                   "sample_scale": x_d.float().abs().max().item()}
            rows.append(row)
            print(f"{name:<10} {row['diffusers_us_per_step']:>10.1f} {row['fastdiff_us_per_step']:>13.1f} "
                  f"{row['speedup']:>8.2f}x {row['sample_us_per_step']:>16.1f} {row['sample_speedup']:>8.2f}x "
                  f"{kernel * 1e6:>13.1f} {row['sample_over_kernel']:>13.2f}x "
                  f"{floor * 1e6:>11.1f} {row['sample_over_floor']:>12.2f}x "
                  f"{nbytes / 1e6:>14.2f} {d_setup * 1e3:>6.2f}/{f_setup * 1e3:<7.2f} "
                  f"{row['max_abs_diff']:>10.2e}")
    print("Medians of microseconds per step outside the model call; speed-up: diffusers' time "
          "over fastdiff's; kernel alone: the run's fused passes on prepared tensors, no loop; "
          "loop floor: the same passes after the same model calls, no sampler object; "
          "sample/kernel, sample/floor: fastdiff.sample's time outside the model over those.")
    if args.json:
        atomic_write_text(json.dumps({"config": vars(args), "results": rows}, indent=2), args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
