"""Benchmark: batched Lipschitz-in-t probes vs what one writes without fastdiff.

For each model (fastdiff's default UNet; a diffusers UNet2DModel of similar size) it
measures, on the same (sample, timestep) pairs:

  * fastdiff ``lipschitz_t`` with ``method="fd"`` and ``method="jvp"`` (batched pairs),
  * a plain per-timestep Python loop of finite differences (two model calls per t on
    the B samples, then a norm),
  * ``torch.func.vmap(torch.func.jacfwd(...))`` over the pairs, in the same chunks,
  * for attention, ``method="jvp"`` with the fused attention rule (fastdiff::sdpa_jvp)
    against the same probe on torch's math SDPA backend ("jvp, math attention"),

and the cost of one probe chunk in units of one forward pass of the same batch
(median time of a probe over b pairs / median time of one forward of b rows). A second
table says where those forward passes go: the time inside each module type (conv,
linear, group norm, SiLU, attention without its own linears and norm; each exclusive of
its children) and everything else, in the same units, for a forward, the fd, jvp and
"jvp, math attention" probes (module hooks add a little to every column).

``--clock cpu`` times with the process's CPU time instead of the wall clock: with
``--threads 1`` that is the work the call costs, whatever else the machine runs.

Usage:
    python benchmarks/bench_probe.py                     # 16 samples x 1000 timesteps
    python benchmarks/bench_probe.py --timesteps 100 --samples 8 --repeats 1   # quick
    python benchmarks/bench_probe.py --json out/bench_probe.json
    python benchmarks/bench_probe.py --device cuda       # on a GPU (synchronized timing)
    python benchmarks/bench_probe.py --models diffusers --threads 1 --clock cpu   # shared machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastdiff  # noqa: E402
import fastdiff.attention  # noqa: E402
from fastdiff._files import atomic_write_text  # noqa: E402
from fastdiff.probes import _math_attention  # noqa: E402
from fastdiff.schedules import NoiseSchedule  # noqa: E402
from fastdiff.wrappers import model_output  # noqa: E402


DEVICE = torch.device("cpu")  # --device
NOW = time.perf_counter  # --clock

# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------

def _randomize(model: nn.Module, gen: torch.Generator) -> nn.Module:
    # Zero-initialised output layers would make every derivative exactly 0.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def fastdiff_unet(gen):
    """fastdiff's small default UNet on 1x8x8 inputs."""
    from fastdiff.nets import UNet
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    return _randomize(UNet(), gen), (1, 8, 8)


def diffusers_unet(gen, attention=True):
    """A diffusers UNet2DModel of similar size (64/128 channels, 2 res blocks per level)."""
    from diffusers import UNet2DModel
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    m = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(64, 128),
                    layers_per_block=2, norm_num_groups=8, add_attention=attention,
                    down_block_types=down, up_block_types=up)
    return _randomize(m, gen), (1, 8, 8)


# ---------------------------------------------------------------------------------------
# the competitors
# ---------------------------------------------------------------------------------------

def loop_fd(model, x0, noise, sched, ts):
    """What one writes without fastdiff: one timestep at a time, two model calls."""
    T = sched.T
    out = []
    with torch.no_grad():
        for t in ts.tolist():
            a, s = sched.alpha(t).item(), sched.sigma(t).item()
            x = a * x0 + s * noise
            t2 = t + 1 if t + 1 <= T - 1 else t - 1
            e1 = model_output(model(x, torch.full((x0.shape[0],), float(t), device=x0.device)))
            e2 = model_output(model(x, torch.full((x0.shape[0],), float(t2), device=x0.device)))
            out.append((e1 - e2).flatten(1).norm(dim=1) / abs(t - t2))
    return torch.stack(out)


def vmap_jacfwd(model, x0, noise, sched, ts, batch_size):
    """torch.func.vmap(jacfwd) over (sample, t) pairs, chunked like fastdiff."""
    B, K = x0.shape[0], ts.numel()
    alpha = sched.alpha(ts.long().cpu()).float().to(x0.device)
    sigma = sched.sigma(ts.long().cpu()).float().to(x0.device)

    def one(x, t):  # a single pair: x [C, H, W], t 0-d
        return model_output(model(x[None], t.reshape(1)))[0]

    jac = torch.func.vmap(torch.func.jacfwd(one, argnums=1))
    out = torch.empty(K * B, device=x0.device)
    view = (-1,) + (1,) * (x0.dim() - 1)
    with torch.no_grad(), _math_attention():
        for start in range(0, K * B, batch_size):
            idx = torch.arange(start, min(start + batch_size, K * B), device=x0.device)
            k, b = idx // B, idx % B
            x = alpha[k].reshape(view) * x0[b] + sigma[k].reshape(view) * noise[b]
            d = jac(x, ts[k].float())
            out[idx] = d.flatten(1).norm(dim=1)
    return out.reshape(K, B)


# ---------------------------------------------------------------------------------------
# where the forward passes go
# ---------------------------------------------------------------------------------------

# module class -> the row it is counted in; attention blocks count without their children
BREAKDOWN = {"Conv2d": "conv", "Linear": "linear", "GroupNorm": "group norm", "SiLU": "silu",
             "Attention": "attention", "SelfAttention": "attention"}
BREAKDOWN_ROWS = ("conv", "linear", "group norm", "silu", "attention", "other")


class ModuleClock:
    """Time spent inside each module type (exclusive of child modules), from forward
    hooks; ``other`` is the rest of the call (elementwise glue, the probe itself)."""

    def __init__(self, model: nn.Module):
        self.acc = dict.fromkeys(BREAKDOWN_ROWS, 0.0)
        self.stack = []
        self.handles = []
        for m in model.modules():
            row = BREAKDOWN.get(type(m).__name__)
            if row is not None:
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(lambda *a, row=row: self._leave(row)))

    def _enter(self, *_):
        _sync()
        self.stack.append([NOW(), 0.0])

    def _leave(self, row):
        _sync()
        start, children = self.stack.pop()
        dt = NOW() - start
        self.acc[row] += dt - children
        if self.stack:
            self.stack[-1][1] += dt

    def run(self, fn) -> dict:
        """Seconds per row for one ``fn()`` (and ``total``)."""
        self.acc = dict.fromkeys(BREAKDOWN_ROWS, 0.0)
        total = clock(fn)
        self.acc["other"] = total - sum(self.acc.values())
        return {**self.acc, "total": total}

    def remove(self):
        for h in self.handles:
            h.remove()


def breakdown(model, fns: dict, rounds: int) -> dict:
    """Median over ``rounds`` of each row of each function, in units of the median
    ``forward`` total (the first entry of ``fns`` must be "forward")."""
    mc = ModuleClock(model)
    try:
        runs = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                runs[k].append(mc.run(fn))
    finally:
        mc.remove()
    fwd = statistics.median(r["total"] for r in runs["forward"])
    return {k: {row: statistics.median(r[row] for r in rs) / fwd
                for row in BREAKDOWN_ROWS + ("total",)} for k, rs in runs.items()}


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------

def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def clock(fn):
    """Seconds of one ``fn()`` (device work included: synchronized before and after)."""
    _sync()
    start = NOW()
    fn()
    _sync()
    return NOW() - start


def timed(fn, repeats, warmup=1):
    """Median seconds of ``fn()``. (benchmarks/_timing.measure targets microsecond calls
    with 5 warm-ups and many repeats; one full probe here takes minutes.)"""
    for _ in range(warmup):
        fn()
    ts = [clock(fn) for _ in range(repeats)]
    return statistics.median(ts), ts


def bench_model(name, model, shape, args, gen):
    sched = NoiseSchedule.linear(1000)
    B, K, b = args.samples, args.timesteps, args.batch_size
    x0 = torch.randn((B,) + shape, generator=gen).to(DEVICE)
    noise = torch.randn(x0.shape, generator=gen).to(DEVICE)
    ts = torch.linspace(0, 999, K).round().long()
    probe = dict(noise=noise, batch_size=b, progress=False)
    rows = {}

    # -- cost of one chunk in forward passes, same batch of b pairs -------------------
    # Round-robin timing with a ratio per round: a shared machine's slow drifts cancel.
    kb = max(1, b // B)  # timesteps making one chunk of about b pairs
    xb = torch.randn((kb * B,) + shape, generator=gen).to(DEVICE)
    tb = (torch.rand(kb * B, generator=gen) * 999).to(DEVICE)

    def fwd():
        with torch.no_grad():
            model_output(model(xb, tb))

    def stock_jvp():  # torch.func.jvp with torch's own forward-AD rules, same rows
        with torch.no_grad(), _math_attention():
            torch.func.jvp(lambda t: model_output(model(xb, t)), (tb,), (torch.ones_like(tb),))

    def probe_chunk(m):
        fastdiff.lipschitz_t(model, x0, sched, ts[:kb], method=m, **{**probe, "batch_size": kb * B})

    def jvp_math_attention():  # the jvp probe with attention on torch's math backend
        with mock.patch.object(fastdiff.attention, "fused_jvp_applies", lambda *a: False):
            probe_chunk("jvp")

    fns = {"forward": fwd, "jvp_torch_rules": stock_jvp}
    for m in ("fd", "jvp", "vjp"):
        fns[m] = lambda m=m: probe_chunk(m)
    fns["jvp_math_attention"] = jvp_math_attention
    chunk = {"pairs": kb * B}
    for k, fn in list(fns.items()):
        try:
            fn()  # warm-up
        except Exception as e:  # report, do not hide, a baseline that cannot run
            chunk[k], chunk[f"{k}_error"] = None, _err(e)
            del fns[k]
    times = {k: [] for k in fns}
    for _ in range(args.chunk_repeats):
        for k, fn in fns.items():
            times[k].append(clock(fn))
    chunk["forward_s"] = statistics.median(times["forward"])
    for k in fns:
        if k != "forward":
            chunk[k] = statistics.median(t / f for t, f in zip(times[k], times["forward"]))
    rows["chunk_cost_in_forwards"] = chunk
    parts = {k: fns[k] for k in ("forward", "fd", "jvp", "jvp_math_attention") if k in fns}
    rows["breakdown_in_forwards"] = breakdown(model, parts, max(3, args.chunk_repeats // 2))

    # -- full probe: K timesteps x B samples --------------------------------------------
    full = {}
    t, _ = timed(lambda: loop_fd(model, x0, noise, sched, ts), args.repeats, warmup=0)
    full["loop_fd_s"] = t
    for m in ("fd", "jvp"):
        t, _ = timed(lambda: fastdiff.lipschitz_t(model, x0, sched, ts, method=m, **probe),
                     args.repeats, warmup=0)
        full[f"fastdiff_{m}_s"] = t
    try:
        t, _ = timed(lambda: vmap_jacfwd(model, x0, noise, sched, ts, b), args.repeats, warmup=0)
        full["vmap_jacfwd_s"] = t
    except Exception as e:  # report, do not hide, a baseline that cannot run
        full["vmap_jacfwd_s"] = None
        full["vmap_jacfwd_error"] = _err(e)
    rows["full_probe"] = full

    # -- agreement (the numbers being timed are the same quantity) ----------------------
    sub = ts[: max(2, min(K, 8))]
    ref = loop_fd(model, x0, noise, sched, sub)
    fd = fastdiff.lipschitz_t(model, x0, sched, sub, method="fd", **probe).values.float()
    jvp = fastdiff.lipschitz_t(model, x0, sched, sub, method="jvp", **probe).values.float()
    with mock.patch.object(fastdiff.attention, "fused_jvp_applies", lambda *a: False):
        jvp_math = fastdiff.lipschitz_t(model, x0, sched, sub, method="jvp", **probe).values.float()
    rows["check"] = {"fd_vs_loop_max_rel": ((fd - ref).abs() / ref.abs().clamp_min(1e-12)).max().item(),
                     "jvp_vs_fd_median_rel": ((jvp - fd).abs() / fd.abs().clamp_min(1e-12)).median().item(),
                     "jvp_vs_math_attention_max_rel":
                         ((jvp - jvp_math).abs() / jvp_math.abs().clamp_min(1e-12)).max().item()}
    try:
        vj = vmap_jacfwd(model, x0, noise, sched, sub, b)
        rows["check"]["vmap_jacfwd_vs_jvp_max_rel"] = ((vj - jvp).abs() / jvp.clamp_min(1e-12)).max().item()
    except Exception:
        pass
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128, help="(sample, t) pairs per model call")
    p.add_argument("--repeats", type=int, default=1, help="full-probe repeats (median)")
    p.add_argument("--chunk-repeats", type=int, default=9,
                   help="per-chunk rounds (median of per-round ratios)")
    p.add_argument("--models", default="fastdiff,diffusers-noattn,diffusers",
                   help="comma list of fastdiff, diffusers, diffusers-noattn")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (1 gives stable timings on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall clock, or the process's CPU time (use with --threads 1)")
    args = p.parse_args(argv)
    global DEVICE, NOW
    DEVICE = torch.device(args.device)
    if args.clock == "cpu":
        if DEVICE.type == "cuda":
            p.error("--clock cpu times CPU work; use the wall clock with --device cuda")
        NOW = time.process_time
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    makers = {"fastdiff": fastdiff_unet, "diffusers": diffusers_unet,
              "diffusers-noattn": lambda g: diffusers_unet(g, attention=False)}
    results = {"config": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
               "machine": platform.processor() or platform.machine(),
               "loadavg_start": os.getloadavg(), "models": {}}
    for name in args.models.split(","):
        model, shape = makers[name](gen)
        model = model.to(DEVICE)
        print(f"[{name}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
              f"input {shape}", flush=True)
        results["models"][name] = bench_model(name, model, shape, args, gen)
        results["loadavg_end"] = os.getloadavg()
        _print_table(results, args)
        if args.json:  # after every model: a long run keeps what it measured
            atomic_write_text(json.dumps(results, indent=2), args.json)
            print(f"wrote {args.json}", flush=True)


def _print_table(results, args):
    B, K = args.samples, args.timesteps
    print(f"\nLipschitz-in-t probes, {B} samples x {K} timesteps, chunks of {args.batch_size} "
          f"pairs, {results['threads']} threads, {args.clock} clock, load avg "
          f"{results['loadavg_start'][0]:.1f} -> {results['loadavg_end'][0]:.1f}")
    print(f"{'model':<18}{'method':<22}{'time (s)':>10}{'vs loop':>9}{'full / fwd':>12}"
          f"{'chunk / fwd':>13}")
    for name, r in results["models"].items():
        full, chunk = r["full_probe"], r["chunk_cost_in_forwards"]
        loop = full["loop_fd_s"]
        # per b pairs of the full run, in forwards of b rows (amortised over all chunks)
        per = chunk["pairs"] / (B * K) / chunk["forward_s"]
        lines = [("per-t loop (fd)", loop, None), ("fastdiff fd", full["fastdiff_fd_s"], chunk["fd"]),
                 ("fastdiff jvp", full["fastdiff_jvp_s"], chunk["jvp"]),
                 ("jvp, math attention", None, chunk["jvp_math_attention"]),
                 ("fastdiff vjp", None, chunk["vjp"]),
                 ("func.jvp, torch rules", None, chunk["jvp_torch_rules"]),
                 ("vmap(jacfwd)", full["vmap_jacfwd_s"], None)]
        for method, t, c in lines:
            ts = "-" if t is None else f"{t:.3f}"
            sp = "-" if t is None else f"{loop / t:.2f}x"
            am = "-" if t is None else f"{t * per:.2f}"
            cs = "-" if c is None else f"{c:.2f}"
            print(f"{name:<18}{method:<22}{ts:>10}{sp:>9}{am:>12}{cs:>13}")
        for what, err in (("vmap(jacfwd)", full.get("vmap_jacfwd_error")),
                          ("func.jvp, torch rules", chunk.get("jvp_torch_rules_error")),
                          ("fastdiff vjp", chunk.get("vjp_error"))):
            if err:
                print(f"{'':<18}{what} failed: {err}")
        print(f"{'':<18}forward of {chunk['pairs']} rows: {chunk['forward_s'] * 1e3:.1f} ms; "
              f"checks: {', '.join(f'{k}={v:.2g}' for k, v in r['check'].items())}")
    print("full / fwd: full-probe time per chunk of pairs, in forwards of that many rows; "
          "chunk / fwd: one lipschitz_t call on one chunk (median of per-round ratios)")
    print("\nWhere the forward passes go: time inside each module type, in forwards of one chunk")
    cols = (("forward", "forward"), ("fd", "fd"), ("jvp", "jvp"),
            ("jvp_math_attention", "jvp, math attn"))
    print(f"{'model':<18}{'':<12}" + "".join(f"{c:>16}" for _, c in cols))
    for name, r in results["models"].items():
        bd = r["breakdown_in_forwards"]
        for row in BREAKDOWN_ROWS + ("total",):
            print(f"{name:<18}{row:<12}" + "".join(
                f"{bd[k][row]:>16.3f}" if k in bd else f"{'-':>16}" for k, _ in cols))


if __name__ == "__main__":
    main()
