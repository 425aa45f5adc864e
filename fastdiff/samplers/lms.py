"""Linear multistep (LMS, k-diffusion's ``sample_lms``) in sigma space.

z' = z + sum_j c_j d_{i-j}, where c_j integrates the Lagrange basis polynomial of node
sk_{i-j} (nodes sk_i, ..., sk_{i-order+1}) over [sk_i, sk_{i+1}]. The integrals are of
polynomials, so they are computed exactly (diffusers uses adaptive quadrature).
"""
from __future__ import annotations

import numpy as np
from numpy.polynomial import Polynomial

from .core import Call, Coeffs, Op, Plan, Terms
from .euler import derivative, init_scale
from .grid import Grid

__all__ = ["lms", "lms_coefficients"]


def lagrange_basis(nodes: np.ndarray) -> list:
    """The Lagrange basis polynomials L_j of ``nodes`` [o] (L_j(nodes[k]) = [j == k])."""
    basis = []
    for j, nj in enumerate(nodes):
        p = Polynomial([1.0])
        for k, nk in enumerate(nodes):
            if k != j:
                p = p * Polynomial([-nk, 1.0]) / (nj - nk)
        basis.append(p)
    return basis


def lms_coefficients(nodes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Integrals over [lo, hi] of the Lagrange basis polynomials of ``nodes`` [o]."""
    out = np.empty(len(nodes))
    for j, p in enumerate(lagrange_basis(nodes)):
        q = p.integ()
        out[j] = q(hi) - q(lo)
    return out


def lms(grid: Grid, *, pred, clamp, order: int = 4, init_noise_sigma=None) -> Plan:
    """LMS of the given order (ramped up over the first steps)."""
    if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be a positive int, got {order!r}")
    order = int(order)
    sk, calls = grid.sk, []
    for i in range(grid.n):
        o = min(i + 1, order)
        w = np.stack([lms_coefficients(sk[r, i - np.arange(o)], sk[r, i], sk[r, i + 1])
                      for r in range(grid.rows)], axis=1)  # [o, R]
        c, t = Coeffs(grid.rows, 2, o - 1), Terms(o - 1)
        clamped = derivative(c, grid, i, pred, clamp)
        c.combo(0, sum(w[j] * (t.d if j == 0 else t.h(j - 1)) for j in range(o)), x=1.0)
        c.out(1, d=1.0)
        history = tuple(("d", i - 1 - k) for k in range(o - 1))
        calls.append(Call(grid.t[:, i], Op(c, history=history, outputs=("x", ("d", i)), clamp=clamped),
                          c_in=grid.alpha[:, i]))
    return Plan(calls, init_scale(grid, init_noise_sigma), sigma_space=True)
