"""Scaled dot-product attention with a fused forward-mode AD rule.

:func:`scaled_dot_product_attention` computes what
``torch.nn.functional.scaled_dot_product_attention`` does. Called with forward-mode
tangents (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``), it reads the
tangents off its dual inputs and makes one ``fastdiff::sdpa_jvp`` call, which forms the
attention output and its tangent together in one pass over key blocks with an online
softmax (the flash-attention recurrence extended by the running sums the softmax
derivative needs): the [Lq, Lk] attention matrix is never stored, and the primal is not
computed a second time. torch's own fused attention kernels have no forward-AD formula,
and its math backend materialises the matrix and its tangent. Without tangents the call
is torch's (its fused kernels, its reverse mode).

With a mask, dropout, ``is_causal`` or grouped-query attention the call is passed to
torch unchanged (run it on the math backend, ``torch.nn.attention.sdpa_kernel``, to
differentiate it in forward mode).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _dual, _ops

__all__ = ["scaled_dot_product_attention", "sdpa_jvp"]

_SDPA_ARGS = (("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
               "enable_gqa"), (None, None, None, None, 0.0, False, None, False))


def _default_scale(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def sdpa_jvp(q, k, v, dq, dk, dv, scale: float | None = None):
    """Attention ``softmax(q k^T * scale) v`` and its tangent along ``(dq, dk, dv)``.

    Args:
        q, dq: [..., Lq, D]; k, dk: [..., Lk, D]; v, dv: [..., Lk, Dv] with equal batch
            dims, one floating dtype and device (no broadcasting).
        scale: None: ``1 / sqrt(D)``, as torch.

    Returns:
        ``(out, dout)``, each [..., Lq, Dv] in q's dtype (float32 math; float64 for
        float64). On CPU a C++ kernel; elsewhere the pure-torch reference.
    """
    ts = (q, k, v, dq, dk, dv)
    names = ("q", "k", "v", "dq", "dk", "dv")
    for n, t in zip(names, ts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sdpa_jvp: {n} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"sdpa_jvp: {n} must be a floating tensor, got {t.dtype}")
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"sdpa_jvp: q, k, v must be [..., L, D] with the same number of dims, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (q.shape[:-2] != k.shape[:-2] or q.shape[:-2] != v.shape[:-2] or k.shape[-1] != q.shape[-1]
            or v.shape[-2] != k.shape[-2]):
        raise ValueError(f"sdpa_jvp: expected q [..., Lq, D], k [..., Lk, D], v [..., Lk, Dv] "
                         f"with equal batch dims, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    for n, t, p in zip(names[3:], ts[3:], ts[:3]):
        if t.shape != p.shape:
            raise ValueError(f"sdpa_jvp: {n} must have the shape of {n[1:]} {tuple(p.shape)}, "
                             f"got {tuple(t.shape)}")
    if any(t.dtype != q.dtype or t.device != q.device for t in ts):
        raise TypeError("sdpa_jvp: all inputs must share q's dtype and device, got "
                        + ", ".join(f"{n} {t.dtype} {t.device}" for n, t in zip(names, ts)))
    s = _default_scale(q) if scale is None else float(scale)
    return _ops.call("sdpa_jvp", q, k, v, dq, dk, dv, s)


class _SdpaFn(torch.autograd.Function):
    """softmax(q k^T * scale) v whose forward already has the tangents ``(dq, dk, dv)``
    (read off the dual inputs by the caller): one ``fastdiff::sdpa_jvp`` call forms the
    output and its tangent together, and the jvp rule hands back the tangent it made.
    Reverse mode goes through torch's attention (recomputed in backward)."""

    @staticmethod
    def forward(q, k, v, scale, dq, dk, dv):
        return _ops.call("sdpa_jvp", q, k, v, dq, dk, dv, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs[:4]
        ctx.set_materialize_grads(False)  # backward sees None for an unused tangent output
        ctx.save_for_forward(output[1])
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale

    @staticmethod
    def jvp(ctx, *_):  # the input tangents are the dq, dk, dv forward already used
        (dout,) = ctx.saved_tensors
        # dout's own tangent is a second derivative, never asked for: callers take the
        # output alone, and nested transforms do not come here (nested_derivatives).
        return _dual.split(dout)[0], torch.zeros_like(dout)

    @staticmethod
    def backward(ctx, grad, grad_dout):
        if grad_dout is not None:
            raise NotImplementedError(
                "fastdiff.attention: reverse mode through the forward-mode tangent of "
                "scaled_dot_product_attention is not implemented (sdpa_jvp has no derivative); "
                "run torch's attention on its math backend (torch.nn.attention.sdpa_kernel) "
                "for that")
        if grad is None:
            return (None,) * 7
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            ins = [t.detach().requires_grad_() for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*ins, scale=ctx.scale)
            gq, gk, gv = torch.autograd.grad(out, ins, grad)
        return gq, gk, gv, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, scale, dq, dk, dv):
        # The op takes any leading batch dims: the vmapped dim becomes one more (expanded,
        # stride 0, where an input is not batched).
        ts = []
        for t, d in zip((q, k, v, dq, dk, dv), in_dims[:3] + in_dims[4:]):
            ts.append(t.expand(info.batch_size, *t.shape) if d is None else t.movedim(d, 0))
        q, k, v, dq, dk, dv = ts
        return _SdpaFn.apply(q, k, v, scale, dq, dk, dv), (0, 0)


def fused_jvp_applies(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> bool:
    """Whether a ``scaled_dot_product_attention`` call is the case the fused rule covers:
    no mask, no dropout, not causal, q, k, v of one dtype with equal batch dims."""
    return (attn_mask is None and not dropout_p and not is_causal and not enable_gqa
            and all(isinstance(t, torch.Tensor) for t in (q, k, v))
            and q.dim() >= 2 and k.dim() == q.dim() and v.dim() == q.dim()
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
            and q.dtype == k.dtype == v.dtype and q.is_floating_point())


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` whose forward-mode derivative
    (``torch.func.jvp``, ``torch.func.jacfwd``, ``torch.autograd.forward_ad``) is fused.

    Shapes as torch: query [..., Lq, D], key [..., Lk, D], value [..., Lk, Dv] ->
    [..., Lq, Dv]. Without mask, dropout, ``is_causal`` and ``enable_gqa``, inputs that
    carry forward-mode tangents go to ``fastdiff::sdpa_jvp`` (output and tangent in one
    call); reverse mode through the result works too (through torch's attention,
    recomputed in backward), and ``vmap`` of it (``jacfwd``). Inputs without tangents, and
    any other call, go to torch unchanged.
    """
    if not fused_jvp_applies(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    parts = [_dual.split(t) for t in (query, key, value)]
    if all(t is None for _, t in parts):  # no forward-mode tangent: torch's own kernels
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    if _dual.nested_derivatives():  # sdpa_jvp has no derivative of its own: torch's math form
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(query, key, value, scale=scale)
    tangents = [torch.zeros_like(p) if t is None else t for p, t in parts]
    s = _default_scale(query) if scale is None else float(scale)
    return _SdpaFn.apply(query, key, value, s, *tangents)[0]
