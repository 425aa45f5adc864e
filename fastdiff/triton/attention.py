"""Triton kernel of ``fastdiff::sdpa_jvp``: ``softmax(q k^T * scale) v`` and its tangent
along ``(dq, dk, dv)`` (same arguments and semantics as ``fastdiff._ops.sdpa_jvp_ref``).

The flash-attention scheme extended to the tangent: one program holds a block of query
rows of one (batch, head) and walks the keys block by block. With s = q k^T * scale,
ds = (dq k^T + q dk^T) * scale and e = exp(s - m) for the running row max m, it keeps

    l = sum e,  c = sum e ds,  acc = e v,  acc_dv = e dv,  acc_dsv = (e (ds - mu)) v

(all rescaled by exp(m_old - m_new) when m grows; mu = c / l so far, acc_dsv shifted by
(mu_old - mu_new) acc when it moves), and at the end writes ``out = acc / l`` and
``dout = (acc_dv + acc_dsv) / l``: the softmax derivative's ``- (c / l) out`` is folded
into acc_dsv block by block, so its two large terms under a peaked softmax cancel before
they are rounded, not after. Nothing larger
than a [BLOCK_M, BLOCK_N] tile of s and ds exists. Head dims are padded (masked) to a
power of two of at least 16, so any D, Dv up to 256 works; inputs may have any strides.

Accumulation is in float32 (float64 for float64 inputs). The products are exact-fp32
("ieee") for float32 inputs, not TF32; float16 / bfloat16 inputs multiply in their own
precision on tensor cores, the probabilities rounded to it for the value products (as
flash attention does), accumulating in float32. Runs on CUDA tensors, and on CPU tensors
under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["sdpa_jvp"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256


@triton.jit
def _mm(a, b, ACC: tl.constexpr, LOW: tl.constexpr, WIDEN: tl.constexpr):
    """a @ b accumulated in ACC: low-precision operands on tensor cores; otherwise (and
    where WIDEN: the interpreter's bfloat16 dot is wrong) widened, exact-fp32 products."""
    if LOW and not WIDEN:
        return tl.dot(a, b)
    return tl.dot(a.to(ACC), b.to(ACC), input_precision="ieee", out_dtype=ACC)


@triton.jit
def _sdpa_jvp_kernel(q_ptr, k_ptr, v_ptr, dq_ptr, dk_ptr, dv_ptr, o_ptr, do_ptr, scale_ptr,
                     # (batch, head, row, column) strides of q, k, v, dq, dk, dv
                     sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                     sdqb, sdqh, sdql, sdqd, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd,
                     H, LQ, LK, D, DV,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, ACC: tl.constexpr, LOW: tl.constexpr,
                     WIDEN: tl.constexpr):
    bh = tl.program_id(0)  # (batch, head) on the first grid axis: it has no 65535 limit
    pid_m = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    dvv = tl.arange(0, BLOCK_DV)
    row_ok = rows < LQ
    d_ok = dd < D
    dv_ok = dvv < DV

    scale = tl.load(scale_ptr)  # in ACC: a Python float argument would be float32
    qm = row_ok[:, None] & d_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b * sqb + h * sqh + r64 * sql + dd[None, :] * sqd, mask=qm, other=0.0)
    dq = tl.load(dq_ptr + b * sdqb + h * sdqh + r64 * sdql + dd[None, :] * sdqd, mask=qm,
                 other=0.0)

    k_base = k_ptr + b * skb + h * skh
    dk_base = dk_ptr + b * sdkb + h * sdkh
    v_base = v_ptr + b * svb + h * svh
    dv_base = dv_ptr + b * sdvb + h * sdvh

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    c_i = tl.zeros([BLOCK_M], ACC)
    mu = tl.zeros([BLOCK_M], ACC)  # the running mean c / l of ds, subtracted in acc_dsv
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    acc_dv = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    acc_dsv = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    for n0 in range(0, LK, BLOCK_N):
        n = n0 + cols
        n_ok = n < LK
        n64 = n.to(tl.int64)
        km = d_ok[:, None] & n_ok[None, :]  # k^T tiles [BLOCK_D, BLOCK_N]
        kt = tl.load(k_base + n64[None, :] * skl + dd[:, None] * skd, mask=km, other=0.0)
        dkt = tl.load(dk_base + n64[None, :] * sdkl + dd[:, None] * sdkd, mask=km, other=0.0)
        vm = n_ok[:, None] & dv_ok[None, :]
        v = tl.load(v_base + n64[:, None] * svl + dvv[None, :] * svd, mask=vm, other=0.0)
        dv = tl.load(dv_base + n64[:, None] * sdvl + dvv[None, :] * sdvd, mask=vm, other=0.0)
        s = _mm(q, kt, ACC, LOW, WIDEN)
        ds = _mm(dq, kt, ACC, LOW, WIDEN) + _mm(q, dkt, ACC, LOW, WIDEN)
        s = tl.where(n_ok[None, :], s.to(ACC) * scale, float("-inf"))
        ds = tl.where(n_ok[None, :], ds.to(ACC) * scale, 0.0)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)  # 0 on the first block (m_i = -inf)
        e = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        c_i = c_i * alpha + tl.sum(e * ds, axis=1)
        # acc_dsv holds sum e (ds - mu) v: dout's two ds terms then cancel before they are
        # formed, not after (a peaked softmax makes both large; the value products round
        # e ds to v's precision). Moving mu to the new mean shifts it by a multiple of acc.
        mu_new = c_i / l_i
        acc = acc * alpha[:, None]
        acc_dsv = acc_dsv * alpha[:, None] + (mu - mu_new)[:, None] * acc
        eds = e * (ds - mu_new[:, None])
        # the value products take e and e ds in v's precision (as flash attention takes p)
        acc = acc + _mm(e.to(v.dtype), v, ACC, LOW, WIDEN)
        acc_dv = acc_dv * alpha[:, None] + _mm(e.to(dv.dtype), dv, ACC, LOW, WIDEN)
        acc_dsv = acc_dsv + _mm(eds.to(v.dtype), v, ACC, LOW, WIDEN)
        m_i = m_new
        mu = mu_new

    # dout = (acc_dv + sum e ds v) / l - (c / l) out, with sum e ds v = acc_dsv + mu acc
    # and mu = c / l
    inv = 1.0 / l_i
    out = acc * inv[:, None]
    dout = (acc_dv + acc_dsv) * inv[:, None]
    o_off = bh.to(tl.int64) * LQ * DV + r64 * DV + dvv[None, :]
    om = row_ok[:, None] & dv_ok[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=om)
    tl.store(do_ptr + o_off, dout.to(do_ptr.dtype.element_ty), mask=om)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """[..., L, D] as [B, H, L, D] (a view where the batch dims allow it)."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[None]
    return t.reshape(-1, *t.shape[-3:])


def sdpa_jvp(q, k, v, dq, dk, dv, scale: float):
    """Triton ``fastdiff::sdpa_jvp``. q, dq: [..., Lq, D]; k, dk: [..., Lk, D]; v, dv:
    [..., Lk, Dv] (equal batch dims, one floating dtype and device, any strides; D, Dv
    at most 256). Returns ``(out, dout)``, each [..., Lq, Dv] in q's dtype."""
    ts = (q, k, v, dq, dk, dv)
    names = ("q", "k", "v", "dq", "dk", "dv")
    if not all(isinstance(t, torch.Tensor) for t in ts):
        raise TypeError("sdpa_jvp: q, k, v, dq, dk, dv must be tensors")
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim() or any(
            t.shape[:-2] != q.shape[:-2] for t in (k, v)):
        raise ValueError(f"sdpa_jvp: q, k, v must be [..., L, D] with the same batch dims, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1] or v.shape[-2] != k.shape[-2]:
        raise ValueError(f"sdpa_jvp: expected q [..., Lq, D], k [..., Lk, D], v [..., Lk, Dv], "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    for n, t, p in zip(names[3:], ts[3:], ts[:3]):
        if t.shape != p.shape:
            raise ValueError(f"sdpa_jvp: {n} must have the shape of {n[1:]} {tuple(p.shape)}, "
                             f"got {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"sdpa_jvp: q must be float32/float16/bfloat16/float64, got {q.dtype}")
    if any(t.dtype != q.dtype or t.device != q.device for t in ts):
        raise TypeError("sdpa_jvp: all inputs must share q's dtype and device, got "
                        + ", ".join(f"{n} {t.dtype} {t.device}" for n, t in zip(names, ts)))
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"sdpa_jvp (Triton): tensors must be on a CUDA device, got {q.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run on CPU)")
    D, Dv = q.shape[-1], v.shape[-1]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"sdpa_jvp (Triton): head dims up to {MAX_HEAD_DIM} are supported, got "
                         f"D={D}, Dv={Dv} (the C++ kernel and the reference have no limit)")
    Lq, Lk = q.shape[-2], k.shape[-2]
    shape = q.shape[:-1] + (Dv,)
    out = torch.empty(shape, dtype=q.dtype, device=q.device)
    dout = torch.empty(shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out, dout
    if Lk == 0:  # softmax over no keys: NaN, as torch's math backend
        return out.fill_(math.nan), dout.fill_(math.nan)
    q4, k4, v4, dq4, dk4, dv4 = (_as_4d(t) for t in ts)
    B, H = q4.shape[0], q4.shape[1]
    strides = [st for t in (q4, k4, v4, dq4, dk4, dv4) for st in t.stride()]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale_t = torch.full((1,), float(scale), dtype=acc_dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(Dv))
    big = max(block_d, block_dv) > 64
    if _interpreting():  # ~1 ms per program and per loop step: small tiles, few steps
        block_m, block_n = 16, 32
    else:
        block_m, block_n = (64, 32) if big else (64, 64)
    low = q.dtype in (torch.float16, torch.bfloat16)
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    if triton.cdiv(Lq, block_m) > 65535:
        raise ValueError(f"sdpa_jvp (Triton): at most {65535 * block_m} queries per call, "
                         f"got Lq={Lq}")
    grid = (B * H, triton.cdiv(Lq, block_m))
    _sdpa_jvp_kernel[grid](q4, k4, v4, dq4, dk4, dv4, out, dout, scale_t, *strides, H, Lq, Lk,
                           D, Dv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                           BLOCK_DV=block_dv, ACC=acc, LOW=low,
                           WIDEN=low and q.dtype == torch.bfloat16 and _interpreting(),
                           num_warps=8 if big else 4)
    return out, dout
