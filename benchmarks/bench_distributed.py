"""Sharded sampling throughput: ``fastdiff sample --seeds ... --out DIR`` alone and under
``torchrun --nproc_per_node N`` (gloo, one thread per process), side by side in one run.

Reports per world size the sampling time (what the command measures between joining the
process group and the last shard: model loading and process start-up excluded, and
listed apart as wall time), samples per second and the speed-up over one process; checks
that every world size wrote the same images, bit for bit.

    python benchmarks/bench_distributed.py [--seeds 0-1023] [--batch 64] [--steps 20]
                                           [--world 1,2] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(world, seeds, batch, steps, out):
    cmd = [sys.executable, "-m", "fastdiff", "sample", "--seeds", seeds, "--batch", str(batch),
           "--steps", str(steps), "--out", out, "--pack", "--no-progress", "--json"]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}"] + cmd[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"world {world} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    return summary["time_s"], wall, summary["n"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-1023")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--world", default="1,2", help="comma-separated world sizes")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.world.split(",")]
    rows, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in worlds:
            out = os.path.join(tmp, f"w{w}")
            t, wall, n = run(w, args.seeds, args.batch, args.steps, out)
            with np.load(os.path.join(out, "samples.npz")) as z:
                images[w] = z["arr_0"]
            rows.append({"world": w, "n": n, "sample_s": t, "wall_s": wall, "samples_per_s": n / t})
    same = all(np.array_equal(images[w], images[worlds[0]]) for w in worlds)
    base = rows[0]["samples_per_s"]
    print(f"sharded sampling: digits model, {args.steps} steps, batch {args.batch}, "
          f"{rows[0]['n']} seeds, one thread per process, {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'processes':>9} {'sampling s':>10} {'wall s':>7} {'samples/s':>10} {'speed-up':>8}")
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base
        print(f"{r['world']:>9} {r['sample_s']:>10.2f} {r['wall_s']:>7.1f} {r['samples_per_s']:>10.1f} "
              f"{r['speedup']:>7.2f}x")
    print(f"same images for every world size: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "same_images": same, "args": vars(args)}, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
