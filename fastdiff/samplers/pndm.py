"""PNDM / PLMS (Liu et al. 2022): pseudo linear multistep on the DDIM transfer.

Every update is the DDIM transfer of a sample from one level to another driven by a
noise estimate, ``x' = (a'/a) x + (s' - a' s / a) eps``; the estimate is a combination of
recent model outputs: Runge-Kutta (4 calls per step, "PRK") for the first three steps
unless ``skip_prk_steps``, then the 4-step Adams-Bashforth weights (PLMS). As in
diffusers' PNDMScheduler, the raw model outputs are combined first and converted to a
noise estimate at the transfer's start level with the transfer's base sample.
"""
from __future__ import annotations

import numpy as np

from .core import Call, Coeffs, Op, Plan, Terms, data_eps
from .grid import Grid

__all__ = ["pndm"]

# Adams-Bashforth weights on [newest, ..., oldest] model outputs.
PLMS_WEIGHTS = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12],
                4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def pndm(grid: Grid, *, pred, clamp, skip_prk_steps: bool = False, resumed: bool = False) -> Plan:
    """PNDM (Runge-Kutta warm-up, then PLMS) or, with ``skip_prk_steps``, PLMS with a
    Heun-like second call on the first step (Stable Diffusion's PNDM setting).

    Model calls: N + 1 with ``skip_prk_steps`` (N >= 2), else N + 9 (N >= 4).

    ``resumed``: the run diffusers' PLMS makes when a pipeline starts it mid-schedule
    (img2img): it is handed the timesteps after the start, which lack the full run's
    repeated second entry, so after the Heun-like second call its PLMS steps go on from
    the third grid point, with the first call's output as their only history (the state
    is then one level above the one the step assumes, as in diffusers). N model calls;
    needs ``skip_prk_steps``.
    """
    if clamp is not None:
        raise ValueError("PNDM does not clip or threshold its estimates (diffusers' PNDMScheduler has "
                         "no such option)")
    if resumed and not skip_prk_steps:
        raise ValueError("resumed is a PLMS (skip_prk_steps=True) option")
    N, R, rule = grid.n, grid.rows, grid.rule
    if not skip_prk_steps and N < 4:
        raise ValueError(f"PNDM's Runge-Kutta warm-up needs steps >= 4, got {N}; use skip_prk_steps=True")
    t = grid.t

    def point(k):
        return grid.alpha[:, k], grid.sigma[:, k]

    def level(times):
        return grid.lookup(times)

    calls = []

    def add(t_eval, frm, to, weights, history=(), keep=None, x_base=None, name=None):
        c, terms = Coeffs(R, 2 if name else 1, len(history)), Terms(len(history))
        c.convert(w_m=1.0)  # d = the raw model output (combined before conversion)
        (_, _), (ex, em) = data_eps(pred, *frm)
        (a0, s0), (a1, s1) = frm, to
        cx, ce = a1 / a0, s1 - a1 * s0 / a0
        comb = sum(w * (terms.d if j == 0 else terms.h(j - 1)) for j, w in enumerate(weights))
        base = cx + ce * ex
        if x_base is None:
            c.combo(0, ce * em * comb, x=base)
        else:
            c.combo(0, ce * em * comb, x_base=base)
        if name:
            c.out(1, d=1.0)
        outputs = ("x", name) if name else ("x",)
        calls.append(Call(np.asarray(t_eval, dtype=np.float64), Op(
            c, history=tuple(history), x_base=x_base, outputs=outputs, keep_x=keep)))

    ets = []  # names of the model outputs PLMS combines, oldest first
    if skip_prk_steps:
        # Call 0: Euler-like transfer p0 -> p1 with e0; call 1 (only if N > 1): re-evaluate
        # at p1 and transfer the kept p0 sample with (e0 + e1) / 2.
        to1 = point(1) if rule is None else level(t[:, 0] - rule)
        add(t[:, 0], point(0), to1, [1.0], keep=("xs", 0), name=("e", 0))
        ets.append(("e", 0))
        if N > 1:
            frm1 = point(0) if rule is None else level(t[:, 1] + rule)
            to1 = point(1) if rule is None else level(t[:, 1])
            add(t[:, 1], frm1, to1, [0.5, 0.5], history=[("e", 0)], x_base=("xs", 0))
        first_plms = 2 if resumed else 1
    else:
        # Runge-Kutta over the first three intervals, 4 calls each, at p_j, mid, mid, p_j+1.
        for j in range(3):
            if rule is None:
                # integer rows halve as diffusers' integer timesteps do, row by row
                mid_t = np.where(grid.row_integer, t[:, j + 1] + (t[:, j] - t[:, j + 1]) // 2,
                                 0.5 * (t[:, j] + t[:, j + 1]))
                mid = level(mid_t)
                evals = [t[:, j], mid_t, mid_t, t[:, j + 1]]
                tos = [mid, mid, point(j + 1), point(j + 1)]
            else:
                half = rule // 2
                mid_t = t[:, j + 1] + half
                evals = [t[:, j], mid_t, mid_t, t[:, j + 1]]
                tos = [level(e - (0 if q % 2 else half)) for q, e in enumerate(evals)]
            frm, xs = point(j), ("xs", "rk", j)
            names = [("k", j, q) for q in range(3)]
            add(evals[0], frm, tos[0], [1.0], keep=xs, name=names[0])
            add(evals[1], frm, tos[1], [1.0], x_base=xs, name=names[1])
            add(evals[2], frm, tos[2], [1.0], x_base=xs, name=names[2])
            # RK4 average e_a / 6 + e_b / 3 + e_c / 3 + e_d / 6 (e_d: this call's output).
            add(evals[3], frm, tos[3], [1 / 6, 1 / 3, 1 / 3, 1 / 6], history=names[::-1], x_base=xs)
            ets.append(names[0])
        first_plms = 3
    for k in range(first_plms, N):
        name = ("e", k)
        used = ets[-3:]
        to = point(k + 1) if rule is None else level(t[:, k] - rule)
        add(t[:, k], point(k), to, PLMS_WEIGHTS[len(used) + 1], history=used[::-1], name=name)
        ets.append(name)
    return Plan(calls)
