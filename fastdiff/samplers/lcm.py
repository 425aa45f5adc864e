"""Consistency-distilled samplers: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024),
diffusers' LCMScheduler and TCDScheduler.

Both map the state to a data estimate in one model call and re-noise it to the next
timestep; the last step returns the estimate itself.
"""
from __future__ import annotations

import numpy as np

from .core import Call, Coeffs, Op, Plan, convert
from .grid import Grid

__all__ = ["lcm", "tcd", "boundary_scalings", "tcd_level"]


def boundary_scalings(t, timestep_scaling: float = 10.0):
    """LCM's consistency boundary scalings (c_skip, c_out) at model times t [R]: with the
    scaled time t' = t * timestep_scaling and sigma_data 0.5, c_skip = 0.25 / (t'^2 + 0.25),
    c_out = t' / sqrt(t'^2 + 0.25); LCM's output is c_skip x + c_out X0."""
    st = np.asarray(t, dtype=np.float64) * timestep_scaling
    return 0.25 / (st ** 2 + 0.25), st / np.sqrt(st ** 2 + 0.25)


def tcd_level(grid: Grid, i: int, eta: float):
    """(alpha, sigma) [R] of TCD's intermediate level s = floor((1 - eta) t') of step i,
    t' the next timestep (0 after the last): TCD's pred_noised_sample is alpha X0 + sigma EPS."""
    t_next = np.zeros(grid.rows) if i == grid.n - 1 else grid.t[:, i + 1]
    return grid.lookup(np.floor((1.0 - eta) * t_next))


def lcm(grid: Grid, *, pred, clamp, timestep_scaling: float = 10.0) -> Plan:
    """LCM: denoised = c_skip x + c_out X0 with the consistency boundary scalings at the
    scaled time t' = t * timestep_scaling (sigma_data 0.5): c_skip = 0.25 / (t'^2 + 0.25),
    c_out = t' / sqrt(t'^2 + 0.25); then x' = a' denoised + s' z (a', s' at the next
    timestep), and the last step returns denoised."""
    calls = []
    for i in range(grid.n):
        c_skip, c_out = boundary_scalings(grid.t[:, i], timestep_scaling)
        c = Coeffs(grid.rows, 1)
        clamped = convert(c, pred, grid.alpha[:, i], grid.sigma[:, i], x=c_skip, x0=c_out, clamp=clamp)
        last = i == grid.n - 1
        c.out(0, d=1.0 if last else grid.alpha[:, i + 1], noise=0.0 if last else grid.sigma[:, i + 1])
        calls.append(Call(grid.t[:, i], Op(c, noise=not last, clamp=clamped)))
    return Plan(calls)


def tcd(grid: Grid, *, pred, clamp, eta: float = 0.3) -> Plan:
    """TCD (strategic stochastic sampling, diffusers' ``eta`` = the paper's gamma): with
    the next timestep t' (0 after the last) and s = floor((1 - eta) t'),
    pred_noised = a_s X0 + s_s EPS, then x' = (a'/a_s) pred_noised + sqrt(1 - (a'/a_s)^2) z
    (eta > 0, not the last step) or x' = pred_noised."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta (TCD's gamma) must be in [0, 1], got {eta}")
    calls = []
    for i in range(grid.n):
        last = i == grid.n - 1
        a_s, s_s = tcd_level(grid, i, eta)
        noisy = eta > 0 and not last
        k = grid.alpha[:, i + 1] / a_s if noisy else 1.0
        c = Coeffs(grid.rows, 1)
        clamped = convert(c, pred, grid.alpha[:, i], grid.sigma[:, i], x0=a_s * k, eps=s_s * k, clamp=clamp)
        c.out(0, d=1.0, noise=np.sqrt(np.maximum(1.0 - k * k, 0.0)) if noisy else 0.0)
        calls.append(Call(grid.t[:, i], Op(c, noise=noisy, clamp=clamped)))
    return Plan(calls)
