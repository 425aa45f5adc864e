"""Does E-TSDM help where the Lipschitz singularity near t = 0 should bite?

For each setting a baseline and an E-TSDM model are trained the same way (same init
seed, data order, per-step t / noise / label-dropout draws, steps; only the network's
time input differs: f(t) for E-TSDM), then both draw the same class-conditional samples
from the same initial noise (seed i -> sample i for both) with DDIM and DPM-Solver++(2M)
at 5, 10 and 20 steps. Settings:

  vp_linear  continuous VP, beta 0.1-20, t uniform in [1e-5, 1] at training, sharing
             TimeSharing.continuous(0.1, 5); sampled down to t_eps = 1e-3 and to 1e-5
  cosine     discrete T = 1000 improved-DDPM cosine, sharing t~ = 100, n = 5
  quadratic  discrete T = 1000 "quad" betas (linspace of sqrt(beta) 1e-4..0.02, squared:
             NoiseSchedule.scaled_linear with DDPM's end points)
  linear     discrete T = 1000 DDPM linear (the control: the shipped models' setting)

Every sampler ENDS at t_eps (final_sigmas_type "sigma_min", no final jump to sigma = 0;
t_eps = 1/T for the discrete schedules) on a grid dense near it (DPM-Solver's logSNR
grid in continuous time, DDIM's quadratic time grid for the discrete schedules), so the
network is evaluated close to t = 0, where the singularity is.

Quality: Frechet distance in the shipped classifier's feature space against the 360
held-out digits (the classifier and the diffusion models train on the other 1437),
with a bootstrap 95% interval over samples AND real digits (the width of the central
95% of the replicates, centred on the estimate: ``percentile_ci(..., estimate=)``); the
baseline-vs-E-TSDM difference is bootstrapped paired (the same resampled seeds and real
digits for both models). Beside it: the noise floor (n real training digits vs the 360
held-out ones), the classifier accuracy of the samples (predicted == requested class),
the mean per-class FD, and each model's Lipschitz constant in t near 0 (finite
differences, ``fastdiff.lipschitz_t(method="fd")``).

    python benchmarks/bench_etsdm.py                      # everything, sequentially
    python benchmarks/bench_etsdm.py --only vp_linear     # one setting -> its JSON part
    python benchmarks/bench_etsdm.py --report             # table + plot from the parts
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

import fastdiff
from fastdiff import NoiseSchedule, TimeSharing
from fastdiff._files import atomic_open, atomic_write_text
from fastdiff.data import load_digits
from fastdiff.metrics import (bootstrap_indices, classify, digits_features, frechet_distance,
                              frechet_distance_resampled, percentile_ci)
from fastdiff.nets import UNet
from fastdiff.train import train

SETTINGS = ("vp_linear", "cosine", "quadratic", "linear")
VARIANTS = ("baseline", "etsdm")
SAMPLERS = ("ddim", "dpm++2m")
STEPS = (5, 10, 20)
EVAL_T_EPS = (1e-3, 1e-5)   # continuous sampling ends here
TRAIN_T_EPS = 1e-5          # continuous training draws t uniform in [TRAIN_T_EPS, 1]


class ContinuousTime(nn.Module):
    """``net(x, scale * t)`` for t in [0, 1]: the UNet's sinusoidal embedding is tuned
    for timesteps 0..1000 (score-SDE feeds its VP nets 999 t the same way). Any time
    sharing is applied to t before this wrapper, so f acts in continuous time."""

    def __init__(self, net: nn.Module, scale: float = 1000.0):
        super().__init__()
        self.net, self.scale = net, scale
        self.prediction_type = net.prediction_type

    @property
    def null_class(self):
        return self.net.null_class

    def forward(self, x, t, class_labels=None):
        return self.net(x, t * self.scale, class_labels)


def setting(name: str):
    """(training schedule, E-TSDM sharing, evaluation t_eps list or [None])."""
    if name == "vp_linear":
        return (NoiseSchedule.vp_linear(0.1, 20.0, t_eps=TRAIN_T_EPS), TimeSharing.continuous(0.1, 5),
                list(EVAL_T_EPS))
    sched = {"cosine": lambda: NoiseSchedule.cosine(1000),
             "quadratic": lambda: NoiseSchedule.scaled_linear(1000, 1e-4, 0.02),
             "linear": lambda: NoiseSchedule.linear(1000)}[name]()
    return sched, TimeSharing(100, 5), [None]


def build_model(args, continuous: bool) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights for both variants
    net = UNet(num_classes=10, channels=args.width, channel_mult=(1, 2), num_res_blocks=1,
               attention_levels=(), mid_attention=False)
    return ContinuousTime(net) if continuous else net


def sample_kwargs(schedule: NoiseSchedule) -> dict:
    # Grids dense near t_eps and a run that ENDS at t_eps (1/T for a discrete schedule;
    # no final jump to sigma = 0), so the last evaluations sit where d sigma / dt
    # diverges. diffusers' default "linspace" grid at 5 steps never calls the network
    # below t = 200 of 1000, where E-TSDM cannot matter; DPM-Solver's logSNR grid
    # spends most steps near t = T on the cosine schedule (lambda -> -inf there), so the
    # discrete settings use DDIM's quadratic time grid.
    kw = dict(spacing="logSNR" if schedule.continuous else "time_quadratic",
              final_sigmas_type="sigma_min")
    if schedule.kind == "cosine":
        # alpha is 5e-5 at t = 999: unclipped, the first step's x0 = (x - sigma eps) / alpha
        # multiplies the network's error by ~2e4 and both models' FD is set there, far from
        # t = 0 (improved-DDPM and diffusers' DDIM clip x0 to [-1, 1] for this reason)
        kw["clip_sample"] = True
    return kw


def probe_times(schedule: NoiseSchedule, sharing: TimeSharing) -> torch.Tensor:
    if schedule.continuous:  # geometric from the training t_eps to 2 t~
        return torch.logspace(math.log10(TRAIN_T_EPS), math.log10(2 * sharing.t_tilde), 41,
                              dtype=torch.float64)
    return torch.arange(0, 2 * sharing.t_tilde)


def lipschitz_summary(model, schedule, sharing, args, *, shared: bool) -> dict:
    """K(t) = ||eps(x_t, t) - eps(x_t, t')|| / |t - t'| per unit of NORMALISED time
    (t / T for discrete schedules), mean over held-out digits."""
    x0, labels = load_digits("test")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(x0), generator=g)[:args.probe_samples]
    x0, labels = x0[idx], labels[idx]
    noise = torch.randn(x0.shape, generator=g)
    ts = probe_times(schedule, sharing)
    res = fastdiff.lipschitz_t(model, x0, schedule, ts, method="fd", noise=noise,
                               time_sharing=sharing if shared else None, progress=False,
                               model_kwargs={"class_labels": labels})
    unit = 1.0 if schedule.continuous else float(schedule.T)
    t = res.timesteps.double() / (1.0 if schedule.continuous else schedule.T)
    k = res.mean.double() * unit
    tt = sharing.t_tilde / (1.0 if schedule.continuous else schedule.T)
    near, after = t < tt, (t >= tt) & (t < 2 * tt)
    return {"t": t.tolist(), "K": k.tolist(), "K_near0": k[near].mean().item(),
            "K_after": k[after].mean().item(), "K_max": k.max().item()}


def fd_stats(feats: dict, real_f: torch.Tensor, idx_g, idx_r) -> dict:
    out = {}
    reps = {}
    for v, f in feats.items():
        reps[v] = frechet_distance_resampled(f, real_f, idx_g, idx_r)
        fd = frechet_distance(f, real_f)
        out[v] = {"fd": fd, "fd_ci": percentile_ci(reps[v], estimate=fd)}
    if len(feats) == 2:
        b, e = (out[v]["fd"] for v in VARIANTS)
        out["diff"] = e - b
        out["diff_ci"] = percentile_ci(reps["etsdm"] - reps["baseline"], estimate=e - b)
        out["rel"] = e / b - 1
        out["rel_ci"] = percentile_ci(reps["etsdm"] / reps["baseline"] - 1, estimate=e / b - 1)
    return out


def per_class_fd(f: torch.Tensor, labels: torch.Tensor, real_f: torch.Tensor,
                 real_y: torch.Tensor) -> float:
    return float(np.mean([frechet_distance(f[labels == c], real_f[real_y == c]) for c in range(10)]))


def run_setting(name: str, args) -> dict:
    sched, sharing, eval_eps = setting(name)
    x, y = load_digits("train")
    real_x, real_y = load_digits("test")
    real_f = digits_features(real_x)
    models, info = {}, {}
    for v in VARIANTS:
        model = build_model(args, sched.continuous)
        start = time.perf_counter()
        models[v] = train(model, (x, y), sched, steps=args.train_steps, batch_size=args.batch,
                          warmup=min(200, args.train_steps // 5), seed=args.seed, progress=False,
                          time_sharing=sharing if v == "etsdm" else None, device="cpu")
        info[v] = {"train_s": round(time.perf_counter() - start, 1),
                   "params": sum(p.numel() for p in model.parameters())}
        info[v]["lipschitz"] = lipschitz_summary(models[v], sched, sharing, args,
                                                 shared=v == "etsdm")
        print(f"[{name}] trained {v}: {args.train_steps} steps in {info[v]['train_s']} s, "
              f"K near 0 = {info[v]['lipschitz']['K_near0']:.4g}", flush=True)

    n = args.n
    labels = torch.arange(n) % 10
    seeds = list(range(args.seed * 1_000_003, args.seed * 1_000_003 + n))
    g = torch.Generator().manual_seed(args.seed + 17)
    idx_g = bootstrap_indices(n, args.replicates, g)
    idx_r = bootstrap_indices(len(real_f), args.replicates, g)
    # noise floor: n real training digits (class-balanced like the samples) vs held-out
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    floor_x = torch.cat([x[perm][y[perm] == c] for c in range(10)])
    floor_y = torch.cat([y[perm][y[perm] == c] for c in range(10)])
    take = torch.cat([torch.nonzero(floor_y == c).flatten()[:math.ceil(n / 10)] for c in range(10)])[:n]
    floor_f, floor_lab = digits_features(floor_x[take]), floor_y[take]
    floor_idx = bootstrap_indices(len(take), args.replicates, g)
    floor = {"n": len(take), **fd_stats({"real": floor_f}, real_f, floor_idx, idx_r)["real"],
             "per_class_fd": per_class_fd(floor_f, floor_lab, real_f, real_y)}
    print(f"[{name}] noise floor (n={len(take)} train vs 360 held-out): FD {floor['fd']:.2f} "
          f"[{floor['fd_ci'][0]:.2f}, {floor['fd_ci'][1]:.2f}]", flush=True)

    rows = []
    for t_eps in eval_eps:
        ev = NoiseSchedule.vp_linear(0.1, 20.0, t_eps=t_eps) if t_eps is not None else sched
        for sampler in args.samplers:
            for k in args.steps:
                feats, row = {}, {"setting": name, "t_eps": t_eps if t_eps else 1.0 / sched.T,
                                  "sampler": sampler, "steps": k}
                for v in VARIANTS:
                    start = time.perf_counter()
                    with torch.no_grad():
                        s = fastdiff.sample(models[v], (n, 1, 8, 8), schedule=ev, sampler=sampler,
                                            steps=k, cond=labels, seeds=seeds, progress=False,
                                            time_sharing=sharing if v == "etsdm" else None,
                                            **sample_kwargs(ev))
                    feats[v] = digits_features(s)
                    correct = (classify(s) == labels).double()
                    row[v] = {"acc": correct.mean().item(),
                              "acc_ci": percentile_ci(correct[idx_g].mean(1)),
                              "per_class_fd": per_class_fd(feats[v], labels, real_f, real_y),
                              "sample_s": round(time.perf_counter() - start, 2)}
                for key, val in fd_stats(feats, real_f, idx_g, idx_r).items():
                    if key in VARIANTS:
                        row[key].update(val)
                    else:
                        row[key] = val
                rows.append(row)
                b, e = row["baseline"], row["etsdm"]
                print(f"[{name}] t_eps={row['t_eps']:.0e} {sampler:>8} {k:>2} steps: FD "
                      f"{b['fd']:.2f} -> {e['fd']:.2f}  ({100 * row['rel']:+.1f}% "
                      f"[{100 * row['rel_ci'][0]:+.1f}, {100 * row['rel_ci'][1]:+.1f}])", flush=True)
    return {"setting": name, "schedule": sched.to_recipe(), "sharing": [sharing.t_tilde, sharing.n],
            "models": info, "floor": floor, "rows": rows,
            "config": {k: v for k, v in vars(args).items() if k not in ("only", "report", "out")}}


def verdict(row) -> str:
    lo, hi = row["rel_ci"]
    if hi < 0:
        return "E-TSDM better"
    if lo > 0:
        return "E-TSDM worse"
    return "no difference"


def _centre(d: dict, key: str, ci: str) -> None:
    # the interval's width centred on the estimate (what percentile_ci(estimate=) returns;
    # idempotent, so parts written by an earlier, reflected-interval run read the same)
    lo, hi = d[ci]
    d[ci] = [d[key] - (hi - lo) / 2, d[key] + (hi - lo) / 2]


def report(parts: list, args) -> dict:
    from scipy.stats import spearmanr

    for p in parts:
        _centre(p["floor"], "fd", "fd_ci")
        for r in p["rows"]:
            _centre(r, "diff", "diff_ci")
            _centre(r, "rel", "rel_ci")
            for v in VARIANTS:
                _centre(r[v], "fd", "fd_ci")

    print(f"\nFD to the 360 held-out digits (lower is better), 95% bootstrap intervals; "
          f"n = {parts[0]['config']['n']} samples per cell, {parts[0]['config']['replicates']} replicates")
    print("| setting | t_eps | sampler | steps | FD baseline | FD E-TSDM | E-TSDM vs baseline | "
          "verdict | acc base / E-TSDM | floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    points = []  # (sampler, steps, K near 0, FD) per model and evaluation
    for p in parts:
        fl = p["floor"]
        for r in p["rows"]:
            b, e = r["baseline"], r["etsdm"]
            print(f"| {r['setting']} | {r['t_eps']:.0e} | {r['sampler']} | {r['steps']} | "
                  f"{b['fd']:.2f} [{b['fd_ci'][0]:.2f}, {b['fd_ci'][1]:.2f}] | "
                  f"{e['fd']:.2f} [{e['fd_ci'][0]:.2f}, {e['fd_ci'][1]:.2f}] | "
                  f"{100 * r['rel']:+.1f}% [{100 * r['rel_ci'][0]:+.1f}, {100 * r['rel_ci'][1]:+.1f}] | "
                  f"{verdict(r)} | {100 * b['acc']:.1f}% / {100 * e['acc']:.1f}% | {fl['fd']:.2f} |")
            for v in VARIANTS:
                points.append((r["sampler"], r["steps"], p["models"][v]["lipschitz"]["K_near0"],
                               r[v]["fd"], f"{r['setting']}@{r['t_eps']:.0e}/{v}"))
    print("\nLipschitz constant in t (finite differences, per unit of normalised time, mean over "
          "held-out digits) and training time")
    print("| setting | model | mean K, t < t~ | median K, t < t~ | mean K, t~ <= t < 2 t~ | max K "
          "| train s | params |")
    print("|---|---|---|---|---|---|---|---|")
    for p in parts:
        tt = p["sharing"][0] / (1 if isinstance(p["sharing"][0], float) else 1000)
        for v in VARIANTS:
            m = p["models"][v]
            L = m["lipschitz"]
            # the median skips E-TSDM's few boundary jumps: K inside the shared sub-intervals
            L["K_median_near0"] = float(np.median([k for t, k in zip(L["t"], L["K"]) if t < tt]))
            print(f"| {p['setting']} | {v} | {L['K_near0']:.4g} | {L['K_median_near0']:.4g} | "
                  f"{L['K_after']:.4g} | {L['K_max']:.4g} | {m['train_s']} | {m['params']} |")
    corr = {}
    for sampler in sorted({q[0] for q in points}):
        for k in sorted({q[1] for q in points}):
            sel = [q for q in points if q[0] == sampler and q[1] == k]
            if len(sel) >= 3:
                rho, pv = spearmanr([q[2] for q in sel], [q[3] for q in sel])
                corr[f"{sampler}/{k}"] = {"spearman": float(rho), "p": float(pv), "n": len(sel)}
    print("\nDoes a higher K near 0 predict a worse FD? Spearman rank correlation over all "
          "(model, evaluation) pairs:")
    for key, c in corr.items():
        print(f"  {key:>12} steps: rho = {c['spearman']:+.2f} (p = {c['p']:.2f}, {c['n']} points)")
    counts = {}
    for p in parts:
        for r in p["rows"]:
            counts.setdefault(r["setting"], []).append(verdict(r))
    print("\nVerdicts per setting (95% interval of the relative FD change):")
    for s, vs in counts.items():
        print(f"  {s:>10}: " + ", ".join(f"{vs.count(x)} {x}" for x in
                                          ("E-TSDM better", "no difference", "E-TSDM worse")))
    if args.plot:
        plot(parts, points, args.plot)
    return {"parts": parts, "spearman": corr, "verdicts": counts}


def plot(parts, points, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.2), dpi=110)
    ax_d, ax_c, ax_s = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    colors = {"cosine": "C0", "quadratic": "C1", "linear": "C2", "vp_linear": "C3"}
    for p in parts:
        ax = ax_c if p["setting"] == "vp_linear" else ax_d
        for v in VARIANTS:
            L = p["models"][v]["lipschitz"]
            ax.plot(L["t"], L["K"], color=colors.get(p["setting"], "k"),
                    ls="-" if v == "baseline" else "--", lw=1, label=f"{p['setting']} {v}")
    ax_d.set(yscale="log", xlabel="t / T", ylabel="K(t) per unit t/T",
             title="discrete T = 1000 (solid: baseline, dashed: E-TSDM)")
    ax_c.set(xscale="log", yscale="log", xlabel="t", title="continuous VP linear")
    for ax in (ax_d, ax_c):
        ax.legend(fontsize=7)
    for sampler, marker in (("ddim", "o"), ("dpm++2m", "s")):
        sel = [q for q in points if q[0] == sampler and q[1] == min(q[1] for q in points)]
        ax_s.scatter([q[2] for q in sel], [q[3] for q in sel], marker=marker, label=sampler, s=18)
    ax_s.set(xscale="log", xlabel="mean K for t < t~", ylabel="FD",
             title=f"FD at {min(q[1] for q in points)} steps vs K near 0")
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=SETTINGS, default=None,
                   help="run these settings and write their JSON parts (no report)")
    p.add_argument("--report", action="store_true", help="only report from the JSON parts")
    p.add_argument("--out", default="benchmarks/results/etsdm", help="folder of the JSON parts")
    p.add_argument("--json", default="benchmarks/results/etsdm_study.json")
    p.add_argument("--plot", default="docs/etsdm_study.png")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=16, help="UNet base channels")
    p.add_argument("--n", type=int, default=500, help="samples per (model, sampler, steps)")
    p.add_argument("--replicates", type=int, default=200, help="bootstrap replicates")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    p.add_argument("--probe-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    todo = [] if args.report else (args.only if args.only is not None else list(SETTINGS))
    os.makedirs(args.out, exist_ok=True)
    for name in todo:
        part = run_setting(name, args)
        atomic_write_text(json.dumps(part, indent=1), os.path.join(args.out, f"{name}.json"))
    if args.only is not None:
        return 0
    parts = []
    for name in SETTINGS:
        path = os.path.join(args.out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                parts.append(json.load(f))
    if not parts:
        raise SystemExit(f"no results under {args.out}; run without --report first")
    out = report(parts, args)
    if args.json:
        atomic_write_text(json.dumps(out, indent=1), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
