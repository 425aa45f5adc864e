"""Flow matching / rectified flow samplers (diffusers' FlowMatchEuler/HeunDiscreteScheduler).

On the path x_s = (1 - s) x0 + s eps the probability-flow ODE is dx/ds = v with the
velocity v = eps - x0, which a "flow_prediction" network outputs directly (other
prediction types are converted to it). The state is x itself, the model sees x and the
time s * T.
"""
from __future__ import annotations

import math

import numpy as np

from .core import Call, Coeffs, Op, Plan, Terms, convert
from .euler import churn
from .grid import Grid

__all__ = ["flow_euler", "flow_heun"]


def velocity(c, grid: Grid, i: int, pred, clamp) -> bool:
    """d = v = EPS - X0 at point i."""
    return convert(c, pred, grid.alpha[:, i], grid.sigma[:, i], x0=-1.0, eps=1.0, clamp=clamp)


def flow_euler(grid: Grid, *, pred, clamp, stochastic_sampling: bool = False) -> Plan:
    """Euler's method in s: x' = x + (s' - s) v.

    ``stochastic_sampling``: instead re-noise the data estimate to the next level with
    fresh noise, x' = (1 - s') X0 + s' z (diffusers' option of the same name; noise is
    drawn at every step, as diffusers draws it).
    """
    s, calls = grid.sigma, []
    for i in range(grid.n):
        c = Coeffs(grid.rows, 1)
        if stochastic_sampling:
            clamped = convert(c, pred, grid.alpha[:, i], s[:, i], x0=1.0, clamp=clamp)
            c.out(0, d=1.0 - s[:, i + 1], noise=s[:, i + 1])
        else:
            clamped = velocity(c, grid, i, pred, clamp)
            c.out(0, x=1.0, d=s[:, i + 1] - s[:, i])
        calls.append(Call(grid.t[:, i], Op(c, noise=stochastic_sampling, clamp=clamped)))
    return Plan(calls)


def flow_heun(grid: Grid, *, pred, clamp, s_churn: float = 0.0, s_tmin: float = 0.0,
              s_tmax: float = math.inf, s_noise: float = 1.0) -> Plan:
    """Heun's method in s (2 model calls per step; the step into s = 0 is Euler alone)::

        x_e = x + ds v(x, s),   x' = x + ds (v(x, s) + v(x_e, s')) / 2 = x_e + ds (v2 - v1) / 2

    With churn (diffusers' FlowMatchHeunDiscreteScheduler.step): x_hat = x + s_noise
    sqrt(s_hat^2 - s^2) z, s_hat = s (1 + gamma), gamma as for EDM over the 2N - 1 entries
    of diffusers' sigma list; v1 is then taken as v s / s_hat and ds = s' - s_hat. The
    corrector draws (and discards) a noise tensor too, as diffusers does.
    """
    s, calls = grid.sigma, []
    gamma, sh = churn(s[:, :-1], 2 * grid.n - 1, s_churn, s_tmin, s_tmax, clamp, s_noise)
    if (gamma > 0).any() and pred != "flow_prediction":
        raise ValueError("churn in flow-heun reads the model output as the velocity: prediction_type "
                         "must be 'flow_prediction'")
    for i in range(grid.n):
        noisy = bool((gamma[:, i] > 0).any())
        k = s[:, i] / sh[:, i]
        ds = s[:, i + 1] - sh[:, i]
        up = s_noise * np.sqrt(sh[:, i] ** 2 - s[:, i] ** 2)
        second = bool((s[:, i + 1] > 0).all())
        c = Coeffs(grid.rows, 2 if second else 1)
        clamped = velocity(c, grid, i, pred, clamp)
        c.out(0, x=1.0, d=ds * k, noise=up if noisy else 0.0)
        if second:
            c.out(1, d=k)
        calls.append(Call(grid.t[:, i], Op(c, outputs=("x", ("d", i)) if second else ("x",), noise=noisy,
                                           clamp=clamped)))
        if second:
            c2, t = Coeffs(grid.rows, 1, 1), Terms(1)
            clamped = velocity(c2, grid, i + 1, pred, clamp)
            c2.combo(0, 0.5 * ds * (t.d - t.h(0)), x=1.0)
            calls.append(Call(grid.t_at(i + 1), Op(c2, history=(("d", i),), noise=noisy, clamp=clamped)))
    return Plan(calls)
