"""Command line: ``fastdiff info | sample | lipschitz | train``.

Each subcommand is one ``_add_<name>`` function that declares its arguments and one
``_run_<name>`` function that runs it; heavy imports happen inside the run function so
``fastdiff --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys


def _add_info(sub):
    p = sub.add_parser("info", help="backends, versions, and a self-check of every op")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from .selfcheck import selfcheck
    import fastdiff
    print(json.dumps({"fastdiff": fastdiff.__version__, **fastdiff.backends()}, indent=2))
    ok = selfcheck(verbose=True)
    return 0 if ok else 1


def _add_train(sub):
    p = sub.add_parser("train", help="train the small UNet on digits (E-TSDM or baseline); "
                       "runs data-parallel under torchrun")
    p.add_argument("--data", default="digits", choices=["digits"], help="training data set")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--etsdm", dest="etsdm", action="store_true", default=True,
                   help="E-TSDM time sharing of the network's time input (default)")
    g.add_argument("--baseline", dest="etsdm", action="store_false",
                   help="no time sharing (the plain DDPM baseline)")
    p.add_argument("--t-tilde", type=int, default=100, help="E-TSDM shared range [0, t~)")
    p.add_argument("--n", type=int, default=5, help="E-TSDM number of shared sub-intervals")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--p-uncond", type=float, default=0.1,
                   help="label dropout probability (classifier-free guidance)")
    p.add_argument("--channels", type=int, default=32, help="UNet base width")
    p.add_argument("--size", type=int, default=8, choices=[8, 16], help="image size")
    p.add_argument("--prediction", default="epsilon",
                   choices=["epsilon", "v_prediction", "sample"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if OUT/checkpoint.pt exists")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", required=True, help="output folder (checkpoint, log, model.pt)")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    import os
    import time

    import torch
    import torch.distributed as dist

    from .data import digits_dataset
    from .nets import UNet
    from .schedules import NoiseSchedule, TimeSharing
    from .train import FINAL_CONFIG, atomic_write_text, train

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    sharing = TimeSharing(args.t_tilde, args.n) if args.etsdm else None
    schedule = NoiseSchedule.linear(1000)
    torch.manual_seed(args.seed)  # model initialisation (identical on every rank)
    model = UNet(in_channels=1, channels=args.channels, channel_mult=(1, 2) if args.size == 8
                 else (1, 2, 2), num_res_blocks=2, attention_levels=(1,), num_classes=10,
                 prediction_type=args.prediction, sample_size=args.size)
    start = time.time()
    try:
        train(model, digits_dataset("train", size=args.size), schedule, steps=args.steps,
              batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
              grad_clip=args.grad_clip or None, prediction=args.prediction,
              time_sharing=sharing, p_uncond=args.p_uncond, out_dir=args.out,
              resume=args.resume, ckpt_every=args.ckpt_every, progress=args.progress,
              seed=args.seed, device=args.device,
              extra_config={"command": "fastdiff " + " ".join(sys.argv[1:])})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    elapsed = time.time() - start
    if int(os.environ.get("RANK", "0")) == 0:
        path = os.path.join(args.out, FINAL_CONFIG)
        with open(path) as f:
            summary = json.load(f)
        summary["wall_time_s"] = round(elapsed, 1)  # this invocation only (not resumed parts)
        atomic_write_text(json.dumps(summary, indent=2) + "\n", path)
        print(json.dumps({"out": args.out, "wall_time_s": round(elapsed, 1),
                          "final_loss": summary["train"]["final_loss"]}))
    return 0


# Models `fastdiff sample --model` can draw from (a trained digits model joins later).
SAMPLE_MODELS = ("digits", "digits-baseline", "gaussian-mixture")


def _add_sample(sub):
    p = sub.add_parser("sample", help="draw samples with a fused sampler (default: the "
                       "shipped E-TSDM digits model, DPM-Solver++ 2M, 20 steps); writes a PNG "
                       "and reports the time and the distance to real data")
    p.add_argument("--model", default="digits", choices=SAMPLE_MODELS,
                   help="digits / digits-baseline: the shipped class-conditional 8x8 models "
                   "(E-TSDM / without), scored by Frechet distance to held-out digits; "
                   "gaussian-mixture: 8 modes on a ring with its exact denoiser")
    p.add_argument("--sampler", default="dpm++2m", help="sampler name, one of fastdiff.SAMPLERS")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--n", type=int, default=None,
                   help="number of samples (default: 360 digits, 36 per class; 2000 points)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale for the digits models (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and all draws")
    p.add_argument("--out", default=None,
                   help="PNG written atomically (default: out/<model>.png)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--seeds", default=None,
                   help="sharded mode (digits models): one image per seed, e.g. 0-49999; --out is "
                   "then a folder of shards (resumable; works alone and under torchrun)")
    p.add_argument("--batch", type=int, default=256, help="seeds per shard in sharded mode")
    p.add_argument("--pack", action="store_true",
                   help="sharded mode: also write OUT/samples.npz (arr_0 [N, H, W, C] uint8, "
                   "arr_1 labels) at the end")
    p.set_defaults(run=_run_sample)


def _run_sample(args) -> int:
    import os

    from .samplers import Sampler
    from .schedules import NoiseSchedule

    if args.seeds is not None:
        return _run_sample_sharded(args)
    n = args.n if args.n is not None else (2000 if args.model == "gaussian-mixture" else 360)
    out = args.out or os.path.join("out", f"{args.model}.png")
    if n < 2 or args.steps < 1:
        print(f"fastdiff sample: error: need --n >= 2 and --steps >= 1, got {n}, {args.steps}",
              file=sys.stderr)
        return 2
    try:
        Sampler(args.sampler, NoiseSchedule.linear(), args.steps)  # validate name and steps
    except (ValueError, TypeError) as e:
        print(f"fastdiff sample: error: {e}", file=sys.stderr)
        return 2
    run = _sample_gaussian if args.model == "gaussian-mixture" else _sample_digits
    summary, lines = run(args, n, out)
    summary.update(model=args.model, sampler=args.sampler, steps=args.steps, n=n,
                   seed=args.seed, out=out)
    if args.json:
        print(json.dumps(summary))
    else:
        print("\n".join(lines + [f"wrote {os.path.abspath(out)}"]))
    return 0


def _digits_images(model, schedule, seeds, args):
    """Images of a class-conditional digits model for ``seeds``: the label of seed s is
    s % 10, the initial noise and the sampler's noise come from seed s alone."""
    import torch

    labels = torch.tensor(seeds) % 10
    x_T = torch.cat([torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(s))
                     for s in seeds])
    kw = dict(cond=labels, seeds=list(seeds))
    if args.guidance is not None:
        kw.update(guidance_scale=args.guidance, uncond=torch.full_like(labels, model.null_class))
    x, _ = _timed_sample(model, x_T, schedule, args, **kw)
    return x, labels


def _run_sample_sharded(args) -> int:
    """``fastdiff sample --seeds A-B --out DIR``: resumable shards, any world size."""
    import time

    import torch

    from . import distributed as dist
    from .data import to_pixels
    from .pretrained import pretrained

    if args.model == "gaussian-mixture":
        raise ValueError("--seeds (sharded sampling) needs a digits model, not gaussian-mixture")
    if args.n is not None:
        raise ValueError("give either --seeds (sharded mode) or --n, not both")
    seeds = dist.parse_seeds(args.seeds)
    dist.batches(seeds, args.batch)  # validates --batch
    if args.out is None:
        raise ValueError("--seeds needs --out DIR (the shard folder)")
    dist.init()
    options = {"model": args.model, "sampler": args.sampler, "steps": args.steps,
               "guidance": args.guidance, "batch": args.batch, "format": "uint8 NHWC"}
    store = dist.ShardDir(args.out, options)  # refuses a file in place of the folder
    model, schedule = pretrained(args.model)
    args.progress = args.progress and dist.rank() == 0

    def make(batch):
        x, labels = _digits_images(model, schedule, batch, args)
        pix = (to_pixels(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return {"arr_0": pix, "arr_1": labels.numpy()}

    start = time.perf_counter()
    res = dist.sample_shards(make, seeds, args.batch, store.path, options, progress=args.progress)
    elapsed = time.perf_counter() - start
    computed = dist.all_reduce_sum(torch.tensor([len(res["computed"])], dtype=torch.float64))
    if dist.rank() == 0:
        packed = dist.pack(args.out) if args.pack else None
        summary = {"n": len(seeds), "shards": len(res["manifest"]["shards"]),
                   "computed_shards": int(computed.item()), "world_size": dist.world_size(),
                   "time_s": round(elapsed, 3), "out": args.out, "packed": packed}
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"fastdiff sample: {len(seeds)} images of {args.model} in {summary['shards']} "
                  f"shards ({summary['computed_shards']} computed now, the rest were done) on "
                  f"{dist.world_size()} process(es), {elapsed:.2f} s; wrote {args.out}"
                  + (f" and {packed}" if packed else ""))
    return 0


def _timed_sample(model, x_T, schedule, args, **kw):
    import time

    import torch

    from .samplers import sample

    start = time.perf_counter()
    with torch.no_grad():
        x = sample(model, x_T=x_T, schedule=schedule, sampler=args.sampler, steps=args.steps,
                   progress=args.progress, **kw)
    return x, time.perf_counter() - start


def _sample_digits(args, n, out):
    import torch

    from .data import save_grid
    from .metrics import digits_fd
    from .pretrained import pretrained

    model, schedule = pretrained(args.model)
    labels = torch.arange(n) % 10
    seeds = list(range(args.seed, args.seed + n))
    x_T = torch.cat([torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(s))
                     for s in seeds])
    kw = dict(cond=labels, seeds=seeds)
    if args.guidance is not None:
        kw.update(guidance_scale=args.guidance, uncond=torch.full_like(labels, model.null_class))
    x, elapsed = _timed_sample(model, x_T, schedule, args, **kw)
    fd = digits_fd(x)
    fd_real = digits_fd(_balanced_real(labels, args.seed))
    order = torch.argsort(labels, stable=True)  # one class per grid column block
    save_grid(x[order].view(10, -1, 1, 8, 8).transpose(0, 1).reshape(-1, 1, 8, 8)
              if n % 10 == 0 else x, out)
    sharing = getattr(model, "time_sharing", None)
    summary = {"time_s": round(elapsed, 4), "ms_per_step": round(1000 * elapsed / args.steps, 3),
               "fd_heldout": round(fd, 3), "fd_real_train_vs_heldout": round(fd_real, 3)}
    lines = [
        f"fastdiff sample: {args.model} (class-conditional 8x8 digits, "
        f"{'E-TSDM ' + str(sharing) if sharing else 'no time sharing'}), sampler "
        f"{args.sampler}, {args.steps} steps, n={n} ({n // 10} per class), seed {args.seed}",
        f"time: {elapsed:.3f} s ({summary['ms_per_step']:.2f} ms per step, model included)",
        f"Frechet distance to held-out real digits: {fd:.2f} "
        f"(real train digits, same n: {fd_real:.2f}; lower is better)"]
    return summary, lines


def _balanced_real(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Real train digits with the same class counts as ``labels``: the FD yardstick. (A
    random subset would differ from the class-balanced held-out set in its class mix,
    which alone inflates the FD.)"""
    import torch

    from .data import load_digits

    real, real_labels = load_digits("train")
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    picks = [perm[real_labels[perm] == c][:int((labels == c).sum())] for c in range(10)]
    return real[torch.cat(picks)]


def _sample_gaussian(args, n, out):
    import torch

    from .gaussian import GaussianMixture, sliced_wasserstein
    from .schedules import NoiseSchedule

    mixture = GaussianMixture.ring(k=8, radius=2.0, std=0.15)
    schedule = NoiseSchedule.linear()
    gen = torch.Generator().manual_seed(args.seed)
    x_T = torch.randn((n, mixture.dim), generator=gen)
    x, elapsed = _timed_sample(mixture.as_model(schedule), x_T, schedule, args, generator=gen)
    true, true2 = mixture.sample(n, gen), mixture.sample(n, gen)
    proj_seed = args.seed + 1  # the same random directions for both distances
    sw = sliced_wasserstein(x, true, generator=torch.Generator().manual_seed(proj_seed))
    floor = sliced_wasserstein(true2, true, generator=torch.Generator().manual_seed(proj_seed))
    nearest = torch.cdist(x.double(), mixture.means).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=mixture.means.shape[0])
    summary = {"time_s": round(elapsed, 4), "ms_per_step": round(1000 * elapsed / args.steps, 3),
               "sliced_w1": round(sw, 5), "sliced_w1_exact_draws": round(floor, 5),
               "modes_hit": int((counts > 0).sum()),
               "mode_fractions": [round(float(c) / n, 4) for c in counts]}
    _scatter_png(out, x, true, f"{args.sampler}, {args.steps} steps: sliced W1 {sw:.4f} "
                 f"(exact draws {floor:.4f})")
    lines = [
        f"fastdiff sample: {args.model} (8 modes on a ring, exact denoiser), sampler "
        f"{args.sampler}, {args.steps} steps, n={n}, seed {args.seed}",
        f"time: {elapsed:.3f} s ({summary['ms_per_step']:.2f} ms per step, model included)",
        f"sliced Wasserstein-1 to the true mixture: {sw:.4f} (two exact draws of the same "
        f"size: {floor:.4f})",
        f"modes hit: {summary['modes_hit']}/{len(counts)}, smallest mode share "
        f"{min(summary['mode_fractions']):.3f} (ideal {1 / len(counts):.3f})"]
    return summary, lines


def _scatter_png(path, samples, true, title):
    """Scatter of the samples over exact draws; written to a temp file, then renamed."""
    import os
    import tempfile

    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global state

    fig = Figure(figsize=(5, 5), dpi=120)
    ax = fig.add_subplot()
    ax.scatter(true[:, 0], true[:, 1], s=3, c="0.75", label="exact draws")
    ax.scatter(samples[:, 0].float(), samples[:, 1].float(), s=3, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _add_lipschitz(sub):
    p = sub.add_parser("lipschitz", help="Lipschitz constant of a model in t near t = 0 "
                       "(E-TSDM vs baseline): plot K(t) = ||d eps/dt|| and write JSON")
    p.add_argument("--model", action="append", default=None,
                   help="repeatable; 'gaussian' (closed-form N(mu, s^2 I) data, exact eps*) or an "
                   "embedded model (digits: trained with E-TSDM, probed through its sharing; "
                   "digits-baseline), conditioned on held-out digits' labels; a '+etsdm' "
                   "suffix probes a model through E-TSDM sharing (t~=100, n=5). Default: "
                   "gaussian and gaussian+etsdm")
    p.add_argument("--method", default="fd", choices=["auto", "jvp", "vjp", "fd"],
                   help="fd: the paper's ||eps(t) - eps(t+1)||; jvp/vjp: exact d eps/dt")
    p.add_argument("--t-max", type=float, default=None,
                   help="probe t in [0, t-max) (default 200 of 1000 steps: zoom near 0)")
    p.add_argument("--samples", type=int, default=16, help="samples per timestep")
    p.add_argument("--batch-size", type=int, default=None, help="(sample, t) pairs per model call")
    p.add_argument("--stat", default="mean", choices=["mean", "median", "max"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/lipschitz.png", help="plot (PNG), written atomically")
    p.add_argument("--json", default=None, help="also write every curve as JSON here")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(run=_run_lipschitz)


class _GaussianInT:
    """Closed-form eps*(x, t) of ``fastdiff.gaussian.GaussianData``, differentiable in float t
    (the schedule's alpha() works on detached values): log alpha is interpolated linearly
    between integer steps, as NoiseSchedule does."""

    def __init__(self, data, schedule):
        import torch
        self.data, self.la = data, 0.5 * torch.log(schedule.alphas_cumprod)

    def __call__(self, x, t):
        import torch
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        i = torch.floor(t.detach()).clamp(0, self.la.numel() - 2).long()
        la = self.la[i] + (t - i) * (self.la[i + 1] - self.la[i])
        return self.data.eps(x, la.exp(), torch.sqrt(-torch.expm1(2 * la)))


def _probe_model(name, samples, gen):
    """name -> (model, schedule, x0 [samples, ...], model kwargs, the time sharing the
    weights were trained with)."""
    import torch

    from .schedules import NoiseSchedule
    if name == "gaussian":
        from .gaussian import GaussianData
        schedule = NoiseSchedule.linear(1000)
        # A narrow data distribution: its eps* is singular in t at t = 0 (docs/etsdm.md).
        data = GaussianData(torch.randn(64, generator=gen, dtype=torch.float64) * 0.5, s=0.002)
        x0 = data.sample(samples, gen).reshape(samples, 1, 8, 8)
        return _GaussianInT(data, schedule), schedule, x0, None, None
    from .data import load_digits
    from .pretrained import PRETRAINED, pretrained
    if name not in PRETRAINED:
        raise ValueError(f"unknown model {name!r}; choose 'gaussian' or one of {sorted(PRETRAINED)}")
    model, schedule = pretrained(name)
    x0, labels = load_digits("test", size=model.sample_size)
    idx = torch.randperm(x0.shape[0], generator=gen)[:samples]
    # conditioned on each held-out digit's own label
    return model, schedule, x0[idx], {"class_labels": labels[idx]}, model.time_sharing


def _run_lipschitz(args) -> int:
    import os
    import tempfile

    import torch
    from matplotlib.figure import Figure

    from .probes import lipschitz_t
    from .schedules import TimeSharing

    from . import distributed as dist

    names = args.model or ["gaussian", "gaussian+etsdm"]
    dist.init()  # under torchrun: the probe's chunks are split over the ranks
    if dist.rank() != 0:
        args.progress = False
    if args.samples < 1:
        print(f"fastdiff lipschitz: error: --samples must be >= 1, got {args.samples}", file=sys.stderr)
        return 2
    fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    curves, shared_at = {}, set()
    for name in names:
        base, _, suffix = name.partition("+")
        if suffix not in ("", "etsdm"):
            print(f"fastdiff lipschitz: error: unknown suffix '+{suffix}' in {name!r} "
                  "(only '+etsdm')", file=sys.stderr)
            return 2
        gen = torch.Generator().manual_seed(args.seed)  # same data and noise for every model
        try:
            model, schedule, x0, kwargs, trained_sharing = _probe_model(base, args.samples, gen)
        except (ValueError, KeyError, FileNotFoundError) as e:
            print(f"fastdiff lipschitz: error: {e}", file=sys.stderr)
            return 2
        sharing = trained_sharing
        if suffix == "etsdm":
            sharing = TimeSharing.continuous() if schedule.continuous else TimeSharing()
        hi = 1.0 if schedule.continuous else schedule.T - 1
        t_max = args.t_max if args.t_max is not None else (0.2 if schedule.continuous else 200)
        if not 0 < t_max <= hi + 1:
            print(f"fastdiff lipschitz: error: --t-max must be in (0, {hi + 1:g}], got {t_max:g}",
                  file=sys.stderr)
            return 2
        if schedule.continuous:
            ts = torch.linspace(1e-3, t_max, 200, dtype=torch.float64)
        else:
            ts = torch.arange(0, min(int(t_max), hi + 1))
        res = lipschitz_t(model, x0, schedule, ts, method=args.method, generator=gen,
                          batch_size=args.batch_size, time_sharing=sharing,
                          progress=args.progress, model_kwargs=kwargs)
        label = name if sharing is None else f"{name} (E-TSDM t~={sharing.t_tilde:g}, n={sharing.n})"
        res.meta["model"] = name
        curves[name] = res
        res.plot(ax=ax, label=label, stat=args.stat)
        if sharing is not None:
            shared_at.add(float(sharing.t_tilde))
        k = getattr(res, args.stat)
        split = (sharing or (TimeSharing.continuous() if schedule.continuous else TimeSharing())).t_tilde
        near = res.timesteps < split
        far = k[~near].mean().item() if (~near).any() else float("nan")
        if dist.rank() == 0:
            print(f"{name:>16s} [{res.method}]: K(t={res.timesteps[0].item():g}) = {k[0].item():.4g}; "
                  f"{args.stat} K over t < {split:g}: {k[near].mean().item():.4g}, "
                  f"over t >= {split:g}: {far:.4g}")
    if dist.rank() != 0:  # every rank has the whole result; rank 0 writes it
        return 0
    for t_tilde in sorted(shared_at):
        ax.axvline(t_tilde, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_title(f"Lipschitz constant in t ({args.stat} over {args.samples} samples, "
                 f"{curves[names[0]].method})", fontsize=9)
    ax.legend(fontsize=7)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {os.path.abspath(args.out)}")
    if args.json:
        from .probes import _atomic_write
        _atomic_write(args.json, json.dumps({"format": 1, "curves": {
            n: r.to_dict() for n, r in curves.items()}}))
        print(f"wrote {os.path.abspath(args.json)}")
    return 0


def _add_fd(sub):
    p = sub.add_parser("fd", help="Frechet distance of a folder of digit samples (from "
                       "`fastdiff sample --seeds ... --out DIR`) to real digits; under torchrun "
                       "the shards are split over the ranks and the feature sums reduced")
    p.add_argument("--samples", required=True, help="the shard folder (its manifest.json)")
    p.add_argument("--reference", default="test", choices=["test", "train", "all"],
                   help="real digits to compare with (default: the held-out ones)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(run=_run_fd)


def _run_fd(args) -> int:
    import json as _json
    import os

    import numpy as np
    import torch

    from . import distributed as dist
    from .metrics import digits_fd_sharded

    man_path = os.path.join(args.samples, dist.MANIFEST)
    if not os.path.exists(man_path):
        raise ValueError(f"{args.samples!r} has no {dist.MANIFEST}: not a finished sample folder")
    dist.init()
    with open(man_path) as f:
        shards = _json.load(f)["shards"]
    parts = []  # this rank's shards, one feature batch each (independent of the world size)
    for rec in shards[dist.rank_slice(len(shards))]:
        p = os.path.join(args.samples, rec["shard"])
        if dist._sha256(p) != rec["sha256"]:
            raise ValueError(f"{p} does not match its checksum in {dist.MANIFEST}: damaged")
        with np.load(p) as z:
            parts.append(torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).double() * (2.0 / 255.0) - 1.0)
    fd = digits_fd_sharded(parts, reference=args.reference)
    if dist.rank() == 0:
        n = sum(r["n"] for r in shards)
        if args.json:
            print(_json.dumps({"fd": fd, "n": n, "reference": args.reference,
                               "world_size": dist.world_size()}))
        else:
            print(f"Frechet distance of {n} samples in {args.samples} to the {args.reference} "
                  f"digits: {fd:.4f} ({dist.world_size()} process(es))")
    return 0


COMMANDS = [_add_info, _add_train, _add_sample, _add_lipschitz, _add_fd]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        # The main job with no arguments: sample the embedded default model.
        args = parser.parse_args(["sample"] if "sample" in sub.choices else ["info"])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
