"""SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector in log-SNR
(diffusers' SASolverScheduler).

With data prediction a step from s to t (lambda = log(alpha / sigma), h = lambda_t -
lambda_s, tau the stochasticity, c = 1 + tau^2) is

    x_t = e^(-tau^2 h) (sigma_t / sigma_s) x_s + c sigma_t e^(-tau^2 lambda_t) sum_k w_k d_k
          + sigma_t sqrt(1 - e^(-2 tau^2 h)) z,   w_k = int_s^t L_k(lambda) e^(c lambda) d lambda

with L_k the Lagrange basis through the lambdas of the model outputs d_k used: the last
``predictor_order`` ones for the predictor (Adams-Bashforth), the last
``corrector_order`` including the new one for the corrector (Adams-Moulton), which
re-does the previous step once the new model output is known. Noise prediction uses
e^(-lambda) weights. tau = 0 is the ODE (deterministic) solver.

Predictor and corrector of one interval share their base term and noise, so the corrected
sample is the predicted one plus the difference of their gradient parts: as in ``unipc``
the correction is folded into the next step's fused call, which needs only model outputs
(history) and no stored samples. ``keep_last_sample=True`` instead keeps that shared base
(the stored sample and noise term diffusers corrects from), as ``unipc`` does for a state
edited between steps. The noise of every step is drawn (diffusers draws it
even where tau = 0), so a generator gives diffusers' noise stream.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .core import Call, Coeffs, Op, Plan, Terms
from .deis import lagrange_exp_integrals
from .dpm import _model_term
from .grid import Grid

__all__ = ["sa_solver", "diffusers_tau"]


def diffusers_tau(t):
    """diffusers' default tau_func: 1 for model times in [200, 800], else 0."""
    t = np.asarray(t, dtype=np.float64)
    return np.where((t >= 200) & (t <= 800), 1.0, 0.0)


def _taus(tau, t):
    if tau is None:
        return diffusers_tau(t)
    if callable(tau):
        return np.array([float(tau(v)) for v in np.asarray(t, dtype=np.float64).reshape(-1)]).reshape(np.shape(t))
    if isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau >= 0:
        return np.full(np.shape(t), float(tau))
    raise ValueError(f"tau must be None (diffusers' default), a number >= 0 or a callable of the model time, "
                     f"got {tau!r}")


def _update(lam, a, s, frm, to, nodes, tau, predict_x0, corrector):
    """(x coefficient [R], weights [len(nodes), R] of the model outputs at ``nodes``, noise
    coefficient [R]) of one predictor (corrector=False) or corrector step frm -> to."""
    R = lam.shape[0]
    lt, ls = lam[:, to], lam[:, frm]
    h, c = lt - ls, 1.0 + tau ** 2
    w = np.empty((len(nodes), R))
    for r in range(R):
        cr = c[r] if predict_x0 else -1.0
        w[:, r] = lagrange_exp_integrals(lam[r, nodes], ls[r], lt[r], cr)
    if predict_x0:
        if len(nodes) == 2:  # diffusers' (and UniPC's) second-order modification
            ech = np.exp(-c * h)
            if corrector:
                m = np.exp(c * lt) * (h / 2 - (h * c - 1 + ech) / (c ** 2 * h))
            else:
                m = np.exp(c * lt) * (h ** 2 / 2 - (h * c - 1 + ech) / c ** 2) / (ls - lam[:, nodes[1]])
            w[0] += m
            w[1] -= m
        w = w * (c * s[:, to] * np.exp(-tau ** 2 * lt))
        return np.exp(-tau ** 2 * h) * s[:, to] / s[:, frm], w, s[:, to] * np.sqrt(-np.expm1(-2 * tau ** 2 * h))
    w = w * (-c * a[:, to])
    return a[:, to] / a[:, frm], w, tau * s[:, to] * np.sqrt(np.expm1(2 * h))


def sa_solver(grid: Grid, *, pred, clamp, predictor_order: int = 2, corrector_order: int = 2,
              tau: float | Callable | None = None, predict_x0: bool = True,
              lower_order_final: bool = True, keep_last_sample: bool = False) -> Plan:
    """SA-Solver: ``predictor_order`` and ``corrector_order`` 1-4 (ramped up over the first
    steps; with ``lower_order_final`` capped by the steps left), ``tau``: a number, a
    function of the model time, or None for diffusers' default (1 for t in [200, 800]);
    ``predict_x0``: data prediction (diffusers' "data_prediction") or noise prediction;
    ``keep_last_sample``: correct from the stored base as diffusers does (see the module
    docstring)."""
    for name, o in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
        if o not in (1, 2, 3, 4):
            raise ValueError(f"{name} must be 1, 2, 3 or 4, got {o!r}")
    if grid.final_zero:
        raise ValueError("SA-Solver needs a nonzero final noise level (its weights integrate over log-SNR); "
                         "use final_sigmas_type='sigma_min'")
    N, lam, a, s = grid.n, grid.lam, grid.alpha, grid.sigma
    taus = _taus(tau, grid.t)  # [R, N]
    P, C = [], []
    M = max(predictor_order, corrector_order - 1)
    for i in range(N):
        p = min(predictor_order, N - i) if lower_order_final else predictor_order
        c = min(corrector_order, N - i + 1) if lower_order_final else corrector_order
        done = min(i, M)
        P.append(min(p, done + 1))
        C.append(min(c, done + 2))
    stochastic = bool((taus > 0).any())
    calls = []
    for i in range(N):
        nodes_p = [i - k for k in range(P[i])]
        depth = P[i] - 1
        if i > 0:
            depth = max(depth, C[i - 1] - 1, P[i - 1])
        c_, t = Coeffs(grid.rows, 3 if keep_last_sample else 2, depth), Terms(depth)

        def m(j):
            return t.d if j == i else t.h(i - 1 - j)
        clamped = _model_term(c_, grid, i, pred, clamp, data=predict_x0)
        corr, base = t.zero, "x"  # the corrected state: base + corr
        if i > 0:
            # the corrector of interval i-1: from the stored base of that interval (kept),
            # or as its difference from the predictor added to the predicted x (folded)
            nodes_c = [i - k for k in range(C[i - 1])]
            _, wc, _ = _update(lam, a, s, i - 1, i, nodes_c, taus[:, i - 1], predict_x0, True)
            corr = sum((wc[k] * m(j) for k, j in enumerate(nodes_c)), t.zero)
            if keep_last_sample:
                base = "x_base"
            else:
                _, wp, _ = _update(lam, a, s, i - 1, i, [i - 1 - k for k in range(P[i - 1])],
                                   taus[:, i - 1], predict_x0, False)
                corr = corr - sum((wp[k] * m(i - 1 - k) for k in range(P[i - 1])), t.zero)
        xc, wp, nz = _update(lam, a, s, i, i + 1, nodes_p, taus[:, i], predict_x0, False)
        comb = xc * corr + sum((wp[k] * m(j) for k, j in enumerate(nodes_p)), t.zero)
        c_.combo(0, comb, noise=nz, **{base: xc})
        c_.out(1, d=1.0)
        outputs = ("x", ("d", i))
        if keep_last_sample:  # this interval's base: the corrected state's term and the noise
            c_.combo(2, xc * corr, noise=nz, **{base: xc})
            outputs += (("xb", i),)
        history = tuple(("d", i - 1 - k) for k in range(depth))
        calls.append(Call(grid.t[:, i], Op(c_, history=history, outputs=outputs, noise=stochastic,
                                           x_base=("xb", i - 1) if base == "x_base" else None,
                                           clamp=clamped)))
    return Plan(calls)
