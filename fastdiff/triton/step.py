"""Triton kernel of ``fastdiff::sampler_step`` (same arguments and semantics as
``fastdiff._ops.step_ref``).

One program handles one block of one sample's elements: it loads that sample's
coefficient row (a few scalars), reads every input of the block once, forms the direction
d and writes each output once. Math runs in float32 (float64 for float64 samples), in
the reference's rounding order (FMA contraction off, IEEE division). Runs on CUDA
tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._ops import STEP_HEAD, check_step_out, step_n_basis

__all__ = ["sampler_step", "sampler_step_out"]

# Pointer slots of the kernel. More outputs are served by further launches (each
# recomputes d); more history tensors than this are rejected.
MAX_HIST = 8
MAX_OUT = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _term(y, only, c, v):
    # One more basis term: y + c * v, and whether the row still selects d alone.
    return y + c * v, only & (c == 0)


@triton.jit
def _output(row, NB: tl.constexpr, x, xb, d, nz, h0, h1, h2, h3, h4, h5, h6, h7,
            N_HIST: tl.constexpr, HAS_XB: tl.constexpr, HAS_NOISE: tl.constexpr):
    # sum_j C_j * basis_j over [x, x_base, d, noise, h_0..], accumulated in basis order;
    # a row that selects d alone (1 on d, 0 on every present term) gives d itself.
    c_x = tl.load(row)
    c_d = tl.load(row + 2)
    y = c_x * x
    only = (c_x == 0) & (c_d == 1)
    if HAS_XB:
        y, only = _term(y, only, tl.load(row + 1), xb)
    y = y + c_d * d
    if HAS_NOISE:
        y, only = _term(y, only, tl.load(row + 3), nz)
    if N_HIST > 0:
        y, only = _term(y, only, tl.load(row + 4), h0)
    if N_HIST > 1:
        y, only = _term(y, only, tl.load(row + 5), h1)
    if N_HIST > 2:
        y, only = _term(y, only, tl.load(row + 6), h2)
    if N_HIST > 3:
        y, only = _term(y, only, tl.load(row + 7), h3)
    if N_HIST > 4:
        y, only = _term(y, only, tl.load(row + 8), h4)
    if N_HIST > 5:
        y, only = _term(y, only, tl.load(row + 9), h5)
    if N_HIST > 6:
        y, only = _term(y, only, tl.load(row + 10), h6)
    if N_HIST > 7:
        y, only = _term(y, only, tl.load(row + 11), h7)
    return tl.where(only, d, y)


@triton.jit
def _narrow(y, out_ty: tl.constexpr, RNE_BF16: tl.constexpr):
    if RNE_BF16:
        # The interpreter casts float32 -> bfloat16 by truncation (GPUs round to nearest
        # even, as torch): round the float32 bits first so that the cast is exact.
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
    return y.to(out_ty)


@triton.jit
def _step_kernel(x_ptr, xb_ptr, m_ptr, mc_ptr, nz_ptr,
                 h0_ptr, h1_ptr, h2_ptr, h3_ptr, h4_ptr, h5_ptr, h6_ptr, h7_ptr,
                 o0_ptr, o1_ptr, o2_ptr, o3_ptr, c_ptr, c_stride, S,
                 HEAD: tl.constexpr, NB: tl.constexpr, FIRST_OUT: tl.constexpr,
                 N_OUT: tl.constexpr, N_HIST: tl.constexpr, HAS_XB: tl.constexpr,
                 HAS_COND: tl.constexpr, HAS_NOISE: tl.constexpr, CLAMP: tl.constexpr,
                 F64: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    idx = b.to(tl.int64) * S + offs
    acc = c_ptr.dtype.element_ty
    row = c_ptr + b.to(tl.int64) * c_stride

    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(acc)
    m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(acc)
    if HAS_COND:
        mc = tl.load(mc_ptr + idx, mask=mask, other=0.0).to(acc)
        m = m + tl.load(row) * (mc - m)
    d = tl.load(row + 5) * x + tl.load(row + 6) * m
    if CLAMP:
        s = tl.load(row + 3)
        x0 = tl.load(row + 1) * x + tl.load(row + 2) * m
        x0 = tl.where(x0 > s, s, x0)  # NaN passes through, as torch.minimum/maximum
        x0 = tl.where(x0 < -s, -s, x0)
        if F64:
            x0c = x0 / tl.load(row + 4)
        else:
            x0c = tl.math.div_rn(x0, tl.load(row + 4))  # IEEE, as torch (`/` may be 2 ulp)
        d = d + tl.load(row + 7) * x0c

    zero = tl.zeros([BLOCK], acc)
    xb = zero
    nz = zero
    if HAS_XB:
        xb = tl.load(xb_ptr + idx, mask=mask, other=0.0).to(acc)
    if HAS_NOISE:
        nz = tl.load(nz_ptr + idx, mask=mask, other=0.0).to(acc)
    h0 = zero
    h1 = zero
    h2 = zero
    h3 = zero
    h4 = zero
    h5 = zero
    h6 = zero
    h7 = zero
    if N_HIST > 0:
        h0 = tl.load(h0_ptr + idx, mask=mask, other=0.0).to(acc)
    if N_HIST > 1:
        h1 = tl.load(h1_ptr + idx, mask=mask, other=0.0).to(acc)
    if N_HIST > 2:
        h2 = tl.load(h2_ptr + idx, mask=mask, other=0.0).to(acc)
    if N_HIST > 3:
        h3 = tl.load(h3_ptr + idx, mask=mask, other=0.0).to(acc)
    if N_HIST > 4:
        h4 = tl.load(h4_ptr + idx, mask=mask, other=0.0).to(acc)
    if N_HIST > 5:
        h5 = tl.load(h5_ptr + idx, mask=mask, other=0.0).to(acc)
    if N_HIST > 6:
        h6 = tl.load(h6_ptr + idx, mask=mask, other=0.0).to(acc)
    if N_HIST > 7:
        h7 = tl.load(h7_ptr + idx, mask=mask, other=0.0).to(acc)

    out_ty = o0_ptr.dtype.element_ty
    rows = row + HEAD + FIRST_OUT * NB
    y = _output(rows, NB, x, xb, d, nz, h0, h1, h2, h3, h4, h5, h6, h7, N_HIST, HAS_XB, HAS_NOISE)
    tl.store(o0_ptr + idx, _narrow(y, out_ty, RNE_BF16), mask=mask)
    if N_OUT > 1:
        y = _output(rows + NB, NB, x, xb, d, nz, h0, h1, h2, h3, h4, h5, h6, h7, N_HIST, HAS_XB,
                    HAS_NOISE)
        tl.store(o1_ptr + idx, _narrow(y, out_ty, RNE_BF16), mask=mask)
    if N_OUT > 2:
        y = _output(rows + 2 * NB, NB, x, xb, d, nz, h0, h1, h2, h3, h4, h5, h6, h7, N_HIST,
                    HAS_XB, HAS_NOISE)
        tl.store(o2_ptr + idx, _narrow(y, out_ty, RNE_BF16), mask=mask)
    if N_OUT > 3:
        y = _output(rows + 3 * NB, NB, x, xb, d, nz, h0, h1, h2, h3, h4, h5, h6, h7, N_HIST,
                    HAS_XB, HAS_NOISE)
        tl.store(o3_ptr + idx, _narrow(y, out_ty, RNE_BF16), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(x, x_base, model_out, model_out_cond, history, noise, coeffs, n_out):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("sampler_step: x must be a tensor of shape [B, ...]")
    if x.dtype not in _DTYPES:
        raise TypeError(f"sampler_step: x must be float32/float16/bfloat16/float64, got {x.dtype}")
    named = [("model_out", model_out), ("x_base", x_base), ("model_out_cond", model_out_cond),
             ("noise", noise)] + [(f"history[{k}]", h) for k, h in enumerate(history)]
    for name, t in named:
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"sampler_step: {name} has shape {tuple(t.shape)}, expected x's "
                             f"shape {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"sampler_step: {name} has dtype {t.dtype}, expected x's dtype "
                            f"{x.dtype}")
        if t.device != x.device:
            raise ValueError(f"sampler_step: {name} is on {t.device}, expected x's device "
                             f"{x.device}")
    if not isinstance(n_out, int) or n_out < 1:
        raise ValueError(f"sampler_step: n_out must be >= 1, got {n_out!r}")
    if len(history) > MAX_HIST:
        raise ValueError(f"sampler_step (Triton): at most {MAX_HIST} history tensors, got "
                         f"{len(history)}")
    B = x.shape[0]
    want = STEP_HEAD + n_out * step_n_basis(len(history))
    if coeffs.dim() != 2 or coeffs.shape[0] not in (1, B) or coeffs.shape[1] != want:
        raise ValueError(f"sampler_step: coeffs must have shape [{B} or 1, {want}] for "
                         f"n_out={n_out} and {len(history)} history tensors, got "
                         f"{tuple(coeffs.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if coeffs.dtype != acc:
        raise TypeError(f"sampler_step: coeffs must be {acc} for {x.dtype} samples, got "
                        f"{coeffs.dtype}")
    if coeffs.device != x.device:
        raise ValueError(f"sampler_step: coeffs is on {coeffs.device}, expected {x.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"sampler_step (Triton): tensors must be on a CUDA device, got "
                         f"{x.device} (set TRITON_INTERPRET=1 before importing triton to run on "
                         "CPU)")
    if B > 65535:
        raise ValueError(f"sampler_step (Triton): at most 65535 samples per call, got {B}")


def _block(S: int) -> int:
    # The interpreter pays ~1 ms per program: few, large blocks. A GPU wants ~1K elements
    # per program for occupancy.
    cap = 65536 if _interpreting() else 1024
    return min(cap, max(16, triton.next_power_of_2(S)))


def sampler_step(x: torch.Tensor, x_base: torch.Tensor | None, model_out: torch.Tensor,
                 model_out_cond: torch.Tensor | None, history: list[torch.Tensor],
                 noise: torch.Tensor | None, coeffs: torch.Tensor, clamp: bool,
                 n_out: int) -> list[torch.Tensor]:
    """Triton ``fastdiff::sampler_step``; see ``fastdiff._ops.step_ref``.

    x, model_out and the optional x_base, model_out_cond, noise, history[k]: [B, ...] of
    one dtype (any strides: non-contiguous ones are copied first). coeffs: [B or 1,
    STEP_HEAD + n_out * (4 + len(history))] float32 (float64 for float64 x). Returns
    n_out contiguous tensors like x.
    """
    history = list(history)
    _check(x, x_base, model_out, model_out_cond, history, noise, coeffs, n_out)
    outs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(n_out)]
    _launch(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, outs)
    return outs


def sampler_step_out(x: torch.Tensor, x_base: torch.Tensor | None, model_out: torch.Tensor,
                     model_out_cond: torch.Tensor | None, history: list[torch.Tensor],
                     noise: torch.Tensor | None, coeffs: torch.Tensor, clamp: bool, *,
                     out: list[torch.Tensor]) -> None:
    """Triton ``fastdiff::sampler_step.out``: the step written into ``out`` (contiguous
    tensors like x; each may be one of the inputs exactly, see
    ``fastdiff._ops.check_step_out``: a program loads all inputs of its block before it
    stores, and up to MAX_OUT outputs take one launch)."""
    history = list(history)
    _check(x, x_base, model_out, model_out_cond, history, noise, coeffs, len(out))
    check_step_out(x, x_base, model_out, model_out_cond, history, noise, coeffs, out)
    _launch(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, list(out))


def _launch(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, outs):
    B = x.shape[0]
    if x.numel() == 0:
        return
    S = x.numel() // B
    n_out = len(outs)

    def c(t):
        return None if t is None else t.contiguous()

    xc, mc, xbc, mcc, nzc = c(x), c(model_out), c(x_base), c(model_out_cond), c(noise)
    hs = [h.contiguous() for h in history]
    coeffs = coeffs.contiguous()
    hslots = hs + [xc] * (MAX_HIST - len(hs))  # unused slots: any valid pointer
    block = _block(S)
    grid = (triton.cdiv(S, block), B)
    for first in range(0, n_out, MAX_OUT):
        group = outs[first:first + MAX_OUT]
        oslots = group + [group[0]] * (MAX_OUT - len(group))
        _step_kernel[grid](
            xc, xbc if xbc is not None else xc, mc, mcc if mcc is not None else xc,
            nzc if nzc is not None else xc, *hslots, *oslots, coeffs,
            coeffs.stride(0) if coeffs.shape[0] > 1 else 0, S,
            HEAD=STEP_HEAD, NB=step_n_basis(len(hs)), FIRST_OUT=first, N_OUT=len(group),
            N_HIST=len(hs), HAS_XB=xbc is not None, HAS_COND=mcc is not None,
            HAS_NOISE=nzc is not None, CLAMP=bool(clamp), F64=x.dtype == torch.float64,
            RNE_BF16=x.dtype == torch.bfloat16 and _interpreting(), BLOCK=block,
            enable_fp_fusion=False)
