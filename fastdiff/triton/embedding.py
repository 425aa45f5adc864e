"""Triton kernel of ``fastdiff::timestep_embedding`` (same arguments and semantics as
``fastdiff._ops.embedding_ref``).

One program computes a block of rows x frequencies: it maps its rows' t through the
E-TSDM sharing map f (docs/etsdm.md), then writes the sin and cos columns of each
frequency (or, in derivative mode, d emb / d t). Integer t inside the optional cached
table is served from the table, so the result equals the C++ kernels' bit for bit there.
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

__all__ = ["timestep_embedding"]

# Maps of t: in float64 for integer t (exact), float32 for float32/16/bfloat16 t, float64
# for float64 t; the shared value is rounded back to t's dtype (fastdiff.schedules.share_tensor).
_MAP_INT, _MAP_F32, _MAP_F64 = 0, 1, 2


@triton.jit
def _embedding_kernel(t_ptr, t_stride, freqs_ptr, table_ptr, table_rows, params_ptr, out_ptr,
                      B, HALF: tl.constexpr, DIM: tl.constexpr, SIN_OFF: tl.constexpr,
                      COS_OFF: tl.constexpr, MAP: tl.constexpr, SHARE: tl.constexpr,
                      ROUND_BF16: tl.constexpr, USE_TABLE: tl.constexpr,
                      DERIVATIVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ks = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < B
    k_ok = ks < HALF
    acc_ty = freqs_ptr.dtype.element_ty

    tv = tl.load(t_ptr + rows.to(tl.int64) * t_stride, mask=row_ok, other=0)
    # width, end and scale arrive in float64 (a Python float argument would be float32).
    width = tl.load(params_ptr)
    end = tl.load(params_ptr + 1)
    scale = tl.load(params_ptr + 2).to(acc_ty)
    if SHARE:
        if MAP == 1:  # _MAP_F32
            tm = tv.to(tl.float32)
            width = width.to(tl.float32)
            end = end.to(tl.float32)
            # IEEE division as torch's: plain `/` in float32 may lower to div.full.f32 (2 ulp).
            q = tl.math.div_rn(tm, width)
        else:
            tm = tv.to(tl.float64)
            q = tm / width
        inside = tm < end
        ts = tl.where(inside, tl.floor(q) * width, tm)
        if ROUND_BF16:
            # Round to nearest even at bfloat16 precision by hand: the interpreter's
            # float32 -> bfloat16 cast truncates (the GPU's rounds).
            bits = ts.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            ts = bits.to(tl.float32, bitcast=True)
        else:
            ts = ts.to(t_ptr.dtype.element_ty)
        slope = tl.where(inside, 0.0, 1.0).to(acc_ty)
    else:
        ts = tv
        slope = tl.full([BLOCK_B], 1.0, acc_ty)

    freq = tl.load(freqs_ptr + ks, mask=k_ok, other=0.0)
    arg = scale * (ts.to(acc_ty)[:, None] * freq[None, :])
    s = tl.sin(arg)
    c = tl.cos(arg)
    if DERIVATIVE:
        kf = (scale * freq)[None, :] * slope[:, None]
        sin_col = c * kf
        cos_col = -s * kf
    else:
        sin_col = s
        cos_col = c

    out_row = out_ptr + rows.to(tl.int64)[:, None] * DIM
    mask = row_ok[:, None] & k_ok[None, :]
    if USE_TABLE:
        ti = tv.to(tl.int64)
        in_tab = row_ok & (ti >= 0) & (ti < table_rows)
        tab_row = table_ptr + tl.where(in_tab, ti, 0)[:, None] * DIM
        tmask = mask & in_tab[:, None]
        sin_col = tl.where(in_tab[:, None], tl.load(tab_row + SIN_OFF + ks[None, :], mask=tmask),
                           sin_col)
        cos_col = tl.where(in_tab[:, None], tl.load(tab_row + COS_OFF + ks[None, :], mask=tmask),
                           cos_col)
    tl.store(out_row + SIN_OFF + ks[None, :], sin_col, mask=mask)
    tl.store(out_row + COS_OFF + ks[None, :], cos_col, mask=mask)

    if DIM % 2 == 1:
        if pid_h == 0:
            pad = tl.zeros([BLOCK_B], acc_ty)
            if USE_TABLE:
                pad = tl.where(in_tab, tl.load(table_ptr + tl.where(in_tab, ti, 0) * DIM + DIM - 1,
                                               mask=in_tab), pad)
            tl.store(out_ptr + rows.to(tl.int64) * DIM + DIM - 1, pad, mask=row_ok)


@lru_cache(maxsize=64)
def _params(width: float, end: float, scale: float, device: torch.device) -> torch.Tensor:
    # Cached so that a GPU call does not copy three scalars host-to-device every time.
    return torch.tensor([width, end, scale], dtype=torch.float64, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(B: int, half: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_H), powers of two. The interpreter pays ~1 ms per program, so it
    gets few large blocks; a GPU gets ~2K elements per program for occupancy."""
    bh = triton.next_power_of_2(max(half, 1))
    bb = triton.next_power_of_2(max(B, 1))
    if _interpreting():
        bh = min(bh, 1024)
        return min(bb, max(1, 65536 // bh)), bh
    bh = min(bh, 128)
    return min(bb, max(1, 2048 // bh)), bh


def _check(t, freqs, table, dim, width, end):
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"timestep_embedding: t must be a tensor of shape [B], got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"timestep_embedding: t must be an integer or floating tensor, got {t.dtype}")
    if dim < 1:
        raise ValueError(f"timestep_embedding: dim must be >= 1, got {dim}")
    if freqs.dim() != 1 or freqs.shape[0] != dim // 2:
        raise ValueError(f"timestep_embedding: freqs must have shape [dim // 2] = [{dim // 2}], "
                         f"got {tuple(freqs.shape)}")
    if freqs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"timestep_embedding: freqs must be float32 or float64, got {freqs.dtype}")
    if end > 0 and not width > 0:
        raise ValueError(f"timestep_embedding: share_width must be > 0 when share_end > 0, got {width}")
    if table is not None:
        if table.dim() != 2 or table.shape[1] != dim:
            raise ValueError(f"timestep_embedding: table must have shape [R, {dim}], got "
                             f"{tuple(table.shape)}")
        if table.dtype != freqs.dtype:
            raise TypeError(f"timestep_embedding: table dtype {table.dtype} != freqs dtype {freqs.dtype}")
    for name, x in (("freqs", freqs), ("table", table)):
        if x is not None and x.device != t.device:
            raise ValueError(f"timestep_embedding: t is on {t.device} but {name} is on {x.device}")
    if t.device.type != "cuda" and not _interpreting():
        raise ValueError(f"timestep_embedding (Triton): tensors must be on a CUDA device, got "
                         f"{t.device} (set TRITON_INTERPRET=1 before importing triton to run on CPU)")


def timestep_embedding(t: torch.Tensor, freqs: torch.Tensor, table: torch.Tensor | None,
                       dim: int, flip_sin_to_cos: bool, scale: float, share_width: float,
                       share_end: float, derivative: bool) -> torch.Tensor:
    """Triton ``fastdiff::timestep_embedding``; see ``fastdiff._ops.embedding_ref``.

    t: [B] integer or floating timesteps (any stride); freqs: [dim // 2] float32/float64;
    table: optional [R, dim] embedding of integer t in [0, R), in freqs' dtype (used for
    integer t inside it, unless ``derivative``). Returns [B, dim] in freqs' dtype.
    """
    _check(t, freqs, table, dim, share_width, share_end)
    B, half = t.shape[0], dim // 2
    out = torch.empty((B, dim), dtype=freqs.dtype, device=t.device)
    if B == 0:
        return out
    if t.is_floating_point():
        map_kind = _MAP_F64 if t.dtype == torch.float64 else _MAP_F32
    else:
        map_kind = _MAP_INT
    use_table = table is not None and map_kind == _MAP_INT and not derivative
    freqs = freqs.contiguous()
    table = table.contiguous() if use_table else None
    bb, bh = _blocks(B, half)
    grid = (triton.cdiv(B, bb), max(1, triton.cdiv(half, bh)))
    _embedding_kernel[grid](
        t, t.stride(0), freqs, table if use_table else freqs,
        table.shape[0] if use_table else 0,
        _params(float(share_width), float(share_end), float(scale), t.device), out, B,
        HALF=half, DIM=dim, SIN_OFF=half if flip_sin_to_cos else 0,
        COS_OFF=0 if flip_sin_to_cos else half, MAP=map_kind, SHARE=share_end > 0,
        ROUND_BF16=t.dtype == torch.bfloat16, USE_TABLE=use_table, DERIVATIVE=bool(derivative),
        BLOCK_B=bb, BLOCK_H=bh)
    return out
