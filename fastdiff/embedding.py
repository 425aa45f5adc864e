"""The fused (E-TSDM shared) sinusoidal timestep embedding.

``timestep_embedding`` equals diffusers' ``get_timestep_embedding(f(t), ...)`` with f the
E-TSDM sharing map (identity when ``sharing=None``), computed in one kernel pass: the
mapping and sin/cos together, or for integer t a row gather from a cached table.
It is differentiable in t (backward, forward-AD for ``torch.func.jvp``) and vmappable.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from . import _dual, _ops
from .schedules import TimeSharing, _check_bool, _check_real

__all__ = ["timestep_embedding", "SinusoidalEmbedding", "patch_time_embedding",
           "embedding_frequencies"]

# Integer timesteps below this are served from a cached table (a plain row copy);
# others are computed. 1000 covers the usual DDPM training range.
TABLE_ROWS = 1000
# Calls with fewer than this many output elements (B * dim) compute their rows: the row
# copy saves about 2.3e-4 us per element on one CPU core, so below this it saves under
# ~2 us a call (under half of the call's fixed cost) while a table costs TABLE_ROWS rows
# of memory (benchmarks/bench_embedding.py --table-crossover).
TABLE_MIN_ELEMENTS = 8192
# All cached tables together hold at most this many bytes (least recently used evicted
# first); a single table larger than this is never built.
TABLE_CACHE_BYTES = 64 * 2 ** 20


def _check_dim(dim, where: str) -> int:
    """dim as an int >= 1 (numpy integers accepted, bools refused)."""
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{where}: dim must be a positive int, got {type(dim).__name__}")
    if dim < 1:
        raise ValueError(f"{where}: dim must be a positive int, got {dim!r}")
    return int(dim)


@lru_cache(maxsize=256, typed=True)  # typed: True and 1.0 are not the int 1 here
def _check_options(where, dim, downscale_freq_shift, max_period, scale=1.0):
    """Validated (dim, shift, max_period, scale) of the embedding's numeric options
    (cached: the checks cost about a microsecond, as much as a small call)."""
    dim = _check_dim(dim, where)
    shift = _check_real(f"{where}: downscale_freq_shift", downscale_freq_shift)
    mp = _check_real(f"{where}: max_period", max_period, positive=True)
    scale = _check_real(f"{where}: scale", scale)
    half = dim // 2
    if half > 0 and half - shift == 0:
        raise ValueError(f"{where}: dim // 2 ({half}) must differ from "
                         f"downscale_freq_shift ({shift:g})")
    return dim, shift, mp, scale


def embedding_frequencies(dim: int, downscale_freq_shift: float = 1.0,
                          max_period: float = 10000.0, device=None,
                          dtype=torch.float32) -> torch.Tensor:
    """The [dim // 2] frequencies, with diffusers' exact float32 arithmetic.

    Computed by the same torch ops as ``diffusers.models.embeddings.get_timestep_embedding``
    so that the kernel's products ``t * freq`` round identically.
    """
    dim, downscale_freq_shift, max_period, _ = _check_options(
        "embedding_frequencies", dim, downscale_freq_shift, max_period)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"embedding_frequencies: dtype must be a floating torch.dtype, "
                        f"got {dtype!r}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=device)
    exponent = exponent / (half - downscale_freq_shift)
    freqs = torch.exp(exponent)
    return freqs if dtype == torch.float32 else freqs.to(dtype)


@lru_cache(maxsize=64)
def _cached_freqs(dim, shift, max_period, device, dtype):
    return embedding_frequencies(dim, shift, max_period, device, dtype)


@_ops.constant_result
def _constant_freqs(dim, shift, max_period, device, dtype):
    # Under torch.compile the frequencies must still come from eager torch.exp: inductor's
    # exp differs by 1 ulp for some entries, which t ~ 1000 amplifies to ~1e-4.
    return _cached_freqs(dim, shift, max_period, device, dtype)


_tables: OrderedDict = OrderedDict()
_tables_bytes = 0


def _cached_table(dim, flip, shift, scale, max_period, width, end, device, dtype):
    """The [TABLE_ROWS, dim] embedding of t = 0, 1, ..., or None when it would exceed
    TABLE_CACHE_BYTES; an LRU cache bounded by the bytes of all tables together."""
    global _tables_bytes
    key = (dim, flip, shift, scale, max_period, width, end, device, dtype)
    table = _tables.get(key)
    if table is not None:
        _tables.move_to_end(key)
        return table
    nbytes = TABLE_ROWS * dim * torch.finfo(dtype).bits // 8
    if nbytes > TABLE_CACHE_BYTES:
        return None
    while _tables and _tables_bytes + nbytes > TABLE_CACHE_BYTES:
        _, old = _tables.popitem(last=False)
        _tables_bytes -= old.numel() * old.element_size()
    freqs = _cached_freqs(dim, shift, max_period, device, dtype)
    t = torch.arange(TABLE_ROWS, device=device)
    table = _dispatch(t, freqs, None, dim, flip, scale, width, end, False)
    _tables[key] = table
    _tables_bytes += nbytes
    return table


def _dispatch(t, freqs, table, dim, flip, scale, width, end, derivative):
    return _ops.call("timestep_embedding", t, freqs, table, dim, flip, scale, width, end,
                     derivative)


class _Embedding(torch.autograd.Function):
    """d emb / d t is itself one fused kernel pass (``derivative=True``)."""

    @staticmethod
    def forward(t, freqs, table, dim, flip, scale, width, end):
        return _dispatch(t, freqs, table, dim, flip, scale, width, end, False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        t, freqs, _, dim, flip, scale, width, end = inputs
        ctx.save_for_backward(t, freqs)
        ctx.save_for_forward(t, freqs)
        ctx.args = (dim, flip, scale, width, end)

    @staticmethod
    def _derivative(ctx, t, freqs):
        return _Derivative.apply(t, freqs, *ctx.args)

    @staticmethod
    def backward(ctx, grad):
        t, freqs = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        d = _Embedding._derivative(ctx, t.detach(), freqs)
        return ((grad * d).sum(-1).to(t.dtype),) + (None,) * 7

    @staticmethod
    def jvp(ctx, t_dot, *_):
        t, freqs = ctx.saved_tensors
        d = _Embedding._derivative(ctx, t, freqs)
        return d * t_dot.to(d.dtype)[:, None]

    @staticmethod
    def vmap(info, in_dims, t, freqs, table, dim, flip, scale, width, end):
        return _fold_vmap(_Embedding, in_dims, t, (freqs, table, dim, flip, scale, width, end),
                          dim)


class _Derivative(torch.autograd.Function):
    """d emb / d t as its own function so that it, too, has a vmap rule: the jvp rule
    above calls it on batched tensors under ``vmap(jacfwd(...))``. Not differentiated
    further (second derivatives in t are not offered)."""

    @staticmethod
    def forward(t, freqs, dim, flip, scale, width, end):
        return _dispatch(t, freqs, None, dim, flip, scale, width, end, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, t, freqs, dim, flip, scale, width, end):
        return _fold_vmap(_Derivative, in_dims, t, (freqs, dim, flip, scale, width, end), dim)


def _fold_vmap(fn, in_dims, t, rest, dim):
    """vmap rule of both functions: only t may be batched; the vmapped dim is folded into
    the op's own batch dim."""
    if any(d is not None for d in in_dims[1:]):
        raise ValueError("timestep_embedding: only t may be vmapped over")
    t = t.movedim(in_dims[0], 0)
    v, b = t.shape[0], t.shape[1]
    out = fn.apply(t.reshape(v * b), *rest)
    return out.reshape(v, b, dim), 0


def _check_t(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return torch.tensor([t])
        raise TypeError(f"timestep_embedding: t must be a tensor of shape [B] (or a number), "
                        f"got {type(t).__name__}")
    if t.dim() == 0:
        t = t[None]
    if t.dim() != 1:
        raise ValueError(f"timestep_embedding: t must have shape [B], got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"timestep_embedding: t must be an integer or floating tensor, got {t.dtype}")
    return t


def timestep_embedding(t, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0, sharing: TimeSharing | None = None
                       ) -> torch.Tensor:
    """Sinusoidal timestep embedding of the (optionally E-TSDM shared) time.

    Equals ``diffusers.models.embeddings.get_timestep_embedding(f(t), dim,
    flip_sin_to_cos, downscale_freq_shift, scale, max_period)``.

    Args:
        t: [B] integer or floating timesteps (schedule units), any device.
        dim: embedding width (odd widths are zero-padded like diffusers).
        sharing: a :class:`TimeSharing` (f of docs/etsdm.md) or None.

    Returns:
        [B, dim] float32 (float64 when t is float64). Differentiable in floating t; its
        derivative is zero inside shared sub-intervals.
    """
    t = _check_t(t)
    compiling = torch.compiler.is_compiling()
    # Dynamo traces the checks themselves (it would warn that it ignores the cache).
    check = _check_options.__wrapped__ if compiling else _check_options
    dim, shift, mp, scale = check("timestep_embedding", dim, downscale_freq_shift, max_period,
                                  scale)
    flip = _check_bool("timestep_embedding: flip_sin_to_cos", flip_sin_to_cos)
    if sharing is not None and not isinstance(sharing, TimeSharing):
        raise TypeError(f"timestep_embedding: sharing must be a fastdiff.TimeSharing or None, "
                        f"got {type(sharing).__name__}")
    width = float(sharing.width) if sharing is not None else 0.0
    end = float(sharing.t_tilde) if sharing is not None else 0.0
    out_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = (_constant_freqs if compiling else _cached_freqs)(dim, shift, mp, t.device, out_dtype)
    table = None
    if (not t.is_floating_point() and t.shape[0] * dim >= TABLE_MIN_ELEMENTS and not compiling
            and not _ops.use_reference()):
        table = _cached_table(dim, flip, shift, scale, mp, width, end, t.device, out_dtype)
    if compiling or (t.is_floating_point() and (t.requires_grad or _is_functorch_wrapped(t)
                                                or _dual.has_tangent(t))):
        return _Embedding.apply(t, freqs, table, dim, flip, scale, width, end)
    return _dispatch(t, freqs, table, dim, flip, scale, width, end, False)


def _is_functorch_wrapped(t: torch.Tensor) -> bool:
    # jvp / vmap / grad transforms wrap tensors (batched tensors included); the
    # autograd.Function path carries their rules (and those of forward_ad duals, which
    # are not wrapped: the op itself would drop their tangent).
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


class SinusoidalEmbedding(nn.Module):
    """nn.Module form of :func:`timestep_embedding`; a drop-in for diffusers' ``Timesteps``.

    ``forward(t)``: t [B] -> [B, dim] float32. ``sharing`` may be changed at any time.
    """

    def __init__(self, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                 scale: float = 1.0, max_period: float = 10000.0,
                 sharing: TimeSharing | None = None):
        super().__init__()
        dim, downscale_freq_shift, max_period, scale = _check_options(
            "SinusoidalEmbedding", dim, downscale_freq_shift, max_period, scale)
        flip_sin_to_cos = _check_bool("SinusoidalEmbedding: flip_sin_to_cos", flip_sin_to_cos)
        if sharing is not None and not isinstance(sharing, TimeSharing):
            raise TypeError(f"SinusoidalEmbedding: sharing must be a fastdiff.TimeSharing or "
                            f"None, got {type(sharing).__name__}")
        self.num_channels = dim  # diffusers' Timesteps attribute name
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale
        self.max_period = max_period
        self.sharing = sharing

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                  downscale_freq_shift=self.downscale_freq_shift,
                                  scale=self.scale, max_period=self.max_period,
                                  sharing=self.sharing)

    def extra_repr(self) -> str:
        return (f"dim={self.num_channels}, flip_sin_to_cos={self.flip_sin_to_cos}, "
                f"downscale_freq_shift={self.downscale_freq_shift}, scale={self.scale}, "
                f"sharing={self.sharing}")


def patch_time_embedding(unet: nn.Module, sharing: TimeSharing | None = None) -> nn.Module:
    """Replace a diffusers UNet's sinusoidal projection (``unet.time_proj``) in place.

    The new module is the fused :class:`SinusoidalEmbedding` with the same options
    (dim, flip_sin_to_cos, downscale_freq_shift, scale). With ``sharing=None`` the UNet's
    output is unchanged; with sharing it equals the original UNet called with f(t).
    Returns the same ``unet`` object (no weights copied).

    The sharing is also recorded in the diffusers config (key ``_fastdiff_time_sharing``),
    so ``unet.save_pretrained(path)`` keeps it: ``fastdiff.load_model(path)`` restores the
    patched embedding; diffusers' own ``from_pretrained`` loads a plain UNet.
    """
    proj = getattr(unet, "time_proj", None)
    if proj is None:
        raise TypeError(f"patch_time_embedding: {type(unet).__name__} has no `time_proj`; "
                        "expected a diffusers UNet2DModel / UNet2DConditionModel")
    if isinstance(proj, SinusoidalEmbedding):
        proj.sharing = sharing
        return _record_sharing(unet, sharing)
    needed = ("num_channels", "flip_sin_to_cos", "downscale_freq_shift")
    if not all(hasattr(proj, a) for a in needed):
        raise TypeError(f"patch_time_embedding: unet.time_proj is a {type(proj).__name__}, "
                        "expected diffusers' sinusoidal `Timesteps` (Fourier projections are "
                        "not supported)")
    unet.time_proj = SinusoidalEmbedding(proj.num_channels, proj.flip_sin_to_cos,
                                         proj.downscale_freq_shift, getattr(proj, "scale", 1),
                                         sharing=sharing)
    return _record_sharing(unet, sharing)


def _record_sharing(unet: nn.Module, sharing: TimeSharing | None) -> nn.Module:
    # In the diffusers config, so save_pretrained writes it and fastdiff.load_model
    # patches it in again (diffusers' own from_pretrained ignores the private key).
    if hasattr(unet, "register_to_config"):
        from .model_io import DIFFUSERS_SHARING_KEY, sharing_to_dict
        unet.register_to_config(**{DIFFUSERS_SHARING_KEY: sharing_to_dict(sharing)})
    return unet
