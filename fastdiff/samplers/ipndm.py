"""Improved PNDM (iPNDM, Zhang & Chen 2023): 4-step Adams-Bashforth on the noise estimate
with the DDIM transfer, on its own time grid (diffusers' IPNDMScheduler).

The noise levels are those of v-diffusion's angle parameterisation, alpha = cos(pi t / 2),
sigma = sin(pi t / 2), at sigma_k = sin^2(pi u_k / 2) for u_k uniform from 1 to 0; the
model time is that angle t in [0, 1] (not a training-timestep index), so the schedule a
Sampler is given does not enter. The first point is alpha = 0 (pure noise).
"""
from __future__ import annotations

import numpy as np

from .core import Call, Coeffs, Op, Plan, Terms, data_eps
from .grid import Grid
from .pndm import PLMS_WEIGHTS

__all__ = ["ipndm"]


def ipndm(grid: Grid, *, pred, clamp) -> Plan:
    """x' = (a'/a) x + (s' - a' s / a) E with E the Adams-Bashforth combination of the last
    (up to 4) noise estimates. diffusers divides by max(a, 1e-8); at a = 0 its x0 estimate
    (x - s E) / a is 0 / 0 (E is x there for v-prediction), taken as 0: x' = s' E."""
    if clamp is not None:
        raise ValueError("IPNDM does not clip or threshold its estimates (diffusers' IPNDMScheduler "
                         "has no such option)")
    a, s = grid.alpha, grid.sigma
    calls = []
    for i in range(grid.n):
        o = min(i + 1, 4)
        c, t = Coeffs(grid.rows, 2, o - 1), Terms(o - 1)
        _, (ex, em) = data_eps(pred, a[:, i], s[:, i])
        c.convert(w_x=ex, w_m=em)  # the noise estimate alone (x0 is infinite at alpha = 0)
        comb = sum(w * (t.d if j == 0 else t.h(j - 1)) for j, w in enumerate(PLMS_WEIGHTS[o]))
        at = np.maximum(a[:, i], 1e-8)
        zero = a[:, i] == 0
        cx = np.where(zero, 0.0, a[:, i + 1] / at)
        ce = np.where(zero, s[:, i + 1], s[:, i + 1] - a[:, i + 1] * s[:, i] / at)
        c.combo(0, ce * comb, x=cx)
        c.out(1, d=1.0)
        history = tuple(("d", i - 1 - k) for k in range(o - 1))
        calls.append(Call(grid.t[:, i], Op(c, history=history, outputs=("x", ("d", i)))))
    return Plan(calls)
