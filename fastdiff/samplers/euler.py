"""Euler, Euler ancestral and Heun (Karras et al. 2022) in the k-diffusion convention.

The state is z = x / alpha, noised as z = x0 + sk eps with sk = sigma / alpha; the model
sees ``c_in z`` with c_in = 1 / sqrt(sk^2 + 1) = alpha (diffusers' ``scale_model_input``).
Each update emits the next state and, as a second output of the same fused pass, the next
model input ``c_in' z'``, so no separate scaling pass is needed.
The ODE is dz/dsk = (z - x0) / sk; d below is that derivative.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .core import Call, Coeffs, Op, Plan, Terms, convert, data_eps
from .grid import Grid, _from_sk

__all__ = ["euler", "euler_ancestral", "heun", "init_scale", "churn"]


def churn(sk, n: int, s_churn: float, s_tmin: float, s_tmax: float, clamp=None, s_noise: float = 1.0):
    """EDM's stochastic churn (Karras et al. 2022, diffusers' Euler ``step``): gamma =
    min(s_churn / n, sqrt(2) - 1) where s_tmin <= sk <= s_tmax, else 0, n the number of
    steps; returns (gamma [R], sk_hat = sk (1 + gamma) [R]). ``s_noise`` (the churn noise's
    scale, applied by the caller) is only checked here."""
    if not (s_churn >= 0 and s_tmin <= s_tmax):
        raise ValueError(f"need s_churn >= 0 and s_tmin <= s_tmax, got {s_churn}, {s_tmin}, {s_tmax}")
    if not math.isfinite(s_noise):
        raise ValueError(f"s_noise must be a finite number, got {s_noise}")
    if s_churn > 0 and clamp is not None:
        raise ValueError("s_churn cannot be combined with clipping / thresholding (the data estimate "
                         "would be taken from the state before the churn noise)")
    # diffusers and k-diffusion compare their float32 levels with the bounds (which torch
    # rounds to float32): a bound set to one of the levels includes it there too
    with np.errstate(over="ignore"):
        lv, lo, hi = np.asarray(sk, dtype=np.float32), np.float32(s_tmin), np.float32(s_tmax)
    gamma = np.where((lo <= lv) & (lv <= hi), min(s_churn / n, math.sqrt(2) - 1), 0.0)
    return gamma, sk * (gamma + 1)


def init_scale(grid: Grid, init_noise_sigma=None):
    """Factor from unit-variance noise x_T to the initial state z_T, [R].

    None: exact, 1 / alpha_0 = sqrt(sk_0^2 + 1). "diffusers": diffusers' Euler-family
    ``init_noise_sigma`` (sk_max for "linspace"/"trailing" spacing, sqrt(sk_max^2 + 1)
    otherwise). A number: that factor.
    """
    sk = grid.sk
    if init_noise_sigma is None:
        return np.sqrt(sk[:, 0] ** 2 + 1.0)
    if init_noise_sigma == "diffusers":
        top = sk.max(axis=1)
        return top if grid.spacing in ("linspace", "trailing") else np.sqrt(top ** 2 + 1.0)
    if isinstance(init_noise_sigma, numbers.Real) and not isinstance(init_noise_sigma, (bool, np.bool_)) \
            and math.isfinite(init_noise_sigma) and init_noise_sigma > 0:
        return np.full(grid.rows, float(init_noise_sigma))
    raise ValueError("init_noise_sigma must be None, 'diffusers' or a finite positive number, got "
                     f"{init_noise_sigma!r}")


def derivative(c, grid: Grid, i: int, pred, clamp) -> bool:
    """d = (z - x0) / sk at point i."""
    a, s, sk = grid.alpha[:, i], grid.sigma[:, i], grid.sk[:, i]
    return convert(c, pred, a, s, scale=a, x=1.0 / sk, x0=-1.0 / sk, clamp=clamp)


def euler(grid: Grid, *, pred, clamp, init_noise_sigma=None, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = math.inf, s_noise: float = 1.0) -> Plan:
    """Euler's method: z' = z + (sk' - sk) d.

    With EDM's churn (``s_churn`` > 0, steps with s_tmin <= sk <= s_tmax), diffusers'
    order: the state is noised up to sk_hat, z_hat = z + s_noise sqrt(sk_hat^2 - sk^2) n,
    the model output read at sk_hat (epsilon) or sk (v, sample: diffusers' formulas),
    and z' = z_hat + (sk' - sk_hat) d(z_hat); one fused call, the noise folded in linearly.
    """
    sk, calls = grid.sk, []
    for i in range(grid.n):
        gamma, sh = churn(sk[:, i], grid.n, s_churn, s_tmin, s_tmax, clamp, s_noise)
        c = Coeffs(grid.rows, 1)
        if not (gamma > 0).any():
            clamped = derivative(c, grid, i, pred, clamp)
            c.out(0, x=1.0, d=sk[:, i + 1] - sk[:, i])
            calls.append(Call(grid.t[:, i], Op(c, clamp=clamped), c_in=grid.alpha[:, i]))
            continue
        a, s = _from_sk(sh) if pred == "epsilon" else (grid.alpha[:, i], grid.sigma[:, i])
        clamped = convert(c, pred, a, s, scale=a, x=1.0 / sh, x0=-1.0 / sh, clamp=clamp)
        (px, _), _ = data_eps(pred, a, s)
        dt = sk[:, i + 1] - sh
        up = s_noise * np.sqrt(sh ** 2 - sk[:, i] ** 2)
        c.out(0, x=1.0, d=dt, noise=up * (1.0 + dt * (1.0 - px * a) / sh))
        calls.append(Call(grid.t[:, i], Op(c, noise=True, clamp=clamped), c_in=grid.alpha[:, i]))
    return Plan(calls, init_scale(grid, init_noise_sigma), sigma_space=True)


def euler_ancestral(grid: Grid, *, pred, clamp, init_noise_sigma=None) -> Plan:
    """Euler ancestral: an Euler step down to sk_down, then fresh noise up to sk'::

        sk_up = sqrt(sk'^2 (sk^2 - sk'^2) / sk^2),  sk_down = sqrt(sk'^2 - sk_up^2)
        z' = z + (sk_down - sk) d + sk_up noise
    """
    sk, calls = grid.sk, []
    for i in range(grid.n):
        s0, s1 = sk[:, i], sk[:, i + 1]
        up = np.sqrt(s1 ** 2 * (s0 ** 2 - s1 ** 2) / s0 ** 2)
        down = np.sqrt(s1 ** 2 - up ** 2)
        c = Coeffs(grid.rows, 1)
        clamped = derivative(c, grid, i, pred, clamp)
        c.out(0, x=1.0, d=down - s0, noise=up)
        calls.append(Call(grid.t[:, i], Op(c, noise=True, clamp=clamped), c_in=grid.alpha[:, i]))
    return Plan(calls, init_scale(grid, init_noise_sigma), sigma_space=True)


def heun(grid: Grid, *, pred, clamp, init_noise_sigma=None) -> Plan:
    """Heun's second-order method (2 model calls per step, one into sk = 0 at the end)::

        z_e = z + dt d(z, sk)                          (Euler predictor, call 1)
        z'  = z + dt (d(z, sk) + d(z_e, sk')) / 2     (trapezoid corrector, call 2)

    The predictor also writes b = z + dt d1 / 2, so the corrector is z' = b + dt d2 / 2
    with one history tensor. As in diffusers, a state edited between the two calls (an
    inpainting mask) changes d2 and the model input, not the base z. The step into
    sk' = 0 is the Euler step alone (d is undefined at sk = 0).
    """
    sk, calls = grid.sk, []
    for i in range(grid.n):
        dt = sk[:, i + 1] - sk[:, i]
        second = bool((sk[:, i + 1] > 0).all())
        c = Coeffs(grid.rows, 2 if second else 1)
        clamped = derivative(c, grid, i, pred, clamp)
        c.out(0, x=1.0, d=dt)
        if second:
            c.out(1, x=1.0, d=0.5 * dt)
        calls.append(Call(grid.t[:, i], Op(c, outputs=("x", ("b", i)) if second else ("x",),
                                           clamp=clamped), c_in=grid.alpha[:, i]))
        if second:
            c2, t = Coeffs(grid.rows, 1, 1), Terms(1)
            clamped = derivative(c2, grid, i + 1, pred, clamp)
            c2.combo(0, 0.5 * dt * t.d + t.h(0))
            calls.append(Call(grid.t_at(i + 1), Op(c2, history=(("b", i),), clamp=clamped),
                              c_in=grid.alpha[:, i + 1]))
    return Plan(calls, init_scale(grid, init_noise_sigma), sigma_space=True)
