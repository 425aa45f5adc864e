"""SDE-DPM-Solver++ (2M) with EDM preconditioning and Brownian-tree noise (diffusers'
CosineDPMSolverMultistepScheduler, Stable Audio's sampler).

The state is z = x / alpha (sigma space, see ``euler``) on noise levels sk between
``sigma_min`` and ``sigma_max`` (exponential or Karras spacing, ``grid.angle_grid``);
the model sees ``c_in z`` with c_in = 1 / sqrt(sk^2 + sigma_data^2) at the model time
atan(sk) 2 / pi, and its output m gives the data estimate through EDM's preconditioning
x0 = c_skip z + c_out m (c_skip = sigma_data^2 / (sk^2 + sigma_data^2), c_out =
-+ sk sigma_data / sqrt(sk^2 + sigma_data^2) for v / epsilon prediction, diffusers' signs).
The update is SDE-DPM-Solver++ of order 1-2 (``dpm``) in the VP coordinates of the same
levels, rescaled to z; its noise is the Brownian-tree increment between the levels
(``brownian``), seeded from the generators' seeds as diffusers does.
"""
from __future__ import annotations

import numpy as np

from .core import Call, Coeffs, Op, Plan, Terms
from .dpm import SOLVER_TYPES, _d1_coef, _integrator
from .grid import Grid

__all__ = ["cosine_dpm"]


def cosine_dpm(grid: Grid, *, pred, clamp, order: int = 2, solver_type: str = "midpoint",
               lower_order_final: bool = True, euler_at_final: bool = False,
               sigma_data: float = 1.0) -> Plan:
    """``order`` 1-2 (the last step first order when ``euler_at_final``, when the final
    level is zero, or with ``lower_order_final`` and fewer than 15 steps); the Brownian
    paths span the grid's [sigma_min, sigma_max] (``Grid.sigma_range``)."""
    if grid.sigma_range is None:
        raise ValueError("the cosine DPM-Solver runs on its own grid (flavor 'cosine')")
    if order not in (1, 2):
        raise ValueError(f"order (solver_order) must be 1 or 2, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"the cosine DPM-Solver preconditions epsilon or v_prediction outputs, got {pred!r}")
    if clamp is not None:
        raise ValueError("the cosine DPM-Solver does not clip or threshold its estimates")
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    N, lam, a, s, sk = grid.n, grid.lam, grid.alpha, grid.sigma, grid.sk
    sd2 = sigma_data ** 2
    calls = []
    for i in range(N):
        lower_final = i == N - 1 and (euler_at_final or (lower_order_final and N < 15) or grid.final_zero)
        o = 1 if (order == 1 or i < 1 or lower_final) else 2
        c, t = Coeffs(grid.rows, 2, o - 1), Terms(o - 1)
        k = sk[:, i]
        c_skip = sd2 / (k ** 2 + sd2)
        c_out = (1.0 if pred == "epsilon" else -1.0) * k * sigma_data / np.sqrt(k ** 2 + sd2)
        c.convert(p_x=c_skip, p_m=c_out, w_x=c_skip, w_m=c_out)
        h = lam[:, i + 1] - lam[:, i]
        xc, p1, p2, _, nz = _integrator("sde-dpmsolver++", h, a[:, i + 1], s[:, i + 1], a[:, i], s[:, i])
        comb = p1 * t.d
        if o == 2:
            r0 = (lam[:, i] - lam[:, i - 1]) / h
            comb = comb + _d1_coef(solver_type, p1, p2) * (t.d - t.h(0)) / r0
        # VP x' = xc x + comb + nz z with x = alpha z: divide by alpha' for z'
        a1 = a[:, i + 1]
        c.combo(0, comb / a1, x=xc * a[:, i] / a1, noise=nz / a1)
        c.out(1, d=1.0)
        q = sk.astype(np.float32).astype(np.float64)  # the Brownian query points, as diffusers' float32 sigmas
        calls.append(Call(grid.t[:, i], Op(c, history=(("d", i - 1),) if o == 2 else (),
                                           outputs=("x", ("d", i)), noise=True, brownian=(q[:, i], q[:, i + 1])),
                          c_in=1.0 / np.sqrt(k ** 2 + sd2)))
    return Plan(calls, np.sqrt(sk[:, 0] ** 2 + 1.0), sigma_space=True,
                brownian=(np.full(grid.rows, grid.sigma_range[0]), np.full(grid.rows, grid.sigma_range[1]),
                          "generator"))
