"""Command line: ``fastdiff info | sample | lipschitz | train``.

Each subcommand is one ``_add_<name>`` function that declares its arguments and one
``_run_<name>`` function that runs it; heavy imports happen inside the run function so
``fastdiff --help`` stays fast. Bad values fail before any work starts: numbers through
the argument types below, output paths and optional dependencies at the top of each run
function. A ValueError, TypeError, OSError or ImportError is printed as
``fastdiff <command>: error: <message>`` with exit status 2, as argparse does; ``--debug``
or ``FASTDIFF_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from ._files import atomic_open, atomic_write_text


def _number(kind, ok, expected: str):
    """An argparse type: ``kind(text)`` if it is finite and ``ok``, else a usage error."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


_POSITIVE_INT = _number(int, lambda v: v >= 1, "an integer >= 1")
_COUNT = _number(int, lambda v: v >= 0, "an integer >= 0")
_SEED = _number(int, lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2**63)")
_POSITIVE = _number(float, lambda v: v > 0, "a number > 0")
_FRACTION = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_FINITE = _number(float, lambda v: True, "a finite number")


def _check_output_file(path: str, flag: str) -> None:
    """Fail now, not after the work, if ``path`` cannot be written as a file (its folder
    is created, as writing it would)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; expected a file name, e.g. "
                         f"{os.path.join(path, 'out.png')!r}")
    _check_output_dir(os.path.dirname(os.path.abspath(path)), flag, path)


def _check_output_dir(folder: str, flag: str, shown: str | None = None) -> None:
    import tempfile
    shown = folder if shown is None else shown
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {shown!r}: {existing!r} exists and is not a directory")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # the only sure test (read-only mounts, ACLs)
            pass
    except OSError as e:
        raise ValueError(f"{flag} {shown!r} cannot be written: {e.strerror or e}") from None


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
    p.add_argument("--t-tilde", type=_POSITIVE_INT, default=100, help="E-TSDM shared range [0, t~)")
    p.add_argument("--n", type=_POSITIVE_INT, default=5, help="E-TSDM number of shared sub-intervals")
    p.add_argument("--steps", type=_COUNT, default=4000)
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=128, help="global batch size")
    p.add_argument("--lr", type=_POSITIVE, default=1e-3)
    p.add_argument("--ema-decay", type=_FRACTION, default=0.999)
    p.add_argument("--grad-clip", type=_number(float, lambda v: v >= 0, "a number >= 0"),
                   default=1.0, help="max global gradient norm; 0: no clipping")
    p.add_argument("--p-uncond", type=_FRACTION, default=0.1,
                   help="label dropout probability (classifier-free guidance)")
    p.add_argument("--channels", type=_POSITIVE_INT, default=32, help="UNet base width")
    p.add_argument("--dropout", type=_FRACTION, default=0.0, help="UNet ResBlock dropout")
    p.add_argument("--size", type=int, default=8, choices=[8, 16], help="image size")
    p.add_argument("--prediction", default="epsilon",
                   choices=["epsilon", "v_prediction", "sample"])
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--ckpt-every", type=_POSITIVE_INT, default=500)
    p.add_argument("--threads", type=_POSITIVE_INT, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if OUT/checkpoint.pt exists")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", required=True, help="output folder (checkpoint, log, and the model: model.safetensors + model.json)")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    import os
    import time

    import torch
    import torch.distributed as dist

    from .data import digits_dataset
    from .nets import UNet
    from .schedules import NoiseSchedule, TimeSharing
    from .train import FINAL_CONFIG, train

    _check_output_dir(args.out, "--out")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device {args.device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device!r}: CUDA is not available here")
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
                 prediction_type=args.prediction, sample_size=args.size, dropout=args.dropout)
    start = time.time()
    try:
        train(model, digits_dataset("train", size=args.size), schedule, steps=args.steps,
              batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
              grad_clip=args.grad_clip or None, prediction=args.prediction,
              time_sharing=sharing, p_uncond=args.p_uncond, out_dir=args.out,
              resume=args.resume, ckpt_every=args.ckpt_every, progress=args.progress,
              seed=args.seed, device=args.device,
              extra_config={"command": "fastdiff " + " ".join(args.argv)})
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


def _add_fit_initial(sub):
    p = sub.add_parser("fit-initial", help="train a SingDiffusion initial predictor (time-free "
                       "UNet, MSE to E[x0 | c]); resumes if interrupted")
    p.add_argument("--data", default="brightness",
                   help="'brightness', 'digits', or a .pt file holding {'images': [N, C, H, W], "
                        "'cond': labels [N] | vectors [N, D] | images [N, D, h, w]} (optional)")
    p.add_argument("--steps", type=_COUNT, default=800)
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=128)
    p.add_argument("--lr", type=_POSITIVE, default=1e-3)
    p.add_argument("--ema-decay", type=_FRACTION, default=0.999)
    p.add_argument("--p-uncond", type=_FRACTION, default=0.1, help="condition dropout (guidance)")
    p.add_argument("--channels", type=_POSITIVE_INT, default=16, help="UNet base width")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--ckpt-every", type=_POSITIVE_INT, default=200)
    p.add_argument("--threads", type=_POSITIVE_INT, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", required=True,
                   help="output folder (checkpoint, log, model.safetensors + model.json)")
    p.set_defaults(run=_run_fit_initial)


def _run_fit_initial(args) -> int:
    import os

    import torch

    from . import singular
    from .data import load_brightness, load_digits

    _check_output_dir(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data == "brightness":
        images, cond = load_brightness("train")
    elif args.data == "digits":
        images, cond = load_digits("train")
    elif args.data.endswith(".pt") and os.path.isfile(args.data):
        d = torch.load(args.data, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or not isinstance(d.get("images"), torch.Tensor):
            raise ValueError(f"--data {args.data}: expected a dict with an 'images' tensor")
        images, cond = d["images"], d.get("cond")
    else:
        raise ValueError(f"--data must be 'brightness', 'digits' or an existing .pt file, "
                         f"got {args.data!r}")
    kind = {}
    if cond is not None and not cond.is_floating_point():
        kind = {"num_classes": int(cond.max()) + 1}
    elif cond is not None:
        kind = {"cond_channels": int(cond.shape[1])}
    torch.manual_seed(args.seed)
    model = singular.InitialPredictor(images.shape[1], channels=args.channels, channel_mult=(1, 2),
                                      num_res_blocks=1, attention_levels=(), mid_attention=False,
                                      **kind)
    data = images if cond is None else (images, cond)
    singular.fit_initial_predictor(
        model, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        ema_decay=args.ema_decay, p_uncond=args.p_uncond, out_dir=args.out, resume=args.resume,
        ckpt_every=args.ckpt_every, progress=args.progress, seed=args.seed, device=args.device,
        extra_config={"command": "fastdiff " + " ".join(args.argv), "data": args.data})
    print(json.dumps({"out": args.out}))
    return 0


# Shipped models `fastdiff sample --model` can draw from; any folder written by
# `fastdiff train` / fastdiff.save_model works too.
SAMPLE_MODELS = ("digits", "digits-baseline", "gaussian-mixture")


def _add_sample(sub):
    p = sub.add_parser("sample", help="draw samples with a fused sampler (default: the "
                       "shipped E-TSDM digits model, DPM-Solver++ 2M, 20 steps); writes a PNG "
                       "and reports the time and the distance to real data")
    p.add_argument("--model", default="digits", metavar="{" + ",".join(SAMPLE_MODELS) + "} or PATH",
                   help="digits / digits-baseline: the shipped class-conditional 8x8 models "
                   "(E-TSDM / without), scored by Frechet distance to held-out digits; "
                   "gaussian-mixture: 8 modes on a ring with its exact denoiser; PATH: a "
                   "folder written by `fastdiff train --out` or fastdiff.save_model (its "
                   "schedule and E-TSDM sharing are used)")
    p.add_argument("--sampler", default="dpm++2m", help="sampler name, one of fastdiff.SAMPLERS")
    p.add_argument("--steps", type=_POSITIVE_INT, default=20, help="sampler steps")
    p.add_argument("--n", type=_number(int, lambda v: v >= 2, "an integer >= 2"), default=None,
                   help="number of samples (default: 360 digits, 36 per class; 2000 points)")
    p.add_argument("--guidance", type=_FINITE, default=None,
                   help="classifier-free guidance scale for the digits models (default: none)")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the initial noise and all draws")
    p.add_argument("--out", default=None,
                   help="PNG written atomically (default: out/<model>.png)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--seeds", default=None,
                   help="sharded mode (digits models): one image per seed, e.g. 0-49999; --out is "
                   "then a folder of shards (resumable; works alone and under torchrun)")
    p.add_argument("--batch", type=_POSITIVE_INT, default=256, help="seeds per shard in sharded mode")
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
    tag = os.path.basename(os.path.normpath(args.model))
    out = args.out or os.path.join("out", f"{tag}.png")
    _check_output_file(out, "--out")
    Sampler(args.sampler, NoiseSchedule.linear(), args.steps)  # validate name and steps
    if args.model == "gaussian-mixture":
        summary, lines = _sample_gaussian(args, n, out)
    else:
        model, schedule = _load_cli_model(args.model)
        summary, lines = _sample_digits(args, n, out, model, schedule)
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
    model, schedule = _load_cli_model(args.model)
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


def _load_cli_model(name):
    """A shipped name or a saved folder -> (fastdiff UNet on 1-channel digits, schedule)."""
    from .model_io import load_model
    from .nets import UNet

    model, schedule = load_model(name)
    if not isinstance(model, UNet) or model.config["in_channels"] != 1 or \
            model.num_classes not in (None, 10) or model.sample_size not in (8, 16):
        raise ValueError(f"{name}: the CLI samples and probes fastdiff UNets on the digits "
                         "(1 channel, 8x8 or 16x16, 10 classes or unconditional); use "
                         "fastdiff.load_model and fastdiff.sample from Python for other models")
    if schedule is None or schedule.continuous:
        raise ValueError(f"{name}: no discrete noise schedule was saved with the model "
                         "(save it with fastdiff.save_model(..., schedule=...))")
    return model, schedule


def _sample_digits(args, n, out, model, schedule):
    import torch

    from .data import save_grid
    from .metrics import digits_fd

    size = model.sample_size
    labels = torch.arange(n) % 10
    seeds = list(range(args.seed, args.seed + n))
    x_T = torch.cat([torch.randn((1, 1, size, size), generator=torch.Generator().manual_seed(s))
                     for s in seeds])
    kw = dict(cond=labels if model.num_classes else None, seeds=seeds)
    if args.guidance is not None and model.num_classes:
        kw.update(guidance_scale=args.guidance, uncond=torch.full_like(labels, model.null_class))
    x, elapsed = _timed_sample(model, x_T, schedule, args, **kw)
    order = torch.argsort(labels, stable=True)  # one class per grid column block
    save_grid(x[order].view(10, -1, 1, size, size).transpose(0, 1).reshape(-1, 1, size, size)
              if n % 10 == 0 and model.num_classes else x, out)
    sharing = getattr(model, "time_sharing", None)
    summary = {"time_s": round(elapsed, 4), "ms_per_step": round(1000 * elapsed / args.steps, 3),
               "time_sharing": None if sharing is None else [sharing.t_tilde, sharing.n]}
    what = "class-conditional" if model.num_classes else "unconditional"
    lines = [
        f"fastdiff sample: {args.model} ({what} {size}x{size} digits, "
        f"{'E-TSDM ' + str(sharing) if sharing else 'no time sharing'}), sampler "
        f"{args.sampler}, {args.steps} steps, n={n}"
        f"{f' ({n // 10} per class)' if model.num_classes else ''}, seed {args.seed}",
        f"time: {elapsed:.3f} s ({summary['ms_per_step']:.2f} ms per step, model included)"]
    if size == 8:  # the FD classifier works on 8x8 digits
        fd = digits_fd(x)
        fd_real = digits_fd(_balanced_real(labels, args.seed))
        summary.update(fd_heldout=round(fd, 3), fd_real_train_vs_heldout=round(fd_real, 3))
        lines.append(f"Frechet distance to held-out real digits: {fd:.2f} "
                     f"(real train digits, same n: {fd_real:.2f}; lower is better)")
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
    """Scatter of the samples over exact draws; written atomically."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global state

    fig = Figure(figsize=(5, 5), dpi=120)
    ax = fig.add_subplot()
    ax.scatter(true[:, 0], true[:, 1], s=3, c="0.75", label="exact draws")
    ax.scatter(samples[:, 0].float(), samples[:, 1].float(), s=3, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def _add_lipschitz(sub):
    p = sub.add_parser("lipschitz", help="Lipschitz constant of a model in t near t = 0 "
                       "(E-TSDM vs baseline): plot K(t) = ||d eps/dt|| and write JSON")
    p.add_argument("--model", action="append", default=None,
                   help="repeatable; 'gaussian' (closed-form N(mu, s^2 I) data, exact eps*), an "
                   "embedded model (digits: trained with E-TSDM, probed through its sharing; "
                   "digits-baseline) or a folder written by `fastdiff train --out` / "
                   "fastdiff.save_model, conditioned on held-out digits' labels; a '+etsdm' "
                   "suffix probes a model through E-TSDM sharing (t~=100, n=5). Default: "
                   "gaussian and gaussian+etsdm")
    p.add_argument("--method", default="fd", choices=["auto", "jvp", "vjp", "fd"],
                   help="fd: the paper's ||eps(t) - eps(t+1)||; jvp/vjp: exact d eps/dt")
    p.add_argument("--t-max", type=_POSITIVE, default=None,
                   help="probe t in [0, t-max) (default 200 of 1000 steps: zoom near 0)")
    p.add_argument("--samples", type=_POSITIVE_INT, default=16, help="samples per timestep")
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=None,
                   help="(sample, t) pairs per model call")
    p.add_argument("--stat", default="mean", choices=["mean", "median", "max"])
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--out", default="out/lipschitz.png", help="plot (PNG), written atomically")
    p.add_argument("--json", default=None, help="also write every curve as JSON here (before "
                   "the plot; if the plot fails without --json, the curves go to OUT with .json)")
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
    model, schedule = _load_cli_model(name)
    x0, labels = load_digits("test", size=model.sample_size)
    idx = torch.randperm(x0.shape[0], generator=gen)[:samples]
    # conditioned on each held-out digit's own label
    kwargs = {"class_labels": labels[idx]} if model.num_classes else None
    return model, schedule, x0[idx], kwargs, model.time_sharing


def _run_lipschitz(args) -> int:
    import torch

    from . import distributed as dist
    from .probes import lipschitz_t
    from .schedules import TimeSharing

    names = args.model or ["gaussian", "gaussian+etsdm"]
    _check_output_file(args.out, "--out")
    if args.json:
        _check_output_file(args.json, "--json")
    jobs = []  # every model is resolved before the first probe starts
    for name in names:
        base, _, suffix = name.partition("+")
        if suffix not in ("", "etsdm"):
            raise ValueError(f"unknown suffix '+{suffix}' in {name!r} (only '+etsdm')")
        gen = torch.Generator().manual_seed(args.seed)  # same data and noise for every model
        try:
            model, schedule, x0, kwargs, trained_sharing = _probe_model(base, args.samples, gen)
        except KeyError as e:
            raise ValueError(str(e)) from None
        sharing = trained_sharing
        if suffix == "etsdm":
            sharing = TimeSharing.continuous() if schedule.continuous else TimeSharing()
        hi = 1.0 if schedule.continuous else schedule.T - 1
        t_max = args.t_max if args.t_max is not None else (0.2 if schedule.continuous else 200)
        if not 0 < t_max <= hi + 1:
            raise ValueError(f"--t-max must be in (0, {hi + 1:g}] for {name}, got {t_max:g}")
        if schedule.continuous:
            ts = torch.linspace(1e-3, t_max, 200, dtype=torch.float64)
        else:
            ts = torch.arange(0, min(int(t_max), hi + 1))
        jobs.append((name, model, schedule, x0, kwargs, sharing, ts, gen))

    dist.init()  # under torchrun: each probe's chunks are split over the ranks
    if dist.rank() != 0:
        args.progress = False
    curves = {}
    for name, model, schedule, x0, kwargs, sharing, ts, gen in jobs:
        res = lipschitz_t(model, x0, schedule, ts, method=args.method, generator=gen,
                          batch_size=args.batch_size, time_sharing=sharing,
                          progress=args.progress, model_kwargs=kwargs)
        summary = _k_summary(res, schedule, sharing, args.stat)
        res.meta.update(model=name, summary=summary)
        curves[name] = (res, sharing)
        if dist.rank() == 0:
            print(_k_headline(name, res.method, summary))
    if dist.rank() != 0:  # every rank has the whole result; rank 0 writes it
        return 0
    # The curves are on disk before the plot is tried: a failing plot loses no data.
    payload = json.dumps({"format": 1, "curves": {n: r.to_dict() for n, (r, _) in curves.items()}})
    if args.json:
        atomic_write_text(payload, args.json)
        print(f"wrote {os.path.abspath(args.json)}")
    try:
        _lipschitz_png(args, curves)
    except Exception as e:
        if _debug(args):
            raise
        saved = args.json
        if not saved:
            saved = os.path.splitext(args.out)[0] + ".json"
            atomic_write_text(payload, saved)
        print(f"fastdiff lipschitz: error: the plot failed ({type(e).__name__}: {e}); "
              f"the curves are in {os.path.abspath(saved)}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


def _k_summary(res, schedule, sharing, stat: str) -> dict:
    """The headline numbers of one K(t) curve: below / above the shared range [0, t~);
    for an E-TSDM model probed by fd, the sub-interval ends (where the fd pair straddles a
    jump of f(t), so K is a jump over the whole sub-interval) apart from the interior
    (where f(t) = f(t'), so K = 0)."""
    from .probes import _fd_partner
    from .schedules import TimeSharing

    k, ts = getattr(res, stat), res.timesteps
    split = (sharing or (TimeSharing.continuous() if schedule.continuous else TimeSharing())).t_tilde
    near = ts < split

    def mean(mask):
        return k[mask].mean().item() if mask.any() else float("nan")

    out = {"stat": stat, "t_split": float(split), "t_first": ts[0].item(), "k_first": k[0].item(),
           "below_split": mean(near), "above_split": mean(~near),
           "below_points": int(near.sum()), "above_points": int((~near).sum())}
    if sharing is not None and res.method == "fd":
        partner = _fd_partner(ts, schedule)
        f, f2 = sharing(ts).double(), sharing(partner).double()
        jump = near & (f != f2)
        # K times |t - t'| is ||eps(f(t)) - eps(f(t'))||; per unit of f it compares with a
        # model without sharing
        per_f = (k * (ts - partner).abs() / (f - f2).abs())[jump]
        out.update(interior=mean(near & ~jump), interior_points=int((near & ~jump).sum()),
                   jumps=mean(jump), jump_t=ts[jump].tolist(),
                   jump_size=(f - f2).abs()[jump].tolist(),
                   jumps_per_unit_f=per_f.mean().item() if per_f.numel() else float("nan"))
    return out


def _k_headline(name: str, method: str, s: dict) -> str:
    stat, split = s["stat"], s["t_split"]
    parts = [] if "jumps" in s else [f"t < {split:g}: {s['below_split']:.4g}"] * bool(s["below_points"])
    parts += [f"t >= {split:g}: {s['above_split']:.4g}"] * bool(s["above_points"])
    head = f"{name:>16s} [{method}]: K(t={s['t_first']:g}) = {s['k_first']:.4g}"
    head += (f"; {stat} K over " + ", over ".join(parts)) if parts else ""
    if "jumps" not in s:
        return head
    ends = ", ".join(f"{t:g}" for t in s["jump_t"])
    sizes = sorted({round(d, 6) for d in s["jump_size"]})
    return "\n".join([
        head,
        f"{'':16s}   t < {split:g} inside the shared sub-intervals ({s['interior_points']} "
        f"points): {s['interior']:.4g}",
        f"{'':16s}   t < {split:g} at the {len(s['jump_t'])} sub-interval ends t = {ends}: "
        f"{s['jumps']:.4g}, where f(t) jumps by {', '.join(f'{d:g}' for d in sizes)} "
        f"({s['jumps_per_unit_f']:.4g} per unit of the network's time input)"])


def _lipschitz_png(args, curves) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for name, (res, sharing) in curves.items():
        label = name if sharing is None else f"{name} (E-TSDM t~={sharing.t_tilde:g}, n={sharing.n})"
        res.plot(ax=ax, label=label, stat=args.stat)
    for t_tilde in sorted({float(s.t_tilde) for _, s in curves.values() if s is not None}):
        ax.axvline(t_tilde, color="0.6", linestyle="--", linewidth=0.8)
    first = next(iter(curves.values()))[0]
    ax.set_title(f"Lipschitz constant in t ({args.stat} over {args.samples} samples, "
                 f"{first.method})", fontsize=9)
    ax.legend(fontsize=7)
    with atomic_open(args.out, "wb") as f:
        fig.savefig(f, format="png")


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
    import numpy as np
    import torch

    from . import distributed as dist
    from .metrics import digits_fd_sharded

    man_path = os.path.join(args.samples, dist.MANIFEST)
    if not os.path.exists(man_path):
        raise ValueError(f"{args.samples!r} has no {dist.MANIFEST}: not a finished sample folder")
    dist.init()
    with open(man_path) as f:
        shards = json.load(f)["shards"]
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
            print(json.dumps({"fd": fd, "n": n, "reference": args.reference,
                              "world_size": dist.world_size()}))
        else:
            print(f"Frechet distance of {n} samples in {args.samples} to the {args.reference} "
                  f"digits: {fd:.4f} ({dist.world_size()} process(es))")
    return 0


COMMANDS = [_add_info, _add_train, _add_sample, _add_lipschitz, _add_fd, _add_fit_initial]

# import name -> pip name, of what a command needs beyond torch (all in the default
# install; checked before the work starts, so a broken environment fails in a second).
_PIP = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "safetensors": "safetensors"}


def _needs(args) -> list[str]:
    if args.command in ("train", "fit-initial"):
        return ["sklearn", "safetensors"]
    if args.command == "sample":
        return ["matplotlib", "safetensors"] + ([] if args.model == "gaussian-mixture" else ["sklearn"])
    if args.command == "lipschitz":
        digits = any(m.partition("+")[0] != "gaussian" for m in args.model or [])
        return ["matplotlib", "safetensors"] + (["sklearn"] if digits else [])
    if args.command == "fd":
        return ["sklearn", "safetensors"]
    return []


def _missing(modules) -> list[str]:
    import importlib.util

    def importable(name):
        if name in sys.modules:  # None there means "import blocked"
            return sys.modules[name] is not None
        return importlib.util.find_spec(name) is not None

    return [m for m in modules if not importable(m)]


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("FASTDIFF_DEBUG", "") not in ("", "0")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.splitlines()[0])
    debug_help = "show the full traceback of an error (or set FASTDIFF_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command")
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():  # also accepted after the command; SUPPRESS keeps a
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=debug_help)  # top-level --debug from being reset
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else [str(a) for a in argv]  # as typed, for records
    if args.command is None:
        # argparse's convention for a missing required argument: usage on stderr, status 2
        parser.print_help(sys.stderr)
        return 2
    missing = _missing(_needs(args))
    if missing:  # before the work starts, so a broken environment fails in a second
        pip = " ".join(_PIP[m] for m in missing)
        print(f"fastdiff {args.command}: error: needs {', '.join(missing)}, which is not "
              f"installed (pip install {pip})", file=sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, OSError, ImportError) as e:
        if _debug(args):
            raise
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
