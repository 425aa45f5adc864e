"""DPM-Solver++ (2S) SDE in sigma space with Brownian-tree noise (k-diffusion's
``sample_dpmpp_sde`` with r = 1/2; diffusers' DPMSolverSDEScheduler).

The state is z = x / alpha as for Euler (see ``euler``). A step from sk to sk' takes an
ancestral first-order data-prediction step to the midpoint sk_mid = sqrt(sk sk') (half-way
in log sigma), evaluates the model there, and takes the ancestral step from z to sk' with
that midpoint estimate (with r = 1/2 the first estimate's weight is zero)::

    z' = (sk_down / sk) z + (1 - sk_down / sk) x0 + sk_up W(sk -> target)

with sk_up = min(target, sqrt(target^2 (sk^2 - target^2) / sk^2)), sk_down =
sqrt(target^2 - sk_up^2), and W the standardised Brownian increment (``brownian``). The
step into sk' = 0 is an Euler step. Two model calls per step (one on the last).
"""
from __future__ import annotations

import numpy as np
import torch

from .core import Call, Coeffs, Op, Plan, convert
from .euler import init_scale
from .grid import Grid, _from_sk

__all__ = ["dpmpp_sde"]


def _f32_levels(sk, sk_next):
    """The Brownian query points as diffusers computes them in float32 (sigma = exp(-t),
    t = -log sigma, midpoint half-way in t): the path is only Hoelder-1/2 continuous, so a
    query point one float32 ulp away would change the noise by ~sqrt(ulp), not by an ulp."""
    s, s1 = torch.from_numpy(sk).float(), torch.from_numpy(sk_next).float()
    t, t1 = s.log().neg(), s1.log().neg()
    mid = (t + (t1 - t) * 0.5).neg().exp()
    return t.neg().exp().double().numpy(), mid.double().numpy(), t1.neg().exp().double().numpy()


def _ancestral(s, target):
    up = np.minimum(target, np.sqrt(target ** 2 * (s ** 2 - target ** 2) / s ** 2))
    return up, np.sqrt(target ** 2 - up ** 2)


def dpmpp_sde(grid: Grid, *, pred, clamp, init_noise_sigma=None, noise_sampler_seed=None) -> Plan:
    """DPM-Solver++ SDE (2 model calls per step, Brownian-tree noise). The paths' seeds:
    ``noise_sampler_seed`` (one path for the whole batch, diffusers' option), else one seed
    drawn from each of the Sampler's generators (with ``seeds=``: one path per sample)."""
    if noise_sampler_seed is not None and (isinstance(noise_sampler_seed, bool)
                                           or not isinstance(noise_sampler_seed, (int, np.integer))):
        raise TypeError(f"noise_sampler_seed must be an int or None, got {noise_sampler_seed!r}")
    sk, calls = grid.sk, []
    for i in range(grid.n):
        s0, s1 = sk[:, i], sk[:, i + 1]
        if not (s1 > 0).all():  # the last step: Euler into sk = 0
            c = Coeffs(grid.rows, 1)
            clamped = convert(c, pred, grid.alpha[:, i], grid.sigma[:, i], scale=grid.alpha[:, i],
                              x=1.0 / s0, x0=-1.0 / s0, clamp=clamp)
            c.out(0, x=1.0, d=-s0)
            calls.append(Call(grid.t[:, i], Op(c, clamp=clamped), c_in=grid.alpha[:, i]))
            continue
        mid = np.sqrt(s0 * s1)
        q0, qmid, q1 = _f32_levels(s0, s1)
        for k, (target, at, span) in enumerate(((mid, i, (q0, qmid)), (s1, None, (q0, q1)))):
            up, down = _ancestral(s0, target)
            c = Coeffs(grid.rows, 1)
            if k == 0:
                a, s = grid.alpha[:, i], grid.sigma[:, i]
            else:
                a, s = _from_sk(mid)
            clamped = convert(c, pred, a, s, scale=a, x0=1.0, clamp=clamp)
            base = dict(x=down / s0) if k == 0 else dict(x_base=down / s0)
            c.out(0, d=1.0 - down / s0, noise=up, **base)
            op = Op(c, noise=True, clamp=clamped, brownian=span,
                    keep_x=("z", i) if k == 0 else None, x_base=("z", i) if k == 1 else None)
            calls.append(Call(grid.t[:, i] if k == 0 else grid.sk_to_t(mid), op, c_in=a))
    levels = sk.astype(np.float32).astype(np.float64)  # the tree's ends as diffusers takes them
    positive = np.where(levels > 0, levels, np.inf)
    return Plan(calls, init_scale(grid, init_noise_sigma), sigma_space=True,
                brownian=(positive.min(axis=1), levels.max(axis=1), noise_sampler_seed))
