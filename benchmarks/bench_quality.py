"""Sample quality of the shipped digits models: E-TSDM vs baseline.

For each sampler (DDIM, DPM-Solver++ 2M, UniPC, DDPM) and step count (5, 10, 20, 50,
100) both models draw the same class-conditional batch from the same seeds; the table is
the Frechet distance (FD) to the 360 held-out real digits in the shipped classifier's
feature space (lower is better) and the relative change E-TSDM vs baseline. The second
part probes both networks' Lipschitz constant in t near t = 0 (docs/etsdm.md:
K(t) = ||eps(x_t, t) - eps(x_t, t+1)||, the paper's finite difference, and the exact
||d eps / dt|| by JVP) and writes the curves as one plot.

    python benchmarks/bench_quality.py [--n 360] [--quick] [--json out.json] [--plot out.png]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import fastdiff
from fastdiff.data import load_digits
from fastdiff.metrics import digits_fd

SAMPLERS = ("ddim", "dpm++2m", "unipc", "ddpm")
STEPS = (5, 10, 20, 50, 100)
MODELS = ("digits-baseline", "digits")


def quality_table(n: int, samplers, steps, seed: int = 0) -> list[dict]:
    labels = torch.arange(n) % 10
    seeds = list(range(seed, seed + n))
    models = {name: fastdiff.pretrained(name) for name in MODELS}
    rows = []
    for sampler in samplers:
        for k in steps:
            row = {"sampler": sampler, "steps": k}
            for name, (model, schedule) in models.items():
                start = time.perf_counter()
                with torch.no_grad():
                    x = fastdiff.sample(model, (n, 1, 8, 8), schedule=schedule, sampler=sampler,
                                        steps=k, cond=labels, seeds=seeds, progress=False)
                row[name] = digits_fd(x)
                row[name + "_s"] = time.perf_counter() - start
            row["change"] = row["digits"] / row["digits-baseline"] - 1
            rows.append(row)
            print(f"  {sampler:>8} {k:>4} steps  FD baseline {row['digits-baseline']:7.2f}  "
                  f"E-TSDM {row['digits']:7.2f}  ({100 * row['change']:+.1f}%)", flush=True)
    return rows


def lipschitz_curves(samples: int, t_max: int, seed: int = 0) -> dict:
    x0, labels = load_digits("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x0), generator=g)[:samples]
    x0, labels = x0[idx], labels[idx]
    noise = torch.randn(x0.shape, generator=g)
    ts = torch.arange(0, t_max)
    curves = {}
    for name in MODELS:
        model, schedule = fastdiff.pretrained(name)
        sharing = getattr(model, "time_sharing", None)
        for method in ("fd", "jvp"):
            res = fastdiff.lipschitz_t(model, x0, schedule, ts, method=method, noise=noise,
                                       time_sharing=sharing, progress=False,
                                       model_kwargs={"class_labels": labels})
            curves[(name, method)] = res
    return curves


def plot_curves(curves: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    for i, method in enumerate(("fd", "jvp")):
        ax = fig.add_subplot(1, 2, i + 1)
        for name in MODELS:
            label = "E-TSDM (digits)" if name == "digits" else "baseline (digits-baseline)"
            curves[(name, method)].plot(ax=ax, label=label)
        ax.set_title("finite difference ||eps(t) - eps(t+1)||" if method == "fd"
                     else "exact ||d eps / dt|| (JVP)", fontsize=9)
        ax.set_xlabel("t (of 1000)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    from fastdiff._files import atomic_open
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=360, help="samples per (model, sampler, steps)")
    p.add_argument("--quick", action="store_true", help="2 samplers x 2 step counts, n=100")
    p.add_argument("--probe-samples", type=int, default=16)
    p.add_argument("--t-max", type=int, default=200, help="probe t in [0, t_max)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--plot", default="docs/quality_lipschitz.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers, steps, n = SAMPLERS, STEPS, args.n
    if args.quick:
        samplers, steps, n = ("ddim", "dpm++2m"), (5, 20), min(n, 100)
    print(f"FD to held-out digits (n={n} per cell, same seeds for both models; lower is better)")
    rows = quality_table(n, samplers, steps)
    print()
    print(f"| sampler | steps | FD baseline | FD E-TSDM | E-TSDM vs baseline |")
    print(f"|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['digits-baseline']:.2f} | {r['digits']:.2f} "
              f"| {100 * r['change']:+.1f}% |")
    wins = sum(r["change"] < 0 for r in rows)
    print(f"\nE-TSDM lower FD in {wins} of {len(rows)} cells; median change "
          f"{100 * sorted(r['change'] for r in rows)[len(rows) // 2]:+.1f}%")

    curves = lipschitz_curves(args.probe_samples, args.t_max)
    plot_curves(curves, args.plot)
    print(f"\nLipschitz constant in t near 0 ({args.probe_samples} held-out digits, mean over "
          f"samples), written to {args.plot}")
    print("| model | method | mean K, t < 20 | mean K, 20 <= t < 100 | mean K, 100 <= t < 200 |")
    print("|---|---|---|---|---|")
    summary = {}
    for (name, method), res in curves.items():
        m = res.mean
        t = res.timesteps
        parts = [m[(t >= a) & (t < b)].mean().item() for a, b in ((0, 20), (20, 100), (100, args.t_max))]
        summary[f"{name}/{method}"] = parts
        print(f"| {name} | {method} | " + " | ".join(f"{v:.4g}" for v in parts) + " |")
    if args.json:
        out = {"rows": rows, "lipschitz": summary, "n": n}
        from fastdiff._files import atomic_write_text
        atomic_write_text(json.dumps(out, indent=1), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
