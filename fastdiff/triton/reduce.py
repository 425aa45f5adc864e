"""Triton kernel of ``fastdiff::diff_norm``: per-row ``||a[i] - b[i]||_2`` (same semantics
as ``fastdiff._ops.diff_norm_ref``).

Same accuracy scheme as the C++ kernels (csrc/kernels/reduce.h): a program sums the
squares of one block of one row in float32 (float64 for float64 inputs) as a tree
(``tl.sum``); the per-block sums are added in float64 per row, then the square root.
The (block, row) grid also keeps a GPU busy when there are few long rows.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["diff_norm"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _block_sq_kernel(a_ptr, b_ptr, part_ptr, S, NBLK, BLOCK: tl.constexpr):
    k = tl.program_id(0)
    r = tl.program_id(1)
    offs = k * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    idx = r.to(tl.int64) * S + offs
    acc = part_ptr.dtype.element_ty
    a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(acc)
    b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(acc)
    dlt = a - b
    tl.store(part_ptr + r.to(tl.int64) * NBLK + k, tl.sum(dlt * dlt, axis=0))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def diff_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton ``fastdiff::diff_norm``. a, b: [B, ...] of one floating dtype (any strides).
    Returns [B] float32 (float64 for float64 inputs)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() < 1:
        raise ValueError("diff_norm: a and b must be tensors of shape [B, ...]")
    if a.shape != b.shape:
        raise ValueError(f"diff_norm: a has shape {tuple(a.shape)} but b has shape "
                         f"{tuple(b.shape)}")
    if a.dtype not in _DTYPES:
        raise TypeError(f"diff_norm: a must be float32/float16/bfloat16/float64, got {a.dtype}")
    if b.dtype != a.dtype:
        raise TypeError(f"diff_norm: a has dtype {a.dtype} but b has dtype {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"diff_norm: a is on {a.device} but b is on {b.device}")
    if a.device.type != "cuda" and not _interpreting():
        raise ValueError(f"diff_norm (Triton): tensors must be on a CUDA device, got {a.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run on CPU)")
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    B = a.shape[0]
    if B > 65535:
        raise ValueError(f"diff_norm (Triton): at most 65535 rows per call, got {B}")
    S = a.numel() // B if B else 0
    if B == 0 or S == 0:
        return torch.zeros(B, dtype=acc, device=a.device)
    # kBlock of csrc/kernels/reduce.h on a GPU; the interpreter (~1 ms per program) gets
    # larger blocks.
    cap = 65536 if _interpreting() else 4096
    block = min(cap, max(16, triton.next_power_of_2(S)))
    nblk = triton.cdiv(S, block)
    part = torch.empty((B, nblk), dtype=acc, device=a.device)
    _block_sq_kernel[(nblk, B)](a.contiguous(), b.contiguous(), part, S, nblk, BLOCK=block,
                                num_warps=8 if block >= 4096 else 4)
    return part.to(torch.float64).sum(dim=1).sqrt().to(acc)
