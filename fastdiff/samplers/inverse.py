"""Inversion (data to noise): DDIM inversion, diffusers' DDIMInverseScheduler.

DPM-Solver inversion (DPMSolverMultistepInverseScheduler) is the multistep DPM-Solver
itself on an ascending grid (``grid_families``); see :func:`fastdiff.invert`.
"""
from __future__ import annotations

from .core import Call, Coeffs, Op, Plan, convert
from .grid import Grid

__all__ = ["ddim_inverse"]


def ddim_inverse(grid: Grid, *, pred, clamp) -> Plan:
    """Deterministic DDIM run upwards: step k moves the state from the level at
    t_k - T // steps to the level at t_k with the model evaluated at t_k (diffusers'
    rule): x' = a' X0 + s' EPS."""
    calls = []
    a1, s1 = grid.lookup(grid.t)
    for i in range(grid.n):
        c = Coeffs(grid.rows, 1)
        clamped = convert(c, pred, grid.alpha[:, i], grid.sigma[:, i], x0=a1[:, i], eps=s1[:, i], clamp=clamp)
        c.out(0, d=1.0)
        calls.append(Call(grid.t[:, i], Op(c, clamp=clamped)))
    return Plan(calls)
