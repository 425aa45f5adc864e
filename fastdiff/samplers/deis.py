"""DEIS (Zhang & Chen 2023): exponential integrator with polynomial extrapolation of the
noise estimate in log(rho), rho = sigma / alpha ("logrho", diffusers' DEISMultistepScheduler).

The probability-flow ODE in x / alpha and rho is d(x / alpha) = eps d rho, so a step from
s to t is exact up to the integral of eps over rho. DEIS replaces eps by the Lagrange
polynomial in log(rho) through the last ``order`` noise estimates:

    x_t = alpha_t (x_s / alpha_s + sum_j c_j eps_j),  c_j = int_{rho_s}^{rho_t} L_j(log rho) d rho

With u = log rho the integrals are of p(u) e^u, whose antiderivative is
e^u (p - p' + p'' - ...): computed exactly (diffusers writes out orders 2 and 3).
"""
from __future__ import annotations

import numpy as np
from numpy.polynomial import Polynomial

from .core import Call, Coeffs, Op, Plan, Terms
from .dpm import _model_term
from .grid import Grid
from .lms import lagrange_basis

__all__ = ["deis", "lagrange_exp_integrals"]


def lagrange_exp_integrals(nodes: np.ndarray, lo: float, hi: float, c: float = 1.0) -> np.ndarray:
    """int over u in [lo, hi] of L_j(u) e^(c u) for the Lagrange basis polynomials L_j of
    ``nodes`` [o], exactly: the antiderivative of p(u) e^(c u) is
    e^(c u) sum_k (-1)^k p^(k)(u) / c^(k+1). [o] float64."""
    out = np.empty(len(nodes))
    for j, p in enumerate(lagrange_basis(nodes)):
        anti, q = Polynomial([0.0]), p
        for k in range(len(nodes)):  # p has degree o - 1: o terms
            anti, q = anti + ((-1) ** k / c ** (k + 1)) * q, q.deriv()
        out[j] = np.exp(c * hi) * anti(hi) - np.exp(c * lo) * anti(lo)
    return out


def deis(grid: Grid, *, pred, clamp, order: int = 2, lower_order_final: bool = True) -> Plan:
    """Multistep DEIS of ``order`` 1-3, one model call per step; the order ramps up over the
    first steps and, with ``lower_order_final`` and fewer than 15 steps, drops to 1 on the
    last step and to at most 2 on the one before (as DPM-Solver multistep). Order 1 is DDIM."""
    if order not in (1, 2, 3):
        raise ValueError(f"order (solver_order) must be 1, 2 or 3, got {order!r}")
    if grid.final_zero:
        raise ValueError("DEIS needs a nonzero final noise level (it integrates in log(sigma / alpha)); "
                         "use final_sigmas_type='sigma_min'")
    N, a = grid.n, grid.alpha
    with np.errstate(divide="ignore"):
        u = np.log(grid.sk)  # log rho, [R, N+1]
    calls = []
    for i in range(N):
        lower_final = i == N - 1 and lower_order_final and N < 15
        lower_second = i == N - 2 and lower_order_final and N < 15
        o = 1 if (order == 1 or i < 1 or lower_final) else 2 if (order == 2 or i < 2 or lower_second) else 3
        c, t = Coeffs(grid.rows, 2, o - 1), Terms(o - 1)
        clamped = _model_term(c, grid, i, pred, clamp, data=False)
        w = np.stack([lagrange_exp_integrals(u[r, i - np.arange(o)], u[r, i], u[r, i + 1])
                      for r in range(grid.rows)], axis=1)  # [o, R]
        at = a[:, i + 1]
        comb = sum(at * w[j] * (t.d if j == 0 else t.h(j - 1)) for j in range(o))
        c.combo(0, comb, x=at / a[:, i])
        c.out(1, d=1.0)
        history = tuple(("d", i - 1 - k) for k in range(o - 1))
        calls.append(Call(grid.t[:, i], Op(c, history=history, outputs=("x", ("d", i)), clamp=clamped)))
    return Plan(calls)
