"""UniPC (Zhao et al. 2023): multistep predictor (UniP) with a corrector (UniC) that reuses
the model output of the next step, so the correction costs no extra model call.

diffusers' UniPCMultistepScheduler corrects the previous step's prediction from
``last_sample`` (the previous corrected sample) once the new model output is known, then
predicts again from the corrected sample. Predictor and corrector of the same interval
share their base ``(sigma_t / sigma_s) last_sample - alpha_t h_phi_1 m_s``, so

    x_corrected = x_predicted + alpha_t B_h (sum rho_p D1s - sum rho_c D1s - rho_c[-1] (m_t - m_s))

which needs only the model outputs: here the corrector is folded into the same fused call
as the next prediction, with no ``last_sample`` kept (fewer tensors read and written).

The two forms differ when the caller edits the state between steps (a callback, a blend
outside an inpainting mask): diffusers corrects from its stored ``last_sample`` and keeps
the edit only through the new model output, the folded form corrects the edited state.
``keep_last_sample=True`` (what ``FusedScheduler`` runs for UniPCMultistepScheduler)
keeps the corrected sample as diffusers does, at one more tensor written and read per
step.
"""
from __future__ import annotations

import numpy as np

from .core import Call, Coeffs, Op, Plan, Terms, convert
from .grid import Grid

__all__ = ["unipc", "SOLVER_TYPES"]

SOLVER_TYPES = ("bh1", "bh2")


def _rhos(lam, i, o, solver_type, predict_x0):
    """Scalars of the order-o UniP/UniC step from point i to i+1 (diffusers'
    ``multistep_uni_p_bh_update``), per row: h_phi_1, B_h, rks [o-1], rhos_p [o-1] and
    rhos_c [o] (the predictor's and corrector's weights of the D1 terms)."""
    h = lam[:, i + 1] - lam[:, i]
    hh = -h if predict_x0 else h
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        h_phi_1 = np.expm1(hh)
        b_h = hh if solver_type == "bh1" else np.expm1(hh)
        rks = [(lam[:, i - k] - lam[:, i]) / h for k in range(1, o)]
        nodes = np.stack(rks + [np.ones_like(h)], axis=-1)          # [rows, o]
        R = nodes[:, None, :] ** np.arange(o)[None, :, None]         # R[j, k] = node_k ** j
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
        for j in range(1, o + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        b = np.stack(b, axis=-1)                                      # [rows, o]
    half = np.full_like(h, 0.5)
    if o == 1:
        return h_phi_1, b_h, rks, [], [half]
    rhos_p = [half] if o == 2 else list(np.linalg.solve(R[:, :-1, :-1], b[:, :-1, None])[..., 0].T)
    rhos_c = list(np.linalg.solve(R, b[..., None])[..., 0].T)
    return h_phi_1, b_h, rks, rhos_p, rhos_c


def unipc(grid: Grid, *, pred, clamp, order: int = 2, solver_type: str = "bh2",
          lower_order_final: bool = True, predict_x0: bool = True,
          disable_corrector=(), keep_last_sample: bool = False) -> Plan:
    """UniPC multistep sampler, diffusers' UniPCMultistepScheduler.

    ``order`` 1-3 (ramped up over the first steps; with ``lower_order_final`` the last
    steps use at most the number of remaining steps), ``solver_type`` "bh1" / "bh2",
    ``predict_x0``: data prediction (UniPC's default) or noise prediction;
    ``disable_corrector``: step indices whose prediction is not corrected;
    ``keep_last_sample``: correct from the stored corrected sample, as diffusers does,
    instead of folding the corrector into the prediction (the same result unless the
    state is edited between steps; see the module docstring).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order (solver_order) must be 1, 2 or 3, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if clamp is not None and not predict_x0:
        raise ValueError("UniPC clamps the data estimate only with predict_x0=True")
    N, lam, a, s = grid.n, grid.lam, grid.alpha, grid.sigma
    orders = [min(min(order, N - i) if lower_order_final else order, min(i, order) + 1)
              for i in range(N)]
    if grid.final_zero and (orders[-1] > 1 or not predict_x0):
        raise ValueError("UniPC with final_sigmas_type='zero' needs predict_x0=True and a first-order "
                         "last step (lower_order_final=True); the update divides by sigma = 0 "
                         "otherwise. Use final_sigmas_type='sigma_min'")
    # x_{i+1} = ratio_i x_i - scale_{i+1} (h_phi_1 m_i + B_h sum rho D1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = s[:, 1:] / s[:, :-1] if predict_x0 else a[:, 1:] / a[:, :-1]
    scale = a if predict_x0 else s
    steps = [_rhos(lam, i, orders[i], solver_type, predict_x0) for i in range(N)]
    calls = []
    for i in range(N):
        o = orders[i]
        corrected = i > 0 and (i - 1) not in disable_corrector
        po = orders[i - 1] if i > 0 else 0
        n_hist = max(o - 1, po if corrected else 0)
        c, t = Coeffs(grid.rows, 3 if keep_last_sample else 2, n_hist), Terms(n_hist)
        m = [t.d] + [t.h(k) for k in range(n_hist)]  # m[k] = d_{i-k}
        fn = dict(x0=1.0) if predict_x0 else dict(eps=1.0)
        clamped = convert(c, pred, a[:, i], s[:, i], clamp=clamp, **fn)
        corr, base = t.zero, dict(x=1.0)  # the corrected state: base + corr
        if corrected:
            # UniC of interval i-1 (base output m[1] = d_{i-1}, new output m[0] = d_i).
            h_prev, b_h, rks, rhos_p, rhos_c = steps[i - 1]
            d1s = [(m[k + 2] - m[1]) / rk for k, rk in enumerate(rks)]
            res = -sum((rc * d for rc, d in zip(rhos_c[:-1], d1s)), t.zero) - rhos_c[-1] * (m[0] - m[1])
            if keep_last_sample:  # from the stored corrected sample, as diffusers
                corr = -scale[:, i] * h_prev * m[1] + scale[:, i] * b_h * res
                base = dict(x_base=ratio[:, i - 1])
            else:  # as a correction of the predicted x (see the module docstring)
                res = res + sum((rp * d for rp, d in zip(rhos_p, d1s)), t.zero)
                corr = scale[:, i] * b_h * res
        h_phi_1, b_h, rks, rhos_p, _ = steps[i]
        upd = -scale[:, i + 1] * h_phi_1 * m[0]
        if rhos_p:
            d1s = [(m[k + 1] - m[0]) / rk for k, rk in enumerate(rks)]
            upd = upd - scale[:, i + 1] * b_h * sum((r * d for r, d in zip(rhos_p, d1s)), t.zero)
        c.combo(0, ratio[:, i] * corr + upd, **{k: ratio[:, i] * v for k, v in base.items()})
        c.out(1, d=1.0)
        outputs = ("x", ("d", i))
        if keep_last_sample:
            c.combo(2, corr, **base)
            outputs += (("xc", i),)
        history = tuple(("d", i - 1 - k) for k in range(n_hist))
        x_base = ("xc", i - 1) if keep_last_sample and corrected else None
        calls.append(Call(grid.t[:, i], Op(c, history=history, outputs=outputs, x_base=x_base,
                                           clamp=clamped)))
    return Plan(calls)
