"""DPM-Solver-2 in sigma space (k-diffusion's ``sample_dpm_2`` / ``sample_dpm_2_ancestral``;
diffusers' KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler).

The state is z = x / alpha as for Euler (see ``euler``). A step from sk to sk' evaluates
the model at sk, takes an Euler step to the geometric midpoint sk_mid = sqrt(sk sk') and
evaluates there, then steps from z with the midpoint's derivative:

    z_mid = z + (sk_mid - sk) d(z, sk),   z' = z + (sk' - sk) d(z_mid, sk_mid)

The ancestral variant aims at sk_down (see ``euler_ancestral``) with the midpoint
sqrt(sk sk_down) and adds sk_up fresh noise. The step into sk' = 0 is an Euler step.
The midpoint's model time is the fractional timestep of sk_mid (``NoiseSchedule.sigma_to_t``).
"""
from __future__ import annotations

import numpy as np

from .core import Call, Coeffs, Op, Plan, convert
from .euler import init_scale
from .grid import Grid, _from_sk

__all__ = ["kdpm2", "kdpm2_ancestral"]


def _derivative(c, pred, sk, clamp) -> bool:
    """d = (z - x0) / sk at the level sk [R]."""
    a, s = _from_sk(sk)
    return convert(c, pred, a, s, scale=a, x=1.0 / sk, x0=-1.0 / sk, clamp=clamp)


def _plan(grid: Grid, pred, clamp, init_noise_sigma, ancestral: bool) -> Plan:
    sk, calls = grid.sk, []
    for i in range(grid.n):
        s0, s1 = sk[:, i], sk[:, i + 1]
        if ancestral:
            up = np.sqrt(s1 ** 2 * (s0 ** 2 - s1 ** 2) / s0 ** 2)
            target = np.sqrt(s1 ** 2 - up ** 2)
        else:
            up, target = 0.0, s1
        if not (target > 0).all():  # the last step: Euler into sk = 0
            c = Coeffs(grid.rows, 1)
            clamped = _derivative(c, pred, s0, clamp)
            c.out(0, x=1.0, d=-s0)
            calls.append(Call(grid.t[:, i], Op(c, clamp=clamped), c_in=grid.alpha[:, i]))
            continue
        mid = np.sqrt(s0 * target)
        c = Coeffs(grid.rows, 1)
        clamped = _derivative(c, pred, s0, clamp)
        c.out(0, x=1.0, d=mid - s0)
        calls.append(Call(grid.t[:, i], Op(c, keep_x=("z", i), clamp=clamped), c_in=grid.alpha[:, i]))
        c2 = Coeffs(grid.rows, 1)
        clamped = _derivative(c2, pred, mid, clamp)
        c2.out(0, x_base=1.0, d=target - s0, noise=up)
        calls.append(Call(grid.sk_to_t(mid), Op(c2, x_base=("z", i), noise=ancestral, clamp=clamped),
                          c_in=_from_sk(mid)[0]))
    return Plan(calls, init_scale(grid, init_noise_sigma), sigma_space=True)


def kdpm2(grid: Grid, *, pred, clamp, init_noise_sigma=None) -> Plan:
    """KDPM2: two model calls per step (one on the last step)."""
    return _plan(grid, pred, clamp, init_noise_sigma, ancestral=False)


def kdpm2_ancestral(grid: Grid, *, pred, clamp, init_noise_sigma=None) -> Plan:
    """KDPM2 ancestral: as KDPM2, aiming at sk_down, plus sk_up noise after the midpoint call."""
    return _plan(grid, pred, clamp, init_noise_sigma, ancestral=True)
