"""DDPM (ancestral) and DDIM: one model call, one fused update per step, no history."""
from __future__ import annotations

import numpy as np

from .core import Call, Coeffs, Op, Plan, convert
from .grid import Grid

__all__ = ["ddim", "ddpm", "targets"]

DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


def targets(grid: Grid):
    """(alpha, sigma) [R, N] each step moves to: the next grid point, or with diffusers'
    rule the level at ``t - T // steps`` (the final level below 0)."""
    if grid.rule is None:
        return grid.alpha[:, 1:], grid.sigma[:, 1:]
    return grid.lookup(grid.t - grid.rule)


def ddim(grid: Grid, *, pred, clamp, eta: float = 0.0, use_clipped_model_output: bool = False) -> Plan:
    """DDIM (Song et al. 2021), diffusers' DDIMScheduler.step::

        x' = a' X0 + sqrt(1 - a'^2 - std^2) EPS + std z,
        std = eta sqrt((s'^2 / s^2) (1 - a^2 / a'^2))

    eta = 0 is the deterministic sampler, eta = 1 ancestral DDPM-like sampling. EPS is
    the unclamped noise estimate unless ``use_clipped_model_output``.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ap, sp = targets(grid)
    calls = []
    for i in range(grid.n):
        a, s, a1, s1 = grid.alpha[:, i], grid.sigma[:, i], ap[:, i], sp[:, i]
        std = eta * np.sqrt(s1 ** 2 / s ** 2 * (1.0 - a ** 2 / a1 ** 2))
        direction = np.sqrt(np.maximum(1.0 - a1 ** 2 - std ** 2, 0.0))
        c = Coeffs(grid.rows, 1)
        if use_clipped_model_output and clamp is not None:
            # EPS recomputed from the clamped X0: (x - a X0c) / s.
            clamped = convert(c, pred, a, s, x=direction / s, x0=a1 - direction * a / s, clamp=clamp)
        else:
            clamped = convert(c, pred, a, s, x0=a1, eps=direction, clamp=clamp)
        c.out(0, d=1.0, noise=std)
        calls.append(Call(grid.t[:, i], Op(c, noise=eta > 0, clamp=clamped)))
    return Plan(calls)


def ddpm(grid: Grid, *, pred, clamp, variance_type: str = "fixed_small") -> Plan:
    """Ancestral DDPM (Ho et al. 2020) on the grid, diffusers' DDPMScheduler.step::

        x' = (a' beta / s^2) X0 + (sqrt(alpha_step) s'^2 / s^2) x + std z

    with alpha_step = a^2 / a'^2, beta = 1 - alpha_step; std^2 = max(s'^2 / s^2 beta,
    1e-20) ("fixed_small", "fixed_small_log": the same value) or beta ("fixed_large").
    No noise is added where the model time is 0 (diffusers' ``t > 0``).
    """
    if variance_type not in DDPM_VARIANCES:
        raise ValueError(f"variance_type must be one of {DDPM_VARIANCES}, got {variance_type!r}")
    ap, sp = targets(grid)
    calls = []
    for i in range(grid.n):
        a, s, a1, s1 = grid.alpha[:, i], grid.sigma[:, i], ap[:, i], sp[:, i]
        alpha_step = a ** 2 / a1 ** 2
        beta = 1.0 - alpha_step
        if variance_type == "fixed_large":
            std = np.sqrt(beta)
        else:
            std = np.sqrt(np.maximum(s1 ** 2 / s ** 2 * beta, 1e-20))
        t = grid.t[:, i]
        std = np.where(t > 0, std, 0.0)
        c = Coeffs(grid.rows, 1)
        clamped = convert(c, pred, a, s, x=np.sqrt(alpha_step) * s1 ** 2 / s ** 2,
                          x0=a1 * beta / s ** 2, clamp=clamp)
        c.out(0, d=1.0, noise=std)
        calls.append(Call(t, Op(c, noise=bool((t > 0).any()), clamp=clamped)))
    return Plan(calls)
