"""``fastdiff::diff_norm`` (per-row ||a - b||_2, the probes' reduction) timed side by side
in one run against the same reduction as torch ops (eager, and ``torch.compile`` of it)
and against a plain ``Tensor.copy_`` moving as many bytes as the op reads (a and b).

Medians over round-robin rounds (bench_step's ``race``: a change of machine load mid-run
hits every candidate alike), warm caches. %copy: the op's byte rate (both inputs read)
as % of the copy's (reads + writes of the same total). On a machine shared with other
busy processes use ``--threads 1``.

    python benchmarks/bench_diff_norm.py [--threads N] [--dtypes fp32,bf16,fp16]
                                         [--no-compile] [--json PATH]
"""
from __future__ import annotations

import argparse
import os

import torch

from bench_step import DTYPES, SHAPES, race, write_json


def eager_norm(a, b):
    """The reduction as torch ops: float32 differences (float64 for float64), row norms."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm((a.to(acc) - b.to(acc)).reshape(a.shape[0], -1), dim=1)


def bench_one(shape, dtype_name, use_compile, compiled):
    """Timings of one (shape, dtype); ``compiled`` caches one torch.compile per dtype."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(shape, generator=gen).to(dtype)
    op = torch.ops.fastdiff.diff_norm
    # float32 sums of up to 1M squares in different orders: agreement to ~1e-4 relative.
    torch.testing.assert_close(op(a, b), eager_norm(a, b), rtol=2e-4, atol=1e-5)
    nbytes = 2 * a.numel() * a.element_size()  # a and b read
    src = torch.randn(nbytes // 2 // 4)
    dst = torch.empty_like(src)
    fns = {"fastdiff": lambda: op(a, b), "eager": lambda: eager_norm(a, b),
           "copy": lambda: dst.copy_(src)}
    if use_compile:
        if dtype_name not in compiled:
            compiled[dtype_name] = torch.compile(eager_norm)
        fn = compiled[dtype_name]
        torch.testing.assert_close(fn(a, b), eager_norm(a, b), rtol=2e-4, atol=1e-5)
        fns["compile"] = lambda: fn(a, b)
    res = {"shape": list(shape), "dtype": dtype_name, "bytes": nbytes}
    for k, (med, best) in race(fns).items():
        res[f"{k}_s"], res[f"{k}_min_s"] = med, best
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        ap.error(f"--dtypes: expected names among {', '.join(DTYPES)}, got {args.dtypes!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import fastdiff
    if not fastdiff.backends()["cpu_kernels"]:
        ap.error("fastdiff's compiled CPU kernels are not loaded")
    compiled = {}
    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        rows = [bench_one(s, d, not args.no_compile, compiled) for d in dtypes for s in SHAPES]
    print(f"diff_norm, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, warm "
          f"caches, load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"{'shape':>17} {'dtype':>5} {'fastdiff':>9} {'eager':>8} {'compile':>8} "
          f"{'x eager':>7} {'x comp':>7} {'copy':>7} {'%copy':>5}")
    for r in rows:
        comp = r.get("compile_s")
        print(f"{str(tuple(r['shape'])):>17} {r['dtype']:>5} {r['fastdiff_s'] * 1e3:>9.4f} "
              f"{r['eager_s'] * 1e3:>8.4f} {comp * 1e3 if comp else float('nan'):>8.4f} "
              f"{r['eager_s'] / r['fastdiff_s']:>7.1f} "
              f"{comp / r['fastdiff_s'] if comp else float('nan'):>7.1f} "
              f"{r['copy_s'] * 1e3:>7.4f} {100 * r['copy_s'] / r['fastdiff_s']:>4.0f}%")
    print("Medians in ms; x eager / x comp: the op's speed-up over the torch ops / "
          "torch.compile of them;\ncopy: Tensor.copy_ of as many bytes as the op reads (half "
          "read, half written); %copy: the op's byte rate\nas % of the copy's.")
    if args.json:
        write_json(args.json, {"benchmark": "diff_norm", "torch": torch.__version__,
                               "threads": torch.get_num_threads(),
                               "load_average": [load0, os.getloadavg()[0]], "results": rows})


if __name__ == "__main__":
    main()
