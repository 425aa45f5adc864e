"""Import time of ``import fastdiff``, each measurement in a fresh Python process.

Prints one line: the median wall time of ``import torch`` alone and of ``import
fastdiff`` on top of it (what fastdiff itself costs), over ``--repeats`` processes, and
which heavy optional modules the import pulled in (none should be: torch._dynamo,
diffusers, matplotlib, sklearn, scipy, triton are imported only when used).

    python benchmarks/bench_import.py [--repeats 7] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HEAVY = ("torch._dynamo", "diffusers", "matplotlib", "sklearn", "scipy", "triton")

CHILD = f"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import fastdiff
t2 = time.perf_counter()
print(json.dumps({{"torch_s": t1 - t0, "fastdiff_s": t2 - t1,
                  "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def measure(repeats: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                             env=env, check=True, cwd=root)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"repeats": repeats,
            "torch_s": statistics.median(r["torch_s"] for r in runs),
            "fastdiff_s": statistics.median(r["fastdiff_s"] for r in runs),
            "loaded": sorted({m for r in runs for m in r["loaded"]})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="fresh processes (median)")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers here")
    args = ap.parse_args(argv)
    r = measure(args.repeats)
    print(f"import time, median of {r['repeats']} fresh processes: import torch "
          f"{r['torch_s']:.2f} s, import fastdiff on top {r['fastdiff_s']:.2f} s; heavy modules "
          f"pulled in: {', '.join(r['loaded']) or 'none'}")
    if args.json:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from fastdiff._files import atomic_write_text
        atomic_write_text(json.dumps(r, indent=2), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
