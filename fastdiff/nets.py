"""The small default UNet (the embedded digits models use it).

A DDPM-style UNet: ResNet blocks (GroupNorm + SiLU, the time / class embedding added
between the two convolutions), stride-2 downsampling, nearest-neighbour upsampling,
optional self-attention at chosen resolutions and in the middle block. The time input
goes through the fused :class:`fastdiff.SinusoidalEmbedding`.

Design points:
  * The net is plain in t: E-TSDM's shared condition f(t) is applied by whoever calls it
    (``fastdiff.train.diffusion_loss`` and the samplers). ``model.time_sharing`` records
    the sharing the weights were trained with so samplers can apply it automatically.
  * Attention is written with matmul + softmax (not ``scaled_dot_product_attention``) so
    forward-mode AD (``torch.func.jvp`` in t, the Lipschitz probes) works on CPU.
  * ``class_labels=None`` means "unconditional": the extra null class, which the training
    loop uses for label dropout, so classifier-free guidance needs no second model.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import SinusoidalEmbedding
from .schedules import TimeSharing

__all__ = ["UNet", "ResBlock", "SelfAttention", "PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    # Residual branches start as the identity: stabler early training.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(emb), GN-SiLU-dropout-conv(zero init), + skip.

    ``forward(x [B, C_in, H, W], emb [B, E] or None) -> [B, C_out, H, W]``; with
    ``emb_dim=None`` the block has no embedding input (``emb`` must be None).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int | None, groups: int = 8,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out) if emb_dim else None
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, with plain matmuls.

    ``forward(x [B, C, H, W]) -> [B, C, H, W]``. Written out (not SDPA) because torch's
    CPU flash-attention kernel has no forward-AD formula.
    """

    def __init__(self, channels: int, heads: int = 4, groups: int = 8):
        super().__init__()
        if channels % heads:
            raise ValueError(f"SelfAttention: channels ({channels}) must be divisible by "
                             f"heads ({heads})")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        d = C // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, d, H * W).unbind(1)
        w = torch.softmax(q.transpose(-1, -2) @ k * (d ** -0.5), dim=-1)  # [B, h, HW, HW]
        out = (v @ w.transpose(-1, -2)).reshape(B, C, H, W)
        return x + self.proj(out)


class UNet(nn.Module):
    """Small UNet ``model(x, t, class_labels=None) -> prediction`` (same shape as x).

    Args:
        in_channels, out_channels: image channels (out defaults to in).
        channels: base width; level i has ``channels * channel_mult[i]`` channels.
        channel_mult: one entry per resolution level (each level halves H and W).
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_levels: level indices with self-attention after each ResBlock. The
            middle block always has one attention layer when ``mid_attention``.
        num_classes: None for unconditional; else labels 0..num_classes-1 plus the null
            class ``num_classes`` (``class_labels=None`` selects it).
        heads, groups, dropout: attention heads, GroupNorm groups, ResBlock dropout.
        prediction_type: what the output means: "epsilon", "v_prediction" or "sample".
        time_sharing: E-TSDM sharing the weights were trained with (metadata for the
            samplers; the forward pass itself does NOT apply it): a TimeSharing, its
            ``{"t_tilde", "n"}`` dict (as in ``config``), or None.
        sample_size: the training resolution (metadata).
        time_embedding: False builds the net without a time path (no time embedding,
            no time MLP; ResBlocks see only the class embedding, or nothing): the
            time-free network of SingDiffusion's initial predictor
            (:class:`fastdiff.singular.InitialPredictor`). ``t`` is then ignored (may
            be None).

    ``forward``: x [B, C, H, W] (H, W divisible by 2**(levels-1)); t a number, a 0-d
    tensor, or [B] integer / floating timesteps in schedule units (0..T-1); class_labels
    None or int64 [B]. Works under ``torch.func.jvp`` / ``vmap`` in t and ``torch.compile``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 2,
                 attention_levels: Sequence[int] = (1,), mid_attention: bool = True,
                 num_classes: int | None = None, heads: int = 4, groups: int = 8,
                 dropout: float = 0.0, prediction_type: str = "epsilon",
                 time_sharing: TimeSharing | None = None, sample_size: int = 8,
                 time_embedding: bool = True):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"UNet: prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {prediction_type!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
            raise ValueError(f"UNet: num_classes must be None or a positive int, got {num_classes!r}")
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_levels = tuple(int(a) for a in attention_levels)
        if any(not 0 <= a < len(channel_mult) for a in attention_levels):
            raise ValueError(f"UNet: attention_levels {attention_levels} must index "
                             f"channel_mult {channel_mult}")
        out_channels = in_channels if out_channels is None else out_channels
        self.config = dict(in_channels=in_channels, out_channels=out_channels, channels=channels,
                           channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
                           attention_levels=list(attention_levels), mid_attention=mid_attention,
                           num_classes=num_classes, heads=heads, groups=groups, dropout=dropout,
                           prediction_type=prediction_type, sample_size=sample_size)
        if not time_embedding:  # only when off: the shipped models' configs stay as they are
            self.config["time_embedding"] = False
        self.prediction_type = prediction_type
        self.time_sharing = time_sharing  # also recorded in self.config (see the setter)
        self.num_classes = num_classes
        self.sample_size = sample_size
        self.levels = len(channel_mult)

        emb_dim = 4 * channels if time_embedding or num_classes else None
        self.time_proj = self.time_mlp = None
        if time_embedding:
            self.time_proj = SinusoidalEmbedding(channels, flip_sin_to_cos=True,
                                                 downscale_freq_shift=0.0)
            self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(),
                                          nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        def block(ci, co):
            return ResBlock(ci, co, emb_dim, groups, dropout)

        def attn(c):
            return SelfAttention(c, heads, groups)

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_ch = [channels]
        ch = channels
        for lvl, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                co = channels * mult
                layers = [block(ch, co)] + ([attn(co)] if lvl in attention_levels else [])
                self.down.append(nn.ModuleList(layers))
                ch = co
                skip_ch.append(ch)
            if lvl != self.levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_ch.append(ch)
        self.mid = nn.ModuleList([block(ch, ch)] + ([attn(ch)] if mid_attention else [])
                                 + [block(ch, ch)])
        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                co = channels * mult
                layers = [block(ch + skip_ch.pop(), co)]
                layers += [attn(co)] if lvl in attention_levels else []
                if lvl != 0 and i == num_res_blocks:
                    layers.append(_Upsample(co))
                self.up.append(nn.ModuleList(layers))
                ch = co
        self.norm_out = _norm(ch, groups)
        self.conv_out = _zero(nn.Conv2d(ch, out_channels, 3, padding=1))

    @property
    def time_sharing(self) -> TimeSharing | None:
        return self._time_sharing

    @time_sharing.setter
    def time_sharing(self, sharing) -> None:
        # Kept in ``config`` so that ``UNet(**model.config)`` rebuilds the same model.
        from .model_io import sharing_from_dict, sharing_to_dict

        if not isinstance(sharing, (TimeSharing, dict, type(None))):
            raise TypeError(f"UNet: time_sharing must be a fastdiff.TimeSharing or None, "
                            f"got {type(sharing).__name__}")
        self._time_sharing = sharing_from_dict(sharing, "UNet: time_sharing")
        self.config["time_sharing"] = sharing_to_dict(self._time_sharing)

    @property
    def null_class(self) -> int | None:
        """The label index meaning "no class" (classifier-free guidance), or None."""
        return self.num_classes

    def _time(self, t, batch: int, device) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"UNet: t must be a number or a tensor, got {type(t).__name__}")
            return torch.full((batch,), t, device=device,
                              dtype=torch.int64 if isinstance(t, int) else torch.float32)
        if t.dim() == 0:
            return t.reshape(1).expand(batch)
        if t.dim() != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"UNet: t must be a number, a 0-d tensor or shape [{batch}], "
                             f"got {tuple(t.shape)}")
        return t.expand(batch) if t.shape[0] != batch else t

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"UNet: x must be a tensor [B, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        B = x.shape[0]
        f = 2 ** (self.levels - 1)
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"UNet: H and W must be divisible by {f}, got {tuple(x.shape[-2:])}")
        emb = None
        if self.time_mlp is not None:
            emb = self.time_mlp(self.time_proj(self._time(t, B, x.device)).to(x.dtype))
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
            elif class_labels.dim() != 1 or class_labels.shape[0] != B:
                raise ValueError(f"UNet: class_labels must have shape [{B}], "
                                 f"got {tuple(class_labels.shape)}")
            c = self.class_emb(class_labels)
            emb = c if emb is None else emb + c
        elif class_labels is not None:
            raise ValueError("UNet: class_labels given but the model is unconditional "
                             "(num_classes=None)")

        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layers in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
