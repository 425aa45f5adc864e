"""Diffusion training with E-TSDM time sharing: the loss and a small, exact training loop.

``diffusion_loss`` is docs/etsdm.md's objective: the forward process noises x0 at
the TRUE timestep t, the network is conditioned on the shared time f(t):

    x_t  = alpha_t x0 + sigma_t eps,   loss = || net(x_t, f(t)) - target ||^2

``train`` runs AdamW with EMA weights, gradient clipping, a tqdm bar, a JSON-lines loss
log and atomic checkpoints, and resumes exactly: N steps straight and k steps + resume to
N give bit-identical weights, dropout included (the global RNG the model draws from is
private to the run and saved in every checkpoint). Under ``torchrun`` it trains data-parallel
(DistributedDataParallel + DistributedSampler). Every random draw of a step (t, noise,
label dropout) is made for the GLOBAL batch from one seeded generator and each rank
takes its own rows, so the result does not depend on the number of processes (up to
float summation order); dropout inside the model is drawn per rank and is the exception.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import operator
import os
import time
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._files import atomic_save, atomic_write_text, remove_stale_temps
from .checkpoint import load_checkpoint, save_checkpoint as _write_checkpoint
from .model_io import CONFIG as FINAL_CONFIG, WEIGHTS as FINAL_WEIGHTS, save_model
from .nets import PREDICTION_TYPES
from .schedules import NoiseSchedule, TimeSharing
from .wrappers import model_output

__all__ = ["diffusion_loss", "train", "ema_update", "ema_decay_at", "atomic_save",
           "atomic_write_text", "load_checkpoint", "CHECKPOINT", "LOG", "FINAL_WEIGHTS",
           "FINAL_CONFIG"]

CHECKPOINT = "checkpoint.pt"   # full training state (resume), with a sha256
LOG = "log.jsonl"              # one JSON object per logged step
# The final EMA model in fastdiff's format (fastdiff.save_model): FINAL_WEIGHTS
# (model.safetensors) and FINAL_CONFIG (model.json: config, sharing, schedule, summary).
RESUME_HINT = "delete it or pass resume=False (CLI: --no-resume) to start over"


def _check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastdiff.schedules.NoiseSchedule, "
                        f"got {type(schedule).__name__}")
    return schedule


def _draw_t(schedule: NoiseSchedule, n: int, generator, device=None) -> torch.Tensor:
    """Training timesteps [n]: uniform integers in 0..T-1 (discrete), or float32 uniform
    in [t_eps, t_max] (continuous: the score-SDE / DPM-Solver convention)."""
    if not schedule.continuous:
        return torch.randint(0, schedule.T, (n,), generator=generator, device=device)
    lo, hi = schedule.t_eps, schedule.t_max
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _check_sharing(time_sharing):
    if time_sharing is not None and not isinstance(time_sharing, TimeSharing):
        raise TypeError(f"time_sharing must be a fastdiff.TimeSharing or None, "
                        f"got {type(time_sharing).__name__}")
    return time_sharing


def diffusion_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, *,
                   prediction: str = "epsilon", time_sharing: TimeSharing | None = None,
                   cond: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Denoising loss of one batch (mean squared error, a scalar float32 tensor).

    Args:
        model: ``model(x_t, f(t)[, class_labels=cond])`` -> prediction shaped like x0.
        x0: clean data [B, ...].
        schedule: a :class:`NoiseSchedule`: discrete (T timesteps) or continuous VP
            (``vp_linear`` / ``vp_cosine``, t in [0, 1]).
        prediction: the target: "epsilon" (eps), "v_prediction" (alpha eps - sigma x0)
            or "sample" (x0).
        time_sharing: E-TSDM f applied to the network's time input only; None = identity.
        cond: class labels [B] passed as ``class_labels`` (None: not passed).
        generator: RNG for t and noise when they are not given.
        t: int64 [B] timesteps in 0..T-1, or floating [B] times in [0, 1] for a
            continuous schedule (default: uniform draws, in [t_eps, t_max] if continuous).
        noise: eps shaped like x0 (default: standard normal draws).
    """
    _check_schedule(schedule)
    _check_sharing(time_sharing)
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or not x0.is_floating_point():
        raise ValueError("x0 must be a floating tensor [B, ...]")
    B, dev = x0.shape[0], x0.device
    if B < 1:
        raise ValueError(f"x0 must hold at least one sample, got shape {tuple(x0.shape)}")
    for name, v in (("t", t), ("noise", noise), ("cond", cond)):
        if v is not None and not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if cond is not None and (cond.dim() < 1 or cond.shape[0] != B):
        raise ValueError(f"cond must have one row per sample [{B}, ...], got {tuple(cond.shape)}")
    gdev = generator.device if generator is not None else dev
    if t is None:
        t = _draw_t(schedule, B, generator, gdev).to(dev)
    elif schedule.continuous and (t.shape != (B,) or not t.is_floating_point()):
        raise ValueError(f"t must be floating times in [0, 1] of shape [{B}] for the continuous "
                         f"{schedule.kind} schedule, got {t.dtype} {tuple(t.shape)}")
    elif not schedule.continuous and (t.shape != (B,) or t.is_floating_point() or t.is_complex()
                                      or t.dtype == torch.bool):
        raise ValueError(f"t must be integer timesteps of shape [{B}], got {t.dtype} {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(dev)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    bshape = (B,) + (1,) * (x0.dim() - 1)
    # Coefficients in float64 from the schedule's table at the TRUE t, then x0's dtype.
    alpha = schedule.alpha(t).to(dev, x0.dtype).reshape(bshape)
    sigma = schedule.sigma(t).to(dev, x0.dtype).reshape(bshape)
    x_t = alpha * x0 + sigma * noise
    t_net = time_sharing(t) if time_sharing is not None else t
    out = model_output(model(x_t, t_net) if cond is None else model(x_t, t_net, class_labels=cond))
    if out.shape != x0.shape:
        # mse_loss would broadcast a [1, ...] output against every sample's target
        raise ValueError(f"model output has shape {tuple(out.shape)}, expected x0's shape "
                         f"{tuple(x0.shape)}")
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = alpha * noise - sigma * x0
    else:
        target = x0
    return F.mse_loss(out.float(), target.float())


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay used for the update after ``step`` optimizer steps (0-based).

    ``min(decay, (1 + step) / (10 + step))``: a short warm-up so the average forgets the
    random initialisation quickly (as diffusers' EMAModel with ``use_ema_warmup=False``).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema_p <- decay * ema_p + (1 - decay) * p`` for every parameter; buffers copied."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    if len(e_params) != len(m_params):
        raise ValueError("ema_update: ema and model have different parameter lists")
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def _as_dataset(data) -> torch.utils.data.Dataset:
    if isinstance(data, torch.utils.data.Dataset):
        return data
    if isinstance(data, torch.Tensor):
        return torch.utils.data.TensorDataset(data)
    if isinstance(data, (tuple, list)) and all(isinstance(d, torch.Tensor) for d in data):
        return torch.utils.data.TensorDataset(*data)
    raise TypeError("data must be a Dataset of (image[, label]) items, a tensor of images, "
                    f"or a tuple (images, labels); got {type(data).__name__}")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _resumable_meta(**kw) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}


def _trim_log(path: str, last_step: int) -> None:
    # Lines logged after the checkpoint we resume from would be duplicated: drop them.
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError):
                break  # a torn last line from a crash
    atomic_write_text("".join(keep), path)


def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(v)  # Python and numpy integers
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be an int in [{lo}, {'inf' if hi is None else hi}], got {v}")
    return v


def _check_float(name: str, v, ok, expected: str) -> float:
    """``float(v)`` if v is a real number with ``ok(v)``; ``expected`` says which in errors."""
    import numbers
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(v).__name__}")
    v = float(v)
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{name} must be {expected}, got {v!r}")
    return v


@contextlib.contextmanager
def _run_rng(device: torch.device, seed: int, rank: int, state: dict | None):
    """The global RNG the model draws from while training (dropout, any ``torch.rand`` in
    its forward), private to the run: forked from the caller's and restored afterwards,
    seeded by (seed, rank), or set from a checkpoint's state on resume. Nothing else may
    draw from it inside the run (the DataLoader has its own generator): that is what
    makes k steps + resume equal N steps straight."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else 0
    with torch.random.fork_rng(devices=[index] if cuda else []):
        if state is None:
            # a different stream from the caller's usual torch.manual_seed(seed) (model init)
            digest = hashlib.blake2b(f"fastdiff.train.rng:{seed}:{rank}".encode(), digest_size=8)
            s = int.from_bytes(digest.digest(), "little") >> 1
            torch.default_generator.manual_seed(s)
            if cuda:
                torch.cuda.default_generators[index].manual_seed(s)
        else:
            torch.set_rng_state(state["torch"])
            if cuda and "cuda" in state:
                cs = state["cuda"]  # older checkpoints stored every device's state
                torch.cuda.set_rng_state(cs[index] if isinstance(cs, list) else cs, index)
        yield


def _rng_state(device: torch.device) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def train(model: nn.Module, data, schedule: NoiseSchedule, *, steps: int,
          batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
          warmup: int = 200, ema_decay: float = 0.999, grad_clip: float | None = 1.0,
          prediction: str | None = None, time_sharing: TimeSharing | None = None,
          p_uncond: float = 0.1, out_dir: str | None = None, resume: bool = True,
          ckpt_every: int = 500, log_every: int = 1, progress: bool = True, seed: int = 0,
          device: str | torch.device | None = None, extra_config: dict | None = None,
          loss_fn=None) -> nn.Module:
    """Train ``model`` in place and return its EMA copy (eval mode).

    Args:
        model: ``model(x, t, class_labels=None)``; a class-conditional model must expose
            ``null_class`` (the label used for dropout). Built (and seeded) by the caller.
        data: a Dataset of (image [C, H, W], label) or (image,) items; or a tensor of
            images [N, C, H, W]; or (images, labels).
        schedule: NoiseSchedule (forward process at the true t): discrete, or continuous
            VP (t uniform in [t_eps, t_max]; set t_eps with ``vp_linear(t_eps=...)``).
        steps: total optimizer steps (counting those of a resumed checkpoint).
        batch_size: GLOBAL batch; each of the ``world_size`` ranks gets
            ``batch_size // world_size`` rows (must divide).
        lr, weight_decay, warmup: AdamW; lr ramps linearly over ``warmup`` steps, then
            stays constant.
        ema_decay: EMA decay (with the warm-up of :func:`ema_decay_at`).
        grad_clip: max global grad norm, > 0 (None: no clipping).
        prediction: "epsilon" | "v_prediction" | "sample"; default the model's
            ``prediction_type`` or "epsilon".
        time_sharing: E-TSDM sharing for the network's time input (None: baseline).
            Stored on the returned EMA model as ``time_sharing``.
        p_uncond: probability of replacing a label by the null class (classifier-free
            guidance training); ignored for unlabeled data.
        out_dir: where ``checkpoint.pt``, ``log.jsonl`` and the EMA model
            (``fastdiff.save_model``: ``model.safetensors`` + ``model.json``, read back by
            ``fastdiff.load_model(out_dir)``) go (None: nothing is written, no resume).
        resume: continue from ``out_dir/checkpoint.pt`` if it exists (it is verified
            against its sha256; a damaged or foreign file raises ValueError).
        ckpt_every: checkpoint period in steps (and always at the end).
        log_every: log period in steps (loss averaged over ranks).
        seed: seeds the data order and every per-step draw, including the model's own
            (dropout): those come from the global RNG, which the run forks (the caller's
            state is left as it was), seeds from (seed, rank) and checkpoints.
        device: default: cuda:<LOCAL_RANK> when CUDA is available, else cpu.
        extra_config: JSON-safe dict merged into ``model.json`` (e.g. the command line).
        loss_fn: ``loss_fn(model, x0, t, noise, cond) -> scalar`` instead of
            :func:`diffusion_loss` (``t``, ``noise`` and the dropped-out ``cond`` are the
            step's seeded draws, so resume stays exact); ``schedule`` may then be None
            (``t`` is zeros). Its ``__name__`` is part of the resume check.
            ``fastdiff.singular.fit_initial_predictor`` trains through this.
    """
    if loss_fn is None or schedule is not None:
        _check_schedule(schedule)
    _check_sharing(time_sharing)
    steps = _check_int("steps", steps, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    warmup = _check_int("warmup", warmup, 0)
    ckpt_every = _check_int("ckpt_every", ckpt_every, 1)
    log_every = _check_int("log_every", log_every, 1)
    seed = _check_int("seed", seed, 0, 2 ** 63 - 1)
    lr = _check_float("lr", lr, lambda v: v > 0, "a finite number > 0")
    weight_decay = _check_float("weight_decay", weight_decay, lambda v: v >= 0,
                                "a finite number >= 0")
    p_uncond = _check_float("p_uncond", p_uncond, lambda v: 0 <= v < 1, "a number in [0, 1)")
    ema_decay = _check_float("ema_decay", ema_decay, lambda v: 0 <= v < 1, "a number in [0, 1)")
    if grad_clip is not None:
        # a negative max norm would flip the gradients' sign, 0 would zero them
        grad_clip = _check_float("grad_clip", grad_clip, lambda v: v > 0,
                                 "None (no clipping) or a finite number > 0")
    prediction = prediction or getattr(model, "prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    if batch_size < world or batch_size % world:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the world size ({world})")
    local_b = batch_size // world
    if device is None:
        device = (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                  else "cpu")
    device = torch.device(device)
    dataset = _as_dataset(data)
    if len(dataset) < batch_size:
        raise ValueError(f"the data set has {len(dataset)} items, fewer than batch_size={batch_size}")
    first = dataset[0]
    labeled = isinstance(first, (tuple, list)) and len(first) > 1
    null = getattr(model, "null_class", None) if labeled else None
    if labeled and null is None:
        raise ValueError("data has labels but the model has no `null_class` "
                         "(build it class-conditional, e.g. UNet(num_classes=10))")

    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # The sampler is seeded and keyed by epoch, so the data order is a function of
    # (seed, epoch): what makes resume exact. With world=1 it is a plain shuffle.
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    # Its own generator: iter(loader) draws a seed, which must not come from the global RNG.
    loader = torch.utils.data.DataLoader(dataset, batch_size=local_b, sampler=sampler,
                                         drop_last=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    per_epoch = len(loader)
    meta = _resumable_meta(batch_size=batch_size, seed=seed, p_uncond=p_uncond,
                           prediction=prediction, lr=lr, warmup=warmup, ema_decay=ema_decay,
                           weight_decay=weight_decay, grad_clip=grad_clip,
                           time_sharing=None if time_sharing is None
                           else [time_sharing.t_tilde, time_sharing.n])
    if loss_fn is not None:
        meta["loss"] = getattr(loss_fn, "__name__", type(loss_fn).__name__)

    start, rng_state = 0, None
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    log_path = os.path.join(out_dir, LOG) if out_dir else None
    if out_dir and rank == 0:
        # Temp files of writes a kill interrupted; this run owns the folder.
        for name in (CHECKPOINT, LOG, FINAL_WEIGHTS, FINAL_CONFIG):
            remove_stale_temps(os.path.join(out_dir, name))
    if ckpt_path and resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, hint=RESUME_HINT)
        if ck["meta"] != meta:
            diff = {k: (ck["meta"].get(k), v) for k, v in meta.items() if ck["meta"].get(k) != v}
            raise ValueError(f"cannot resume {ckpt_path}: settings differ (checkpoint, now): {diff}")
        try:
            model.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"cannot resume {ckpt_path}: it holds another model "
                             f"({str(e).splitlines()[0]}); {RESUME_HINT}") from None
        gen.set_state(ck["rng"]["generator"])
        rng_state = ck["rng"]  # the global RNG's, applied inside the run's _run_rng
        start = int(ck["step"])
        if start > steps:
            raise ValueError(f"checkpoint is at step {start}, beyond steps={steps}")
    if out_dir and rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    if log_path and rank == 0:
        if start == 0 and os.path.exists(log_path):
            atomic_write_text("", log_path)
        else:
            _trim_log(log_path, start)
    ddp = model
    if distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def save_checkpoint(step):
        rng = {"generator": gen.get_state(), **_rng_state(device)}
        _write_checkpoint({"step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                           "optimizer": opt.state_dict(), "rng": rng, "meta": meta}, ckpt_path)

    from tqdm.auto import tqdm
    bar = tqdm(total=steps, initial=start, disable=not progress or rank != 0,
               desc="train", dynamic_ncols=True)
    log_f = open(log_path, "a") if log_path and rank == 0 else None
    t0, last_loss = time.time(), float("nan")
    batches: Iterable = iter(())
    rng_scope = contextlib.ExitStack()
    rng_scope.enter_context(_run_rng(device, seed, rank, rng_state))
    try:
        for step in range(start, steps):
            epoch, offset = divmod(step, per_epoch)
            if step == start or offset == 0:
                sampler.set_epoch(epoch)
                batches = iter(loader)
                for _ in range(offset):  # resume mid-epoch: skip what was already seen
                    next(batches)
            item = next(batches)
            x0 = (item[0] if isinstance(item, (tuple, list)) else item).to(device)
            # Global draws, then this rank's rows: the DistributedSampler gives rank r the
            # global batch positions r, r + world, r + 2 * world, ...
            t_g = (_draw_t(schedule, batch_size, gen) if schedule is not None
                   else torch.zeros(batch_size, dtype=torch.long))
            noise_g = torch.randn((batch_size,) + tuple(x0.shape[1:]), generator=gen)
            drop_g = torch.rand(batch_size, generator=gen) < p_uncond
            t = t_g[rank::world].to(device)
            noise = noise_g[rank::world].to(device, x0.dtype)
            cond = None
            if labeled:
                y = item[1].to(device)
                cond = _drop_cond(y, null, drop_g[rank::world].to(device))
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr
            if loss_fn is None:
                loss = diffusion_loss(ddp, x0, schedule, prediction=prediction,
                                      time_sharing=time_sharing, cond=cond, t=t, noise=noise)
            else:
                loss = loss_fn(ddp, x0, t, noise, cond)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            ema_update(ema, model, ema_decay_at(step, ema_decay))
            done = step + 1
            if done % log_every == 0 or done == steps:
                lv = loss.detach().clone()
                if distributed:
                    dist.all_reduce(lv)
                    lv /= world
                last_loss = lv.item()
                if log_f is not None:
                    log_f.write(json.dumps({"step": done, "loss": last_loss,
                                            "lr": opt.param_groups[0]["lr"],
                                            "time": round(time.time() - t0, 3)}) + "\n")
                    log_f.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}")
            bar.update(1)
            if ckpt_path and (done % ckpt_every == 0 or done == steps):
                if rank == 0:
                    save_checkpoint(done)
                if distributed:
                    dist.barrier()
    finally:
        rng_scope.close()
        bar.close()
        if log_f is not None:
            log_f.close()

    ema.time_sharing = time_sharing
    if out_dir and rank == 0:
        save_model(ema, out_dir, schedule=schedule, time_sharing=time_sharing,
                   prediction_type=prediction,
                   extra={"train": {**meta, "steps": steps, "world_size": world,
                                    **_loss_summary(log_path, last_loss)},
                          **(extra_config or {})})
    return ema


def _drop_cond(y: torch.Tensor, null, drop: torch.Tensor) -> torch.Tensor:
    """Condition dropout: rows of ``y`` where ``drop`` is set become ``null``, a label
    (int) or a tensor broadcastable to one row of ``y`` (e.g. a zero embedding / image)."""
    if isinstance(null, torch.Tensor):
        mask = drop.view((-1,) + (1,) * (y.dim() - 1))
        return torch.where(mask, null.to(y.device, y.dtype), y)
    return torch.where(drop, torch.full_like(y, null), y)


def _loss_summary(log_path: str | None, last_loss: float) -> dict:
    # From the log when there is one, so a run finished by resuming a final checkpoint
    # reports the same numbers as one that ran straight through.
    losses = []
    if log_path and os.path.exists(log_path):
        with open(log_path) as f:
            losses = [json.loads(line)["loss"] for line in f if line.strip()]
    if not losses:
        return {"final_loss": last_loss}
    tail = losses[-100:]
    return {"final_loss": losses[-1], "mean_loss_last_100": sum(tail) / len(tail)}
