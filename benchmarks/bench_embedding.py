"""Timestep embedding: fastdiff's fused op vs diffusers' ``Timesteps`` vs torch.compile.

For each batch size B, width dim and kind of t (integer steps / float times), and with and
without E-TSDM time sharing, times on the CPU:

  fastdiff   ``fastdiff.timestep_embedding(t, dim, flip_sin_to_cos=True,
             downscale_freq_shift=0, sharing=...)`` (integer t in [0, 1000) is a table
             row copy; float t is computed: sharing map + sin/cos in one pass)
  diffusers  ``diffusers.models.embeddings.Timesteps(dim, True, 0)`` applied to t, or to
             f(t) computed with torch ops (``fastdiff.TimeSharing``) when sharing
  compile    ``torch.compile(dynamic=False)`` of the same diffusers computation
             (``get_timestep_embedding``, after f(t) when sharing)

and prints one table of medians (microseconds), the ratios diffusers / fastdiff and
compile / fastdiff (above 1: fastdiff is faster) and the largest absolute difference of
fastdiff's output from diffusers' and from the compiled one (the compiled graph computes
the frequencies with inductor's exp, up to 1 ulp off eager torch.exp, so up to about
|t| * 2^-23 there). Usage::

    python benchmarks/bench_embedding.py [--quick] [--json PATH] [--threads N] [--device cuda]

With ``--device cuda`` the same comparison runs on the GPU (CUDA-event timing) and a
``triton`` column times fastdiff's Triton kernel next to its CUDA kernel.

``--table-crossover`` instead times the op on integer t in [0, 1000) with the cached
table (a row copy) and without it (sin/cos computed) for small batches: the batch size
from which the table pays sets ``fastdiff.embedding.TABLE_MIN_ELEMENTS`` (B * dim).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import measure  # noqa: E402

BATCHES = (1, 64, 1024, 16384)
DIMS = (128, 320, 1280)
QUICK_BATCHES = (1, 1024)
QUICK_DIMS = (320,)
KINDS = ("int", "float")
TARGET = dict(B=1024, dim=320)  # where the README's claims are checked


def make_t(kind: str, B: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """[B] DDPM-range timesteps: int64 steps in [0, 1000) or float32 times in [0, 1000)."""
    if kind == "int":
        return torch.randint(0, 1000, (B,), generator=gen).to(device)
    return (torch.rand(B, generator=gen) * 1000).to(device)


def candidates(dim: int, sharing, device="cpu"):
    """name -> callable(t) for the implementations of one configuration (on a GPU also
    fastdiff's Triton kernel, through the "triton" backend)."""
    import fastdiff
    from diffusers.models.embeddings import Timesteps, get_timestep_embedding

    proj = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)

    def ours(t):
        return fastdiff.timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0,
                                           sharing=sharing)

    def diffusers(t):
        return proj(t if sharing is None else sharing(t))

    def eager(t):
        return get_timestep_embedding(t if sharing is None else sharing(t), dim, True, 0)

    fns = {"fastdiff": ours, "diffusers": diffusers,
           "compile": torch.compile(eager, dynamic=False)}
    if torch.device(device).type == "cuda":
        def triton(t):
            old = fastdiff.get_backend()
            fastdiff.set_backend("triton")
            try:
                return ours(t)
            finally:
                fastdiff.set_backend(old)
        fns["triton"] = triton
    return fns


def run(batches=BATCHES, dims=DIMS, progress: bool = True, max_total_s: float = 1.0, device="cpu"):
    """Time every configuration; returns a list of row dicts (times in microseconds)."""
    from tqdm import tqdm

    import fastdiff

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    configs = [(s, k, d, b) for s in (None, fastdiff.TimeSharing(100, 5)) for k in KINDS
               for d in dims for b in batches]
    rows, fns = [], {}
    for sharing, kind, dim, B in tqdm(configs, disable=not progress, desc="bench_embedding"):
        key = (sharing, dim)
        if key not in fns:
            fns[key] = candidates(dim, sharing, device)
        impl = fns[key]
        t = make_t(kind, B, gen, device)
        with torch.no_grad():
            t0 = time.perf_counter()
            compiled_out = impl["compile"](t)  # first call compiles for this (dtype, B)
            compile_s = time.perf_counter() - t0
            ref = impl["diffusers"](t)
            ours = impl["fastdiff"](t)
            row = dict(sharing=sharing is not None, t=kind, B=B, dim=dim, device=str(device),
                       max_abs_diff_vs_diffusers=(ours - ref).abs().max().item(),
                       max_abs_diff_vs_compile=(ours - compiled_out).abs().max().item(),
                       compile_s=compile_s)
            for name, fn in impl.items():
                tm = measure(lambda: fn(t), max_total_s=max_total_s, device=device)
                row[f"{name}_us"], row[f"{name}_iqr_us"] = tm.us, tm.iqr * 1e6
        row["diffusers/fastdiff"] = row["diffusers_us"] / row["fastdiff_us"]
        row["compile/fastdiff"] = row["compile_us"] / row["fastdiff_us"]
        if "triton_us" in row:
            row["max_abs_diff_triton_vs_fastdiff"] = (impl["triton"](t) - ours).abs().max().item()
        rows.append(row)
    return rows


def format_table(rows) -> str:
    head = (f"{'sharing':>7} {'t':>5} {'B':>6} {'dim':>5} | {'fastdiff':>10} {'diffusers':>10} "
            f"{'compile':>10} | {'diff/fd':>8} {'comp/fd':>8} | {'err diff':>8} {'err comp':>8}")
    tri = any("triton_us" in r for r in rows)
    if tri:
        head += f" | {'triton':>8} {'tri/fd':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        extra = f" | {r['triton_us']:>8.2f} {r['triton_us'] / r['fastdiff_us']:>6.2f}" if tri else ""
        lines.append(
            f"{'E-TSDM' if r['sharing'] else '-':>7} {r['t']:>5} {r['B']:>6} {r['dim']:>5} | "
            f"{r['fastdiff_us']:>10.2f} {r['diffusers_us']:>10.2f} {r['compile_us']:>10.2f} | "
            f"{r['diffusers/fastdiff']:>8.2f} {r['compile/fastdiff']:>8.2f} | "
            f"{r['max_abs_diff_vs_diffusers']:>8.1e} {r['max_abs_diff_vs_compile']:>8.1e}" + extra)
    return "\n".join(lines)


def check_targets(rows) -> list[str]:
    """The claims at B=1024, dim=320: integer t >= 10x faster than diffusers' Timesteps;
    float t at least as fast as torch.compile."""
    out = []
    for r in rows:
        if r["B"] != TARGET["B"] or r["dim"] != TARGET["dim"]:
            continue
        tag = f"{'E-TSDM ' if r['sharing'] else ''}{r['t']} t, B={r['B']}, dim={r['dim']}"
        if r["t"] == "int":
            ok = r["diffusers/fastdiff"] >= 10
            out.append(f"{tag}: diffusers/fastdiff = {r['diffusers/fastdiff']:.1f} "
                       f"(target >= 10): {'met' if ok else 'MISSED'}")
        else:
            ok = r["compile/fastdiff"] >= 1
            out.append(f"{tag}: compile/fastdiff = {r['compile/fastdiff']:.2f} "
                       f"(target >= 1): {'met' if ok else 'MISSED'}")
    return out


def write_json(path: str, payload) -> None:
    from fastdiff._files import atomic_write_text
    atomic_write_text(json.dumps(payload, indent=2), path)


CROSSOVER_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def table_crossover(dims=DIMS, batches=CROSSOVER_BATCHES, max_total_s: float = 0.3):
    """Median us per raw-op call with and without the table, per (dim, B)."""
    from fastdiff.embedding import TABLE_ROWS, embedding_frequencies

    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    op = torch.ops.fastdiff.timestep_embedding
    rows = []
    for dim in dims:
        freqs = embedding_frequencies(dim, 0.0)
        table = op(torch.arange(TABLE_ROWS), freqs, None, dim, True, 1.0, 0.0, 0.0, False)
        for B in batches:
            t = torch.randint(0, TABLE_ROWS, (B,), generator=gen)
            a = measure(lambda: op(t, freqs, None, dim, True, 1.0, 0.0, 0.0, False),
                        max_total_s=max_total_s).us
            b = measure(lambda: op(t, freqs, table, dim, True, 1.0, 0.0, 0.0, False),
                        max_total_s=max_total_s).us
            rows.append(dict(dim=dim, B=B, computed_us=a, table_us=b))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"B in {QUICK_BATCHES}, dim in {QUICK_DIMS}")
    p.add_argument("--json", metavar="PATH", help="also write the rows and machine info here")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--table-crossover", action="store_true",
                   help="time the integer-t table against computing, for small batches")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.table_crossover:
        print(f"integer t, raw op, {torch.get_num_threads()} threads, median us per call")
        print(f"{'dim':>6} {'B':>5} | {'computed':>9} {'table':>9} | {'saved us':>8}")
        for r in table_crossover():
            print(f"{r['dim']:>6} {r['B']:>5} | {r['computed_us']:>9.2f} {r['table_us']:>9.2f} | "
                  f"{r['computed_us'] - r['table_us']:>8.2f}")
        return 0

    import fastdiff
    batches, dims = (QUICK_BATCHES, QUICK_DIMS) if args.quick else (BATCHES, DIMS)
    rows = run(batches, dims, progress=args.progress, max_total_s=0.5 if args.quick else 1.0,
               device=args.device)
    gpu = torch.device(args.device).type == "cuda"
    info = dict(torch=torch.__version__, fastdiff=fastdiff.__version__,
                threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                device=torch.cuda.get_device_name() if gpu else "cpu",
                backend=fastdiff.get_backend())
    print(f"timestep embedding, {info['device']}, {info['threads']} threads, median us per call "
          f"(torch {info['torch']})")
    print(format_table(rows))
    targets = check_targets(rows)
    for line in targets:
        print(line)
    if args.json:
        write_json(args.json, dict(info=info, rows=rows, targets=targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
