"""Average brightness at t = 1: plain sampling vs SingDiffusion vs a zero-terminal-SNR model.

Usage (from the repository root):

    python benchmarks/bench_brightness.py                 # the table, the plot (shipped models)
    python benchmarks/bench_brightness.py --train         # retrain the three shipped models

See docs/singdiffusion.md for what is measured and why.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import fastdiff
from fastdiff import metrics, singular
from fastdiff.data import load_brightness, load_digits
from fastdiff.train import atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "fastdiff", "assets")

# The base models: a small class-conditional UNet (no attention: 8x8 images, CPU budget).
NET = dict(in_channels=1, channels=24, channel_mult=(1, 2), num_res_blocks=1,
           attention_levels=(), mid_attention=False, num_classes=13)
# SD-1.5's schedule (non-zero terminal SNR) and the zero-terminal-SNR rescale of it.
SCHEDULES = {
    "brightness": dict(rescale_zero_terminal_snr=False, prediction_type="epsilon"),
    "brightness-zsnr": dict(rescale_zero_terminal_snr=True, prediction_type="v_prediction"),
}
TRAIN_STEPS = 2000


def schedule_for(name: str) -> fastdiff.NoiseSchedule:
    return fastdiff.NoiseSchedule.scaled_linear(
        1000, 0.00085, 0.012,
        rescale_zero_terminal_snr=SCHEDULES[name]["rescale_zero_terminal_snr"])


def train_base(name: str, out: str) -> None:
    torch.manual_seed(0)
    net = fastdiff.UNet(**NET, prediction_type=SCHEDULES[name]["prediction_type"])
    data = load_brightness("train")
    t0 = time.time()
    fastdiff.train.train(net, data, schedule_for(name), steps=TRAIN_STEPS, seed=0,
                         ckpt_every=250, progress=False, out_dir=out,
                         extra_config={"command": " ".join(["python"] + sys.argv),
                                       "data": "fastdiff.data.load_brightness('train')"})
    print(f"{name}: trained in {time.time() - t0:.0f} s -> {out}", flush=True)


def train_initial(out: str) -> None:
    # The command the README shows: fastdiff fit-initial (a 13-class time-free UNet).
    from fastdiff.cli import main as cli
    t0 = time.time()
    cli(["fit-initial", "--data", "brightness", "--steps", "800", "--seed", "0",
         "--no-progress", "--out", out])
    print(f"initial predictor: trained in {time.time() - t0:.0f} s -> {out}", flush=True)


# -- evaluation ---------------------------------------------------------------------------

GROUPS = {"digits": list(range(10)), "inverted": [10], "black": [11], "white": [12]}


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean pixel value in model units [-1, 1] (-1 black, +1 white), clipped
    to the data range first."""
    return x.clamp(-1, 1).flatten(1).mean(1).double()


def w1(a: torch.Tensor, b: torch.Tensor, b_weights: torch.Tensor | None = None) -> float:
    from scipy.stats import wasserstein_distance
    return float(wasserstein_distance(a.numpy(), b.numpy(), None,
                                      None if b_weights is None else b_weights.numpy()))


def methods(args):
    """name -> (model, schedule, spacing, sample kwargs)."""
    base, sched = fastdiff.pretrained("brightness")
    zsnr, zsched = fastdiff.pretrained("brightness-zsnr")
    cm = singular.ClassMeans(load_brightness("train"))
    learned = singular.load_initial_predictor("brightness-initial")
    sd = dict(spacing="leading", steps_offset=1)  # SD-1.5's scheduler settings
    return {
        "plain": (base, sched, sd, {}),
        "SingDiffusion, class means": (base, sched, sd, dict(initial="singdiffusion",
                                                              initial_predictor=cm)),
        "SingDiffusion, learned": (base, sched, sd, dict(initial="singdiffusion",
                                                         initial_predictor=learned)),
        "plain, trailing": (base, sched, dict(spacing="trailing"), {}),
        "zero-SNR v-pred, trailing": (zsnr, zsched, dict(spacing="trailing"), {}),
    }


def run_cell(model, sched, spacing, kw, sampler, steps, labels, seeds, guidance=1.0, rescale=0.0):
    extra = {}
    if guidance != 1.0:
        extra = dict(guidance_scale=guidance, uncond=torch.full_like(labels, 13))
        if rescale:
            extra["guidance_rescale"] = rescale
    with torch.no_grad():
        return fastdiff.sample(model, (len(labels), 1, 8, 8), schedule=sched, sampler=sampler,
                               steps=steps, cond=labels, seeds=seeds, progress=False,
                               **spacing, **kw, **extra)


def evaluate(x, labels, ref_x, ref_y):
    b, rb = brightness(x), brightness(ref_x)
    row = {}
    for g, classes in GROUPS.items():
        m = torch.isin(labels, torch.tensor(classes))
        rm = torch.isin(ref_y, torch.tensor(classes))
        row[g] = {"mean": float(b[m].mean()), "data": float(rb[rm].mean()),
                  "err": float(b[m].mean() - rb[rm].mean()), "w1": w1(b[m], rb[rm])}
    # Overall: the data reweighted to the samples' class proportions (13 classes).
    weights = (torch.bincount(labels, minlength=13).double() / torch.bincount(ref_y, minlength=13))[ref_y]
    row["all"] = {"w1": w1(b, rb, weights)}
    digits = labels < 10
    row["fd"] = metrics.digits_fd(x[digits])
    row["class_acc"] = float((metrics.classify(x[digits]) == labels[digits]).float().mean())
    return row


def fd_noise(n_per_class: int, reps: int = 5):
    """FD of real train digits (n per class, random subsets) to the held-out digits: the
    estimator's floor (mean) and noise (std) at this sample size."""
    x, y = load_digits("train")
    g = torch.Generator().manual_seed(1)
    vals = []
    for _ in range(reps):
        idx = torch.cat([torch.nonzero(y == k).flatten()[torch.randperm(int((y == k).sum()), generator=g)[:n_per_class]]
                         for k in range(10)])
        vals.append(metrics.digits_fd(x[idx]))
    v = torch.tensor(vals)
    return float(v.mean()), float(v.std())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true", help="retrain the shipped models")
    p.add_argument("--only", choices=sorted(SCHEDULES) + ["initial"], action="append",
                   help="with --train: train only these")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-class", type=int, default=40, help="samples per class and cell")
    p.add_argument("--cells", default="ddim:10,ddim:25,ddim:50,dpm++2m:10,dpm++2m:25,euler:10",
                   help="sampler:steps,...")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bench_brightness.json"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "brightness.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train:
        for name in SCHEDULES:
            if args.only is None or name in args.only:
                train_base(name, os.path.join(args.runs, name))
        if args.only is None or "initial" in args.only:
            train_initial(os.path.join(args.runs, "brightness-initial"))
        return 0

    t0 = time.time()
    ref_x, ref_y = load_brightness("test")
    labels = torch.arange(13).repeat_interleave(args.per_class)
    seeds = list(range(len(labels)))
    floor, noise = fd_noise(args.per_class)
    ms = methods(args)
    results = {"per_class": args.per_class, "fd_real_floor": floor, "fd_real_std": noise,
               "cells": []}
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    keep = {}
    for sampler, steps in cells:
        for name, (model, sched, spacing, kw) in ms.items():
            x = run_cell(model, sched, spacing, kw, sampler, steps, labels, seeds)
            row = evaluate(x, labels, ref_x, ref_y)
            results["cells"].append({"sampler": sampler, "steps": steps, "method": name, "guidance": 1.0,
                                     **row})
            if (sampler, steps) == ("ddim", 25):
                keep[name] = x
            print(f"{sampler:8s} {steps:3d} {name:28s} " + " ".join(
                f"{g}:{row[g]['err']:+.3f}/{row[g]['w1']:.3f}" for g in GROUPS) +
                f" fd:{row['fd']:.2f}", flush=True)
    # Classifier-free guidance (w = 3) with and without guidance rescale, DDIM 25 steps.
    for name in ("plain", "SingDiffusion, class means", "zero-SNR v-pred, trailing"):
        model, sched, spacing, kw = ms[name]
        for phi in (0.0, 0.7):
            x = run_cell(model, sched, spacing, kw, "ddim", 25, labels, seeds, guidance=3.0, rescale=phi)
            row = evaluate(x, labels, ref_x, ref_y)
            results["cells"].append({"sampler": "ddim", "steps": 25, "method": name, "guidance": 3.0,
                                     "guidance_rescale": phi, **row})
            print(f"ddim      25 w=3 phi={phi} {name:28s} " + " ".join(
                f"{g}:{row[g]['err']:+.3f}/{row[g]['w1']:.3f}" for g in GROUPS) +
                f" fd:{row['fd']:.2f}", flush=True)
    results["wall_s"] = round(time.time() - t0, 1)
    results["torch"] = torch.__version__
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    atomic_write_text(json.dumps(results, indent=1) + "\n", args.json)
    print(table(results))
    plot(keep, ref_x, ref_y, labels, args.plot)
    print(f"wall {results['wall_s']} s; wrote {args.json} and {args.plot}")
    return 0


def table(results) -> str:
    lines = [f"Brightness error (sample mean - data mean, pixel units in [-1, 1]) and W1 between the "
             f"per-image mean-brightness distributions; {results['per_class']} samples per class; "
             f"FD of the digit classes (real-data floor {results['fd_real_floor']:.2f} "
             f"+- {results['fd_real_std']:.2f}).", "",
             "| sampler | steps | w | method | black err | white err | inverted err | digits err "
             "| black W1 | white W1 | inverted W1 | digits W1 | all W1 | digits FD |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        w = f"{c['guidance']:g}" + (f", phi {c['guidance_rescale']:g}" if c.get("guidance_rescale") else "")
        lines.append(f"| {c['sampler']} | {c['steps']} | {w} | {c['method']} | "
                     + " | ".join(f"{c[g]['err']:+.3f}" for g in ("black", "white", "inverted", "digits"))
                     + " | " + " | ".join(f"{c[g]['w1']:.3f}" for g in ("black", "white", "inverted", "digits"))
                     + f" | {c['all']['w1']:.3f} | {c['fd']:.2f} |")
    return "\n".join(lines)


def plot(keep, ref_x, ref_y, labels, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(keep)
    show = [11, 12, 10, 3, 7]  # black, white, inverted, two digit classes
    n = 8
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(3.0 * (len(names) + 1), 6.4),
                             gridspec_kw={"height_ratios": [1.1, 1]})

    real = [ref_x[ref_y == k][:n] for k in show]
    panels = [("held-out data", real)] + [(m, [keep[m][labels == k][:n] for k in show]) for m in names]

    def pad(img):  # a mid-grey frame keeps black and white images apart
        return torch.nn.functional.pad(img, (1, 1, 1, 1), value=0.0)

    for j, (title, per) in enumerate(panels):
        img = torch.cat([torch.cat([pad(i) for i in p.clamp(-1, 1)[:, 0]], 1) for p in per], 0)
        axes[0, j].imshow(img.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        axes[0, j].set_title(title, fontsize=9)
        axes[0, j].axis("off")
    colors = {"black": "k", "white": "0.6", "inverted": "tab:blue", "digits": "tab:orange"}
    bins = torch.linspace(-1, 1, 41).numpy()
    for j, (title, _) in enumerate(panels):
        ax = axes[1, j]
        for g, classes in GROUPS.items():
            if j == 0:
                b = brightness(ref_x[torch.isin(ref_y, torch.tensor(classes))])
            else:
                b = brightness(keep[title][torch.isin(labels, torch.tensor(classes))])
            ax.hist(b.numpy(), bins=bins, histtype="step", color=colors[g], label=g, density=True)
        ax.set_xlabel("per-image mean brightness")
        if j == 0:
            ax.legend(fontsize=7)
    fig.suptitle("DDIM, 25 steps, w = 1 (eps model: leading spacing). Grid rows: near-solid black, "
                 "near-solid white, inverted digits, digits 3 and 7 (shown with -1 = black)", fontsize=10)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
