"""SingDiffusion (Zhang et al., CVPR 2024): the singular step at t = 1.

At t = 1 (alpha = 0) a sample carries no information about the data, so a sampler that
starts from pure noise implicitly takes E[x0 | c] = 0: the "average image" that keeps
samples at medium brightness. SingDiffusion replaces the first step by a DDIM step from
t = 1, where the noise estimate is the initial noise x1 itself, to the sampler's first
model time t1, with an initial predictor y ~ E[x0 | c] (docs/singdiffusion.md):

    x_t1 = alpha_t1 * y + sigma_t1 * x1       (VP state; the Euler family's state is
                                               x / alpha = y + (sigma_t1 / alpha_t1) x1)

and then runs the unmodified sampler from t1. This module is the one home of it:

- initial predictors behind one interface, ``predict(x1, cond) -> y`` shaped like x1:
  :class:`DataMean` and :class:`ClassMeans` (closed forms, one streaming pass over a data
  set with float64 sums), :class:`InitialPredictor` (fastdiff's UNet without its time
  path, conditioned on a label, an embedding vector or an image) and
  :class:`DiffusersInitialPredictor` (a diffusers ``UNet2DConditionModel`` without
  ``time_emb_proj``, the official format, loaded by :func:`load_initial_predictor`);
- :func:`fit_initial_predictor`: the MSE training of a learned predictor, through
  :func:`fastdiff.train.train` (EMA, atomic checkpoints, exact resume);
- :func:`initial_state`: the singular step for a :class:`fastdiff.Sampler`, one pass of
  the fused step op (what ``fastdiff.sample(..., initial="singdiffusion")`` runs);
- :func:`diffusers_latents`: ``latents=`` for a diffusers pipeline, correct after the
  pipeline's own ``init_noise_sigma`` scaling for VP and Euler-type schedulers.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .nets import UNet
from .step import StepCoeffs, fused_step

__all__ = ["DataMean", "ClassMeans", "InitialPredictor", "DiffusersInitialPredictor",
           "fit_initial_predictor", "initial_loss", "initial_state", "singular_step",
           "normalized_guidance", "diffusers_latents", "load_initial_predictor",
           "make_time_free", "INITIALS"]

INITIALS = (None, "singdiffusion")  # fastdiff.sample's initial= values


# -- closed-form predictors ---------------------------------------------------------------

def _batches(data, batch_size: int):
    """(images [b, ...], labels [b] or None) batches of a tensor, an (images, labels)
    tuple, a Dataset of (image[, label]) items, or an iterable of such batches."""
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size], None
        return
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"images and labels differ in length: {x.shape[0]} vs {y.shape[0]}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    if isinstance(data, torch.utils.data.Dataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    try:
        it = iter(data)
    except TypeError:
        raise TypeError("data must be a tensor of images, an (images, labels) tuple, a Dataset or "
                        f"an iterable of batches; got {type(data).__name__}") from None
    for item in it:
        if isinstance(item, torch.Tensor):
            yield item, None
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            yield item[0], (item[1] if len(item) > 1 else None)
        else:
            raise TypeError(f"a batch must be images or (images, labels), got {type(item).__name__}")


def _check_images(x: torch.Tensor):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"images must be a floating tensor [N, ...], got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")


def _expand(mean: torch.Tensor, x1: torch.Tensor, who: str) -> torch.Tensor:
    if tuple(mean.shape[-(x1.dim() - 1):]) != tuple(x1.shape[1:]) or mean.dim() > x1.dim():
        raise ValueError(f"{who}: the data's images have shape {tuple(mean.shape[-(x1.dim() - 1):])}"
                         f", x1's are {tuple(x1.shape[1:])}")
    return mean.to(x1.device, x1.dtype).expand(x1.shape).contiguous()


class DataMean:
    """The unconditional optimum E[x0]: the data mean, ignoring x1 and cond.

    ``DataMean(data)`` computes it in one streaming pass (float64 sums). ``mean``:
    [C, H, W] float64. ``predict(x1 [B, C, H, W], cond=None) -> [B, C, H, W]`` in x1's
    dtype and device.
    """

    def __init__(self, data, *, batch_size: int = 1024):
        total, n = None, 0
        for x, _ in _batches(data, batch_size):
            _check_images(x)
            s = x.detach().to("cpu", torch.float64).sum(0)
            if total is not None and s.shape != total.shape:
                raise ValueError(f"images of shapes {tuple(total.shape)} and {tuple(s.shape)} in one data set")
            total = s if total is None else total + s
            n += x.shape[0]
        if not n:
            raise ValueError("DataMean: the data set is empty")
        self.count = n
        self.mean = total / n

    def predict(self, x1: torch.Tensor, cond=None) -> torch.Tensor:
        return _expand(self.mean, x1, "DataMean")

    __call__ = predict


class ClassMeans:
    """The class-conditional optimum E[x0 | c]: the mean image of each class.

    ``ClassMeans(data, num_classes=None)``: ``data`` gives (images, integer labels); one
    streaming pass with float64 sums. ``means`` [K, C, H, W] float64, ``counts`` [K],
    ``mean`` the overall data mean (the unconditional prediction). ``predict(x1, cond)``:
    cond int64 [B] labels in 0..K-1, or ``null_class`` (= K) / None for the data mean.
    """

    def __init__(self, data, num_classes: int | None = None, *, batch_size: int = 1024):
        sums, counts = None, None
        for x, y in _batches(data, batch_size):
            _check_images(x)
            if y is None or not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dim() != 1:
                raise ValueError("ClassMeans: data must give integer class labels [N] with the images")
            y = y.to("cpu", torch.long)
            if (y < 0).any() or (num_classes is not None and (y >= num_classes).any()):
                raise ValueError(f"ClassMeans: labels must be in [0, {num_classes}), got "
                                 f"{int(y.min())}..{int(y.max())}")
            k = int(y.max()) + 1 if num_classes is None else num_classes
            xs = x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1)
            if sums is None:
                shape = tuple(x.shape[1:])
                sums, counts = torch.zeros(k, xs.shape[1], dtype=torch.float64), torch.zeros(k, dtype=torch.long)
            elif tuple(x.shape[1:]) != shape:
                raise ValueError(f"images of shapes {shape} and {tuple(x.shape[1:])} in one data set")
            if k > sums.shape[0]:  # more classes seen than so far (num_classes not given)
                sums = torch.cat([sums, sums.new_zeros(k - sums.shape[0], sums.shape[1])])
                counts = torch.cat([counts, counts.new_zeros(k - counts.shape[0])])
            sums.index_add_(0, y, xs)
            counts += torch.bincount(y, minlength=sums.shape[0])
        if sums is None:
            raise ValueError("ClassMeans: the data set is empty")
        self.counts = counts
        self.num_classes = sums.shape[0]
        with torch.no_grad():
            self.means = (sums / counts.clamp(min=1)[:, None].double()).reshape((-1,) + shape)
            self.means[counts == 0] = float("nan")
            self.mean = (sums.sum(0) / counts.sum()).reshape(shape)

    @property
    def null_class(self) -> int:
        """The label meaning "no class" (predicts the overall data mean)."""
        return self.num_classes

    def predict(self, x1: torch.Tensor, cond=None) -> torch.Tensor:
        if cond is None:
            return _expand(self.mean, x1, "ClassMeans")
        if not isinstance(cond, torch.Tensor) or cond.is_floating_point() or cond.dim() != 1 \
                or cond.shape[0] != x1.shape[0]:
            raise ValueError(f"ClassMeans: cond must be integer labels [{x1.shape[0]}], got "
                             f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")
        y = cond.to("cpu", torch.long)
        if (y < 0).any() or (y > self.num_classes).any():
            raise ValueError(f"ClassMeans: labels must be in 0..{self.num_classes} (the last is the "
                             f"null class), got {int(y.min())}..{int(y.max())}")
        table = torch.cat([self.means, self.mean[None]])
        out = table[y]
        if torch.isnan(out).any():
            raise ValueError(f"ClassMeans: class(es) {sorted(set(y[torch.isnan(out).flatten(1).any(1)].tolist()))} "
                             "have no data")
        return _expand(out, x1, "ClassMeans")

    __call__ = predict


# -- learned predictors -------------------------------------------------------------------

class InitialPredictor(nn.Module):
    """A small time-free network y(x1, c) ~ E[x0 | c]: fastdiff's UNet with no time path.

    Args:
        in_channels: channels of x1 (and of y).
        num_classes: condition on integer labels 0..K-1 (``null_class`` = K: none).
        cond_channels: condition on a tensor instead: an embedding vector [B, D]
            (D = cond_channels, broadcast over the image) or an image [B, D, h, w]
            (resized bilinearly to x1's size), both fed as extra input channels; the
            null condition is zeros.
        **unet: further :class:`fastdiff.UNet` arguments (``channels``, ``channel_mult``,
            ``num_res_blocks``, ``attention_levels``, ...).

    ``forward(x1 [B, C, H, W], cond=None) -> [B, C, H, W]`` (= ``predict``).
    """

    def __init__(self, in_channels: int = 1, *, num_classes: int | None = None,
                 cond_channels: int = 0, **unet):
        super().__init__()
        if num_classes is not None and cond_channels:
            raise ValueError("InitialPredictor: give num_classes (labels) or cond_channels "
                             "(vectors / images), not both")
        if isinstance(cond_channels, bool) or not isinstance(cond_channels, int) or cond_channels < 0:
            raise ValueError(f"InitialPredictor: cond_channels must be an int >= 0, got {cond_channels!r}")
        for k in ("out_channels", "time_embedding", "prediction_type", "time_sharing"):
            if k in unet:
                raise TypeError(f"InitialPredictor: {k} is fixed (got {k}={unet[k]!r})")
        self.config = dict(in_channels=in_channels, num_classes=num_classes,
                           cond_channels=cond_channels, **unet)
        self.cond_channels = cond_channels
        self.num_classes = num_classes
        self.net = UNet(in_channels + cond_channels, out_channels=in_channels,
                        num_classes=num_classes, time_embedding=False,
                        prediction_type="sample", **unet)

    @property
    def null_class(self):
        """The "no condition" value used for guidance dropout: the label K, or a zero
        tensor (broadcast to any embedding / image condition)."""
        return self.num_classes if self.num_classes is not None else torch.zeros(())

    def forward(self, x1: torch.Tensor, cond=None) -> torch.Tensor:
        if not self.cond_channels:
            return self.net(x1, None, cond)
        B, _, H, W = x1.shape
        if cond is None:
            c = x1.new_zeros(B, self.cond_channels, H, W)
        elif isinstance(cond, torch.Tensor) and cond.dim() == 2 and cond.shape[1] == self.cond_channels:
            c = cond.to(x1.dtype)[:, :, None, None].expand(-1, -1, H, W)
        elif isinstance(cond, torch.Tensor) and cond.dim() == 4 and cond.shape[1] == self.cond_channels:
            c = cond.to(x1.dtype)
            if tuple(c.shape[-2:]) != (H, W):
                c = F.interpolate(c, size=(H, W), mode="bilinear", align_corners=False)
        else:
            raise ValueError(f"InitialPredictor: cond must be a vector [B, {self.cond_channels}] or an "
                             f"image [B, {self.cond_channels}, h, w], got "
                             f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")
        if c.shape[0] != B:
            c = c.expand(B, -1, -1, -1) if c.shape[0] == 1 else None
            if c is None:
                raise ValueError(f"InitialPredictor: cond has batch {cond.shape[0]}, x1 has {B}")
        return self.net(torch.cat([x1, c], 1), None)

    def predict(self, x1: torch.Tensor, cond=None) -> torch.Tensor:
        return self(x1, cond)


def initial_loss(model, x0: torch.Tensor, t, noise: torch.Tensor, cond) -> torch.Tensor:
    """The initial predictor's objective: ``|| model(x1, c) - x0 ||^2`` with x1 = ``noise``
    drawn independently of x0 (at t = 1 the sample is pure noise), so the minimiser is
    E[x0 | c] whatever x1 is. ``t`` is unused (the step's draw, kept for the loop)."""
    return F.mse_loss(model(noise, cond).float(), x0.float())


def fit_initial_predictor(predictor: nn.Module, data, *, steps: int, batch_size: int = 128,
                          lr: float = 1e-3, warmup: int = 100, ema_decay: float = 0.999,
                          p_uncond: float = 0.1, out_dir: str | None = None, resume: bool = True,
                          ckpt_every: int = 500, progress: bool = True, seed: int = 0,
                          device=None, **train_kwargs) -> nn.Module:
    """Train an initial predictor with :func:`initial_loss`; returns its EMA copy.

    The loop is :func:`fastdiff.train.train` (AdamW, EMA, grad clipping, JSON-lines log,
    atomic checkpoints, exact resume, data-parallel under torchrun); x1 is that loop's
    seeded per-step noise draw and a condition is dropped to ``predictor.null_class``
    with probability ``p_uncond`` (so the unconditional prediction exists for guidance).

    Args:
        predictor: an ``nn.Module`` called ``predictor(x1, cond)`` (e.g.
            :class:`InitialPredictor`, or :class:`DiffusersInitialPredictor`).
        data: a Dataset of (image, cond) or (image,) items, a tensor of images, or
            (images, conds); cond may be labels [N], vectors [N, D] or images [N, D, h, w].
        steps, batch_size, lr, warmup, ema_decay, p_uncond, out_dir, resume,
        ckpt_every, progress, seed, device, **train_kwargs: as for ``train``.
    """
    from .train import train
    extra = dict(train_kwargs.pop("extra_config", None) or {})
    extra.setdefault("initial_predictor", True)
    return train(predictor, data, None, steps=steps, batch_size=batch_size, lr=lr,
                 warmup=warmup, ema_decay=ema_decay, p_uncond=p_uncond, out_dir=out_dir,
                 resume=resume, ckpt_every=ckpt_every, progress=progress, seed=seed,
                 device=device, prediction="sample", loss_fn=initial_loss,
                 extra_config=extra, **train_kwargs)


# -- diffusers-format predictors ----------------------------------------------------------

def make_time_free(unet: nn.Module) -> nn.Module:
    """Remove the time path from a diffusers ``UNet2DConditionModel`` in place, the
    architecture of SingDiffusion's initial predictor: every ResNet block's
    ``time_emb_proj`` becomes None and the time embedding module returns None, so the
    blocks get no time embedding at all (diffusers adds ``temb`` only when it is not
    None). Returns ``unet``."""
    n = 0
    for m in unet.modules():
        if hasattr(m, "time_emb_proj"):
            m.time_emb_proj = None
            n += 1
    if not n or not hasattr(unet, "time_embedding"):
        raise ValueError(f"make_time_free: {type(unet).__name__} has no time embedding / ResNet block "
                         "with a time_emb_proj (not a diffusers UNet?)")
    for name in ("class_embedding", "add_embedding"):
        if getattr(unet, name, None) is not None:
            raise ValueError(f"make_time_free: the UNet has a {name}, which is added to the time "
                             "embedding; a time-free UNet cannot have one")
    unet.time_embedding = _NoTime()
    return unet


class _NoTime(nn.Module):
    def forward(self, *args, **kwargs):
        return None


class DiffusersInitialPredictor(nn.Module):
    """A time-free diffusers ``UNet2DConditionModel`` as an initial predictor.

    ``predict(x1 [B, C, H, W], cond) -> [B, C, H, W]``: cond is the
    ``encoder_hidden_states`` tensor (e.g. prompt embeddings [B, L, D]) or a dict of
    keyword arguments. The time input is a placeholder (``timestep``, default 1): no
    block reads it once :func:`make_time_free` has run.
    """

    def __init__(self, unet: nn.Module, timestep: int = 1):
        super().__init__()
        self.unet = unet
        self.timestep = timestep

    def forward(self, x1: torch.Tensor, cond=None) -> torch.Tensor:
        t = torch.full((x1.shape[0],), self.timestep, device=x1.device, dtype=torch.long)
        if isinstance(cond, dict):
            out = self.unet(x1, t, **cond)
        else:
            out = self.unet(x1, t, encoder_hidden_states=cond)
        return out.sample if hasattr(out, "sample") else out[0]

    def predict(self, x1: torch.Tensor, cond=None) -> torch.Tensor:
        return self(x1, cond)


def load_initial_predictor(path: str, *, device="cpu", subfolder: str | None = None):
    """Load a saved initial predictor (eval mode).

    ``path`` is the name of a shipped predictor (``"brightness-initial"``), a folder in
    fastdiff's model format (``model.safetensors`` + ``model.json``, as
    :func:`fit_initial_predictor` writes into its ``out_dir``), or a diffusers folder
    (``config.json`` + ``diffusion_pytorch_model.safetensors`` of a
    ``UNet2DConditionModel`` whose ResNet blocks have no ``time_emb_proj``), loaded
    through diffusers' public ``from_config`` and ``load_state_dict`` from safetensors.
    """
    from .model_io import CONFIG, FORMAT, WEIGHTS, load_weights
    folder = os.path.join(path, subfolder) if subfolder else path
    shipped = os.path.join(os.path.dirname(__file__), "assets", path)
    if not os.path.exists(folder) and os.sep not in path and os.path.isdir(shipped):
        folder = shipped  # a shipped predictor by name
    cfg_path = os.path.join(folder, CONFIG)
    if os.path.isdir(folder) and not os.path.exists(cfg_path) \
            and os.path.exists(os.path.join(folder, "config.json")):
        return _load_diffusers(folder, device)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"load_initial_predictor: {path!r} is not a shipped predictor nor a "
                                f"folder with {CONFIG} (fastdiff) or config.json (diffusers)")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("class") != _CLASS:
        raise ValueError(f"load_initial_predictor: {cfg_path} holds a {meta.get('class')!r}, "
                         f"not a {_CLASS}")
    info = meta.get("weights") or {}
    p = InitialPredictor(**meta["model"])
    p.load_state_dict(load_weights(os.path.join(folder, info.get("file", WEIGHTS)),
                                   sha256=info.get("sha256")))
    return p.to(device).eval()


_CLASS = f"{__name__}.InitialPredictor"  # the class name fastdiff.save_model records


def _load_diffusers(folder: str, device):
    from diffusers import UNet2DConditionModel  # lazy: fastdiff does not need diffusers
    from safetensors.torch import load_file
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"load_initial_predictor: {weights} is missing (safetensors weights "
                                "are required)")
    unet = make_time_free(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder)))
    missing, unexpected = unet.load_state_dict(load_file(weights), strict=False)
    # A file that still holds the (unused) time weights loads too; anything else must match.
    unexpected = [k for k in unexpected
                  if ".time_emb_proj." not in k and not k.startswith("time_embedding.")]
    if missing or unexpected:
        raise ValueError(f"load_initial_predictor: {weights} does not match its config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return DiffusersInitialPredictor(unet).to(device).eval()


# -- the singular step ----------------------------------------------------------------------

def _predict(predictor, x1: torch.Tensor, cond) -> torch.Tensor:
    if not callable(getattr(predictor, "predict", None)):
        raise TypeError(f"initial_predictor must have a predict(x1, cond) method, got "
                        f"{type(predictor).__name__}")
    with torch.no_grad():
        y = predictor.predict(x1, cond)
    y = y.sample if hasattr(y, "sample") else y
    if not isinstance(y, torch.Tensor) or y.shape != x1.shape:
        raise ValueError(f"initial_predictor.predict returned "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}, "
                         f"expected the sample's shape {tuple(x1.shape)}")
    if y.device != x1.device:
        raise ValueError(f"initial_predictor.predict returned a tensor on {y.device}, x1 is on {x1.device}")
    return y.to(x1.dtype).contiguous()


def _guided(guidance_scale) -> bool:
    if guidance_scale is None:
        return False
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise TypeError(f"initial_guidance_scale must be a finite number, got {guidance_scale!r}")
    return guidance_scale > 1


def normalized_guidance(y_u: torch.Tensor, y_c: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """SingDiffusion's guidance of the initial prediction, ``(y_u + w (y_c - y_u)) / w``
    for w > 1, else ``y_c`` (the reference of what :func:`singular_step` fuses)."""
    if not _guided(guidance_scale):
        return y_c
    w = float(guidance_scale)
    return (y_u + w * (y_c - y_u)) / w


def singular_step(sampler, x1: torch.Tensor, y: torch.Tensor, y_cond: torch.Tensor | None = None,
                  guidance_scale: float | None = None) -> torch.Tensor:
    """The DDIM step from t = 1 to the sampler's first model time t1, in one fused pass.

    Args:
        sampler: a :class:`fastdiff.Sampler` (any family; per-sample grids give one t1
            per sample).
        x1: the initial unit-variance noise [B, ...] (before any ``init_noise_sigma``).
        y: the initial prediction [B, ...]; with ``y_cond`` the unconditional one.
        y_cond, guidance_scale: the conditional prediction and w; for w > 1 the fused
            pass uses ``(y + w (y_cond - y)) / w``, otherwise ``y_cond``.

    Returns:
        the sampler's initial state: ``alpha_t1 y + sigma_t1 x1`` for samplers whose
        state is x_t = alpha x0 + sigma eps (VP samplers; EDM's, with alpha = 1; flow
        matching's, where a grid that starts at t = 1 makes it x1 itself), and
        ``y + (sigma_t1 / alpha_t1) x1`` for the Euler family (state x / alpha).
    """
    grid = sampler.grid
    if grid.rows > 1 and x1.shape[0] != grid.rows:
        raise ValueError(f"the sampler has per-sample timesteps for {grid.rows} samples, x1 has "
                         f"batch {x1.shape[0]}")
    a, s = grid.alpha[:, 0], grid.sigma[:, 0]
    if (grid.alpha[:, 0] > grid.alpha[:, -1]).any():
        raise ValueError(f"sampler {sampler.name!r} runs from data towards noise (an inversion); "
                         "SingDiffusion's step from t = 1 starts a generative run")
    if sampler.plan.sigma_space:
        return _fused_start(x1, y, y_cond, guidance_scale, x_coef=s / a, y_coef=1.0 + 0.0 * a)
    return _fused_start(x1, y, y_cond, guidance_scale, x_coef=s, y_coef=a)


def _fused_start(x1, y, y_cond, guidance_scale, *, x_coef, y_coef):
    """``x_coef * x1 + y_coef * y_g`` (per-row coefficients), y_g the guided prediction,
    as one pass of the fused sampler step."""
    if x1.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x1 must be float32/float16/bfloat16/float64, got {x1.dtype}")
    for name, t in (("y", y), ("y_cond", y_cond)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != x1.shape):
            raise ValueError(f"{name} must be a tensor of x1's shape {tuple(x1.shape)}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    rows = max(getattr(x_coef, "size", 1), getattr(y_coef, "size", 1))
    c = StepCoeffs(rows, 1)
    m, mc = y, None
    if y_cond is not None:
        if _guided(guidance_scale):
            w = float(guidance_scale)
            c.guidance(w)
            y_coef = y_coef / w  # the normalization, folded into the same pass
            mc = y_cond
        else:
            m = y_cond
    c.convert(w_m=y_coef)
    c.out(0, x=x_coef, d=1.0)
    acc = torch.float64 if x1.dtype == torch.float64 else torch.float32
    m = m.to(x1.device, x1.dtype).contiguous()
    mc = mc.to(x1.device, x1.dtype).contiguous() if mc is not None else None
    return fused_step(x1, m, c.tensor(acc, x1.device), model_out_cond=mc)[0]


def initial_state(sampler, x1: torch.Tensor, predictor, cond=None, uncond=None,
                  guidance_scale: float | None = None) -> torch.Tensor:
    """The sampler's initial state by SingDiffusion: the predictor's y at x1 (and, for
    guidance with w > 1, its unconditional prediction for ``uncond``), then
    :func:`singular_step`. Starts a new run of ``sampler`` (``reset``)."""
    if predictor is None:
        raise ValueError('initial="singdiffusion" needs initial_predictor= (e.g. '
                         'fastdiff.singular.ClassMeans(data) or a trained InitialPredictor)')
    if not isinstance(x1, torch.Tensor) or not x1.is_floating_point():
        raise TypeError("x1 must be a floating-point tensor")
    guided = _guided(guidance_scale)
    if guided and uncond is None:
        raise ValueError("initial_guidance_scale > 1 needs uncond (the unconditional condition)")
    sampler.reset()
    y_c = _predict(predictor, x1, cond)
    if not guided:
        return singular_step(sampler, x1, y_c)
    return singular_step(sampler, x1, _predict(predictor, x1, uncond), y_c, guidance_scale)


# -- diffusers pipelines ------------------------------------------------------------------

# How a diffusers scheduler holds its first noise level.
_VP_TIMESTEP = ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler")             # alphas_cumprod[t]
_VP_SIGMA = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",     # sigmas[0], VP state
             "UniPCMultistepScheduler", "DEISMultistepScheduler")
_K_SIGMA = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",        # sigmas[0], x / alpha
            "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
            "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler")


def diffusers_latents(pipe_or_scheduler, x1: torch.Tensor, y: torch.Tensor,
                      num_inference_steps: int, *, y_cond: torch.Tensor | None = None,
                      guidance_scale: float | None = None, **set_timesteps_kwargs) -> torch.Tensor:
    """``latents=`` for a diffusers pipeline that start it from SingDiffusion's x_t1.

    A pipeline multiplies ``latents`` by ``scheduler.init_noise_sigma`` before its first
    step, so this returns ``state / init_noise_sigma`` with the scheduler's own state:
    ``alpha_t1 y + sigma_t1 x1`` for VP schedulers (DDIM, PNDM, DDPM, DPM-Solver, UniPC,
    DEIS; init_noise_sigma = 1) and ``y + (sigma_t1 / alpha_t1) x1`` for Euler-type
    schedulers (Euler, Euler ancestral, Heun, LMS, KDPM2; state x / alpha), where t1 is
    the first timestep of ``set_timesteps(num_inference_steps, **set_timesteps_kwargs)``
    on a copy of the scheduler (the pipeline's own is not touched).

    Args:
        pipe_or_scheduler: a diffusers pipeline (its ``scheduler`` is used) or scheduler.
        x1: the unit-variance noise [B, C, H, W] (what the pipeline would draw).
        y: the initial prediction [B, C, H, W] (e.g. of a
            :class:`DiffusersInitialPredictor`); with ``y_cond``, the unconditional one.
        num_inference_steps: the same number the pipeline is called with.
        y_cond, guidance_scale: as for :func:`singular_step` (normalized guidance).

    Returns:
        latents [B, C, H, W] in x1's dtype (one fused pass).
    """
    sched = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    name = type(sched).__name__
    if name not in _VP_TIMESTEP + _VP_SIGMA + _K_SIGMA:
        raise ValueError(f"diffusers_latents: scheduler {name} is not supported; supported: "
                         f"{sorted(_VP_TIMESTEP + _VP_SIGMA + _K_SIGMA)}")
    cfg = sched.config
    if cfg.get("use_flow_sigmas", False) or cfg.get("prediction_type") == "flow_prediction":
        raise ValueError(f"diffusers_latents: {name} with flow-matching sigmas is not a VP / VE "
                         "schedule; SingDiffusion's step is defined for those only")
    if not isinstance(x1, torch.Tensor) or not x1.is_floating_point():
        raise TypeError("diffusers_latents: x1 must be a floating-point tensor")
    s = type(sched).from_config(cfg)
    s.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    if name in _VP_TIMESTEP:
        ac = s.alphas_cumprod[int(s.timesteps[0])].double()
        a, sg = ac.sqrt(), (1.0 - ac).sqrt()
    else:
        sk = s.sigmas[0].double().cpu()
        a = 1.0 / (sk * sk + 1.0).sqrt()
        sg = sk * a
    a, sg, init = float(a), float(sg), float(s.init_noise_sigma)
    if name in _K_SIGMA:
        x_coef, y_coef = sg / a, 1.0
    else:
        x_coef, y_coef = sg, a
    return _fused_start(x1, y, y_cond, guidance_scale, x_coef=x_coef / init, y_coef=y_coef / init)
