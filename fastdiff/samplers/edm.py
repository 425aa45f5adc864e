"""EDM samplers (Karras et al. 2022; diffusers' EDMEulerScheduler and
EDMDPMSolverMultistepScheduler) and consistency models' multistep sampler (Song et al.
2023, CMStochasticIterativeScheduler) on a variance-exploding grid (alpha = 1, sigma).

The network is preconditioned: it sees ``c_in x`` with c_in = 1 / sqrt(sigma^2 + sd^2)
and the time 0.25 log sigma, and its output F gives the data estimate
``x0 = c_skip x + c_out F`` (:class:`fastdiff.samplers.core.EDMPrecond`, sd = sigma_data).
"""
from __future__ import annotations

import math

import numpy as np

from .core import Call, Coeffs, EDMPrecond, Op, Plan, convert, data_eps
from .dpm import dpm_multistep
from .euler import churn
from .grid import Grid

__all__ = ["edm_euler", "edm_dpm", "consistency"]


def _c_in(sigma, sigma_data):
    return 1.0 / np.sqrt(sigma ** 2 + sigma_data ** 2)


def _init_scale(grid):
    return np.sqrt(grid.sigma[:, 0] ** 2 + 1.0)  # diffusers' init_noise_sigma, sqrt(sigma_max^2 + 1)


def edm_euler(grid: Grid, *, pred, clamp, sigma_data: float = 0.5, s_churn: float = 0.0,
              s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> Plan:
    """Euler on the VE ODE dx/dsigma = (x - x0) / sigma, with EDM's churn: where gamma > 0
    the state is first noised up to sigma_hat = sigma (1 + gamma),
    x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) z, and the step runs from sigma_hat
    (the model output taken as F at sigma_hat, diffusers' order). Folded into one fused
    call: x' = (1 + dt w) x + dt w_m F + c (1 + dt w) z with d = w x + w_m F."""
    P, sig, calls = EDMPrecond(pred, sigma_data), grid.sigma, []
    for i in range(grid.n):
        gamma, sh = churn(sig[:, i], grid.n, s_churn, s_tmin, s_tmax, clamp, s_noise)
        up = s_noise * np.sqrt(sh ** 2 - sig[:, i] ** 2)
        c = Coeffs(grid.rows, 1)
        one = np.ones_like(sh)
        clamped = convert(c, P, one, sh, x=1.0 / sh, x0=-1.0 / sh, clamp=clamp)
        (px, _), _ = data_eps(P, one, sh)
        dt = sig[:, i + 1] - sh
        noisy = bool((gamma > 0).any())
        c.out(0, x=1.0, d=dt, noise=up * (1.0 + dt * (1.0 - px) / sh) if noisy else 0.0)
        calls.append(Call(grid.t[:, i], Op(c, noise=noisy, clamp=clamped), c_in=_c_in(sig[:, i], sigma_data)))
    return Plan(calls, _init_scale(grid))


def edm_dpm(grid: Grid, *, pred, clamp, sigma_data: float = 0.5, order: int = 2,
            algorithm: str = "dpmsolver++", solver_type: str = "midpoint",
            lower_order_final: bool = True, euler_at_final: bool = False) -> Plan:
    """Multistep DPM-Solver++ (ODE or SDE) on the VE grid with the EDM data estimate."""
    if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError(f"EDM DPM-Solver supports algorithm_type 'dpmsolver++' or 'sde-dpmsolver++', "
                         f"got {algorithm!r}")
    plan = dpm_multistep(grid, pred=EDMPrecond(pred, sigma_data), clamp=clamp, order=order,
                         algorithm=algorithm, solver_type=solver_type,
                         lower_order_final=lower_order_final, euler_at_final=euler_at_final)
    for i, call in enumerate(plan.calls):
        call.c_in = _c_in(grid.sigma[:, i], sigma_data)
    plan.init_scale = _init_scale(grid)
    return plan


def consistency(grid: Grid, *, pred, clamp, sigma_data: float = 0.5, s_noise: float = 1.0) -> Plan:
    """Multistep consistency sampling: each call maps the state to the data estimate
    denoised = c_skip x + c_out F (boundary scalings at sigma_min, the grid's final
    level), clamped when ``clamp``, then re-noises it to the next level:
    x' = denoised + s_noise sqrt(sigma'^2 - sigma_min^2) z (noise drawn at every step
    of a multi-step run, as diffusers draws it; the last step adds none)."""
    if pred != "epsilon":
        raise ValueError("the consistency sampler reads the network output through its boundary "
                         f"scalings; prediction_type must be 'epsilon' (the default), got {pred!r}")
    sig, calls = grid.sigma, []
    smin = sig[:, -1]
    P = EDMPrecond("epsilon", sigma_data, float(smin[0]))
    for i in range(grid.n):
        c = Coeffs(grid.rows, 1)
        one = np.ones_like(smin)
        clamped = convert(c, P, one, sig[:, i], x0=1.0, clamp=clamp)
        nz = s_noise * np.sqrt(np.maximum(sig[:, i + 1] ** 2 - smin ** 2, 0.0))
        c.out(0, d=1.0, noise=nz)
        calls.append(Call(grid.t[:, i], Op(c, noise=grid.n > 1, clamp=clamped), c_in=_c_in(sig[:, i], sigma_data)))
    return Plan(calls, sig[:, 0].copy())
