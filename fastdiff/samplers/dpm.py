"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b): multistep and singlestep.

Exponential integrators in the half log-SNR lambda = log(alpha / sigma). With data
prediction ("++", d = x0 estimate) a step from s to t with h = lambda_t - lambda_s is

    x_t = (sigma_t / sigma_s) x_s + phi_1 D0 + phi_2 D1 + phi_3 D2,
    phi_1 = alpha_t (1 - e^-h), phi_2 = alpha_t ((e^-h - 1) / h + 1), ...

where D0, D1, D2 are finite-difference estimates of d and its lambda-derivatives from
the current and previous model outputs. Noise prediction ("dpmsolver") and the SDE
variants swap in their own phi's (diffusers' DPMSolverMultistep/SinglestepScheduler).
"""
from __future__ import annotations

import warnings

import numpy as np

from .core import Call, Coeffs, Op, Plan, Terms, convert
from .grid import Grid

__all__ = ["dpm_multistep", "dpm_singlestep", "singlestep_orders", "ALGORITHMS", "SOLVER_TYPES"]

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
# "taylor" (the official DPM-Solver code's name) is the same algorithm as "heun" in every
# update here; diffusers' "midpoint" is the official "dpmsolver" type except in singlestep
# order 3, whose middle point the official code always takes with the phi_2 ("taylor")
# weight (here, as in diffusers, with the group's own solver type).
SOLVER_TYPES = ("midpoint", "heun", "taylor")


def _check(grid, order, algorithm, solver_type):
    if order not in (1, 2, 3):
        raise ValueError(f"order (solver_order) must be 1, 2 or 3, got {order!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm_type must be one of {ALGORITHMS}, got {algorithm!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if algorithm == "sde-dpmsolver" and order == 3:
        raise ValueError("algorithm_type='sde-dpmsolver' has no third-order update; use order <= 2")
    if "++" not in algorithm and grid.final_zero:
        raise ValueError(f"final_sigmas_type='zero' is undefined for the noise-prediction algorithm "
                         f"{algorithm!r} (it divides by sigma = 0); use final_sigmas_type='sigma_min' "
                         "or a '++' algorithm")


def _model_term(c, grid, i, pred, clamp, data: bool) -> bool:
    """d = x0 estimate (data prediction) or noise estimate (recomputed from the clamped x0
    when clamping, as diffusers does)."""
    a, s = grid.alpha[:, i], grid.sigma[:, i]
    if data:
        return convert(c, pred, a, s, x0=1.0, clamp=clamp)
    if clamp is None:
        return convert(c, pred, a, s, eps=1.0)
    return convert(c, pred, a, s, x=1.0 / s, x0=-a / s, clamp=clamp)


def _integrator(algorithm, h, at, st, ab, sb):
    """x coefficient, phi_1, phi_2, phi_3 and noise coefficient of a step from the base
    point (ab, sb) to (at, st) over h = lambda_t - lambda_base."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if algorithm == "dpmsolver++":
            em = np.exp(-h)
            return (st / sb, at * (1 - em), at * ((em - 1) / h + 1),
                    -at * ((em - 1 + h) / h ** 2 - 0.5), 0.0)
        if algorithm == "dpmsolver":
            ep = np.expm1(h)
            return (at / ab, -st * ep, -st * (ep / h - 1), -st * ((ep - h) / h ** 2 - 0.5), 0.0)
        if algorithm == "sde-dpmsolver++":
            em2 = np.exp(-2 * h)
            return ((st / sb) * np.exp(-h), at * (1 - em2), at * ((1 - em2) / (-2 * h) + 1),
                    at * ((1 - em2 - 2 * h) / (2 * h) ** 2 - 0.5), st * np.sqrt(1 - em2))
        ep = np.expm1(h)  # sde-dpmsolver
        return at / ab, -2 * st * ep, -2 * st * (ep / h - 1), None, st * np.sqrt(np.expm1(2 * h))


def _stalled(h, ab, sb, at, st, data):
    """Rows where a step has no length (|h| < 1e-6: the grid repeats a noise level, as a
    Karras grid ending at sigma_min does, where rounding leaves h ~ 1e-8; an inverse run
    has h < 0 throughout, which is not this). Returns (rows,
    h safe to divide by, x coefficient at h = 0): every step's limit as h -> 0 is
    x_t = (sigma_t / sigma_s) x_s (data prediction) or (alpha_t / alpha_s) x_s, the model
    and noise terms vanishing, which is what diffusers computes at h = 0 exactly."""
    stall = np.abs(h) < 1e-6
    return stall, np.where(stall, 1.0, h), (st / sb) if data else (at / ab)


def _d1_coef(solver_type, p1, p2):
    # Second-order updates: "midpoint" weights D1 by phi_1 / 2, "heun" by phi_2.
    return 0.5 * p1 if solver_type == "midpoint" else p2


def dpm_multistep(grid: Grid, *, pred, clamp, order: int = 2, algorithm: str = "dpmsolver++",
                  solver_type: str = "midpoint", lower_order_final: bool = True,
                  euler_at_final: bool = False) -> Plan:
    """Multistep DPM-Solver(++): one model call per step, previous d's as history.

    Orders ramp up over the first steps; the last step is first order when
    ``euler_at_final``, when the final sigma is zero, or with ``lower_order_final`` and
    fewer than 15 steps (which also makes the second-to-last step at most second order).
    """
    _check(grid, order, algorithm, solver_type)
    N, lam, a, s = grid.n, grid.lam, grid.alpha, grid.sigma
    data, sde = "++" in algorithm, algorithm.startswith("sde")
    calls = []
    for i in range(N):
        lower_final = i == N - 1 and (euler_at_final or (lower_order_final and N < 15) or grid.final_zero)
        lower_second = i == N - 2 and lower_order_final and N < 15
        o = 1 if (order == 1 or i < 1 or lower_final) else 2 if (order == 2 or i < 2 or lower_second) else 3
        c, t = Coeffs(grid.rows, 2, o - 1), Terms(o - 1)
        clamped = _model_term(c, grid, i, pred, clamp, data)
        stall, h, x_stall = _stalled(lam[:, i + 1] - lam[:, i], a[:, i], s[:, i], a[:, i + 1],
                                     s[:, i + 1], data)
        xc, p1, p2, p3, nz = _integrator(algorithm, h, a[:, i + 1], s[:, i + 1], a[:, i], s[:, i])
        if o == 1:
            comb = p1 * t.d
        elif o == 2:
            r0 = (lam[:, i] - lam[:, i - 1]) / h
            comb = p1 * t.d + _d1_coef(solver_type, p1, p2) * (t.d - t.h(0)) / r0
        else:
            r0, r1 = (lam[:, i] - lam[:, i - 1]) / h, (lam[:, i - 1] - lam[:, i - 2]) / h
            d1_0, d1_1 = (t.d - t.h(0)) / r0, (t.h(0) - t.h(1)) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            comb = p1 * t.d + p2 * d1 + p3 * d2
        c.combo(0, np.where(stall, 0.0, comb), x=np.where(stall, x_stall, xc),
                noise=np.where(stall, 0.0, nz))
        c.out(1, d=1.0)
        history = tuple(("d", i - 1 - k) for k in range(o - 1))
        calls.append(Call(grid.t[:, i], Op(c, history=history, outputs=("x", ("d", i)),
                                           noise=sde, clamp=clamped)))
    return Plan(calls)


def singlestep_orders(N: int, order: int, lower_order_final: bool, final_zero: bool) -> list:
    """The per-step orders of singlestep DPM-Solver (diffusers' ``get_order_list``): groups
    [1, 2, ..., order], each group one solver step of that order over its points."""
    if not lower_order_final and (N % order != 0 or final_zero):
        why = f"{N} steps are not a multiple of order {order}" if N % order else "the final sigma is zero"
        warnings.warn(f"singlestep DPM-Solver: lower_order_final=False cannot be honoured ({why}); "
                      "using lower_order_final=True as diffusers does", stacklevel=3)
        lower_order_final = True
    if lower_order_final:
        if order == 3:
            orders = ([1, 2, 3] * (N // 3 - 1) + [1, 2] + [1] if N % 3 == 0
                      else [1, 2, 3] * (N // 3) + [1] if N % 3 == 1
                      else [1, 2, 3] * (N // 3) + [1, 2])
        elif order == 2:
            orders = [1, 2] * (N // 2 - 1) + [1, 1] if N % 2 == 0 else [1, 2] * (N // 2) + [1]
        else:
            orders = [1] * N
    else:
        orders = list(range(1, order + 1)) * (N // order)
    if final_zero:
        orders[-1] = 1
    return orders[:N]


def dpm_singlestep(grid: Grid, *, pred, clamp, order: int = 2, algorithm: str = "dpmsolver++",
                   solver_type: str = "midpoint", lower_order_final: bool = True) -> Plan:
    """Singlestep DPM-Solver(++): groups of 1..order steps; the k-th step of a group is a
    k-th order step from the group's first point (``x_base``) using the model outputs
    evaluated inside the group."""
    _check(grid, order, algorithm, solver_type)
    orders = singlestep_orders(grid.n, order, lower_order_final, grid.final_zero)
    if grid.spacing == "logSNR" and grid.from_lambda is not None:
        grid = grouped_logsnr_grid(grid, orders)
    N, lam, a, s = grid.n, grid.lam, grid.alpha, grid.sigma
    data, sde = "++" in algorithm, algorithm.startswith("sde")
    calls, start = [], 0
    for i, o in enumerate(orders):
        o = min(o, i + 1)
        if o == 1:
            start = i
        b = start  # the group's base point
        assert b == i - o + 1, "singlestep order list out of sequence"
        c, t = Coeffs(grid.rows, 2, o - 1), Terms(o - 1)
        clamped = _model_term(c, grid, i, pred, clamp, data)
        h = lam[:, i + 1] - lam[:, b]
        xc, p1, p2, p3, nz = _integrator(algorithm, h, a[:, i + 1], s[:, i + 1], a[:, b], s[:, b])
        if o == 1:
            c.combo(0, p1 * t.d, x=xc, noise=nz)
        elif o == 2:
            r0 = (lam[:, i] - lam[:, b]) / h
            d1 = (t.d - t.h(0)) / r0
            c.combo(0, p1 * t.h(0) + _d1_coef(solver_type, p1, p2) * d1, x_base=xc, noise=nz)
        else:
            r0, r1 = (lam[:, i] - lam[:, b]) / h, (lam[:, i - 1] - lam[:, b]) / h
            d1_0, d1_1 = (t.h(0) - t.h(1)) / r1, (t.d - t.h(1)) / r0
            if solver_type == "midpoint":
                comb = p1 * t.h(1) + p2 * d1_1
            else:
                d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
                comb = p1 * t.h(1) + p2 * d1 + p3 * d2
            c.combo(0, comb, x_base=xc, noise=nz)
        c.out(1, d=1.0)
        history = tuple(("d", i - 1 - k) for k in range(o - 1))
        calls.append(Call(grid.t[:, i], Op(
            c, history=history, outputs=("x", ("d", i)), noise=sde, clamp=clamped,
            keep_x=("xs", i) if o == 1 else None, x_base=("xs", b) if o > 1 else None)))
    return Plan(calls, grid=grid)


def grouped_logsnr_grid(grid: Grid, orders) -> Grid:
    """Singlestep DPM-Solver's "logSNR" grid as the official code builds it: the K solver
    steps (groups of ``orders``) uniform in lambda, and inside each group its points
    uniform in lambda. (Spacing all N points uniformly, "logSNR_flat", gives groups of
    different orders different lambda spans.)"""
    sizes = [o for k, o in enumerate(orders) if k + 1 == len(orders) or orders[k + 1] <= o]
    l0, l1 = grid.lam_span
    outer = np.linspace(l0, l1, len(sizes) + 1)
    pts = [outer[g] + (outer[g + 1] - outer[g]) * j / o for g, o in enumerate(sizes) for j in range(o)]
    t, a, s = grid.from_lambda(np.array(pts + [l1]))
    if grid.final_zero:
        a[-1], s[-1] = 1.0, 0.0
    return Grid(t=t[None, :-1], alpha=a[None], sigma=s[None], t_integer=False, lookup=grid.lookup,
                spacing="logSNR", t_end=np.array([np.nan if grid.final_zero else t[-1]]),
                sk_to_t=grid.sk_to_t, from_lambda=grid.from_lambda, lam_span=grid.lam_span)
