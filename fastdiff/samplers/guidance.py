"""Guidance rescale (Lin et al., WACV 2024; diffusers' ``guidance_rescale``), folded into
the fused step's coefficient row.

diffusers' ``rescale_noise_cfg`` forms the guided output cfg = m_u + w (m_c - m_u), then
``cfg_r = cfg * std(m_c) / std(cfg)`` (std per sample over all non-batch dims) and
``phi * cfg_r + (1 - phi) * cfg``: the guided output times a per-sample factor
``f = 1 - phi + phi * std(m_c) / std(cfg)``. The fused step only ever uses the guided
output m through its two conversion columns (x0 = p_x x + p_m m, d = w_x x + w_m m + ...),
so multiplying p_m and w_m of each sample's row by f is the same update with no tensor
written: what is left is one read of m_u and m_c for their per-sample moments, on the
device, with no host synchronisation.
"""
from __future__ import annotations

import torch

__all__ = ["rescale_coeffs", "guidance_moments"]

_P_M, _W_M = 2, 6  # the columns of the guided output in a step's coefficient row


def _pair(u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[B, 2, N] with rows (u_b, c_b): a view when u and c are the two halves of one
    contiguous CFG batch (how ``fastdiff.sample`` calls the model), else a stacked copy."""
    B, N = u.shape[0], u[0].numel()
    if (u.is_contiguous() and c.is_contiguous() and u.dtype == c.dtype
            and u.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()
            and c.data_ptr() == u.data_ptr() + u.numel() * u.element_size()):
        return u.as_strided((B, 2, N), (N, B * N, 1))
    return torch.stack([u.reshape(B, N), c.reshape(B, N)], 1)


def guidance_moments(u: torch.Tensor, c: torch.Tensor):
    """Per-sample sums [B, 2] (of u, c) and Gram matrices [B, 2, 2] (u.u, u.c, c.c), in
    float32 (float64 for float64 inputs); one batched matmul and one sum over the pair."""
    X = _pair(u, c)
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()  # half-precision sums would lose the variance
    return X.sum(-1), torch.bmm(X, X.transpose(1, 2))


def rescale_coeffs(coeffs: torch.Tensor, m_u: torch.Tensor, m_c: torch.Tensor,
                   phi: float) -> torch.Tensor:
    """A step's coefficient rows [B, n] with guidance rescale ``phi`` folded in.

    ``coeffs`` [B or 1, n] (column 0 the guidance weight w), ``m_u``, ``m_c`` the
    unconditional / conditional model outputs [B, ...]. Returns new rows [B, n] in
    ``coeffs``' dtype whose update equals the unrescaled update applied to
    ``rescale_noise_cfg(m_u + w (m_c - m_u), m_c, phi)``.
    """
    B, N = m_u.shape[0], m_u[0].numel()
    acc = coeffs.dtype
    S, G = guidance_moments(m_u, m_c)
    S, G = S.to(acc), G.to(acc)
    w = coeffs[:, 0]
    su, sc = S[:, 0], S[:, 1]
    guu, guc, gcc = G[:, 0, 0], G[:, 0, 1], G[:, 1, 1]
    var_c = gcc - sc * sc / N
    s_cfg = (1 - w) * su + w * sc
    g_cfg = (1 - w) ** 2 * guu + 2 * w * (1 - w) * guc + w * w * gcc
    var_cfg = g_cfg - s_cfg * s_cfg / N  # both variances times (N - 1): the ratio is the same
    # A constant guided output (std 0: diffusers divides 0 / 0) is left unscaled.
    f = torch.where(var_cfg > 0, 1 - phi + phi * torch.sqrt(var_c / var_cfg), 1.0)
    out = coeffs.expand(B, -1).clone()
    out[:, _P_M] *= f
    out[:, _W_M] *= f
    return out
