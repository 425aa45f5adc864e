"""Time grids: where a sampler evaluates the model and which noise levels it steps through.

A :class:`Grid` holds, per sample row (one row shared by the batch, or one per sample when
timesteps differ per sample), the model times ``t[:, k]`` of the N evaluation points and
the VP scales ``alpha[:, k], sigma[:, k]`` of points k = 0..N, point N being the final
noise level (0 for ``final_sigmas_type="zero"``). All values are float64 numpy arrays on
the host; samplers turn them into step coefficients once, before the loop.

The grids repeat diffusers' ``set_timesteps`` exactly (spacings, Karras sigmas, final
sigma), through :class:`fastdiff.schedules.NoiseSchedule`, so that a sampler here and the
matching diffusers scheduler visit the same noise levels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..schedules import _REAL, NoiseSchedule, diffusers_timesteps

__all__ = ["Grid", "build_grid", "DISCRETE_SPACINGS", "CONTINUOUS_SPACINGS"]

DISCRETE_SPACINGS = ("leading", "linspace", "trailing")
CONTINUOUS_SPACINGS = ("time_uniform", "time_quadratic", "logSNR", "logSNR_flat")
FINAL_SIGMAS = ("zero", "sigma_min", "last")
# -- solvers: noise-level grids other than Karras (diffusers' use_exponential_sigmas,
# use_beta_sigmas, use_lu_lambdas) ---------------------------------------------------------
SIGMA_KINDS = ("karras", "exponential", "beta", "lu")


@dataclass
class Grid:
    """Noise levels of one sampling run (float64, host). R rows: 1 (shared) or B.

    t:      [R, N] model time of evaluation point k (what the network is fed).
    alpha:  [R, N+1] signal scale of point k; point N is the final level.
    sigma:  [R, N+1] noise scale of point k (alpha^2 + sigma^2 = 1).
    t_integer: the model gets int64 timesteps (else float32).
    lookup: (alpha, sigma) of arbitrary model times [R] on the same schedule; for a
        discrete schedule a negative time means the final level (diffusers' "prev < 0").
    rule:   diffusers' DDIM/PNDM step ``T // steps`` (their "prev = t - T // steps"), set
        only to repeat those schedulers exactly; None: step to the next grid point.
    spacing: the spacing name the grid was built with (None for explicit timesteps).
    t_end:  [R] model time of the final level (NaN when it is sigma = 0).
    sk_to_t: model times [R] of noise levels sk = sigma / alpha [R] on the same schedule
        (fractional timesteps for a discrete schedule), for samplers that evaluate the
        model between grid points (KDPM2).
    row_integer: [R] bool, the row's model times are all integers (a row is treated as
        it would be alone, whatever the other rows of a per-sample grid are).
    sigma_range: (sigma_min, sigma_max) the levels were spaced in ("cosine" flavour).
    from_lambda, lam_span: DPM-Solver's continuous-time grids only: (model times, alpha,
        sigma) of half log-SNRs [M], and the lambda range of the run (its final level
        before a zero final sigma), to re-space the grid (``dpm.grouped_logsnr_grid``).
    """
    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    t_integer: bool
    lookup: Callable = field(repr=False)
    rule: int | None = None
    spacing: str | None = None
    t_end: np.ndarray | None = None
    sk_to_t: Callable | None = field(default=None, repr=False)
    row_integer: np.ndarray | None = None
    sigma_range: tuple | None = None
    from_lambda: Callable | None = field(default=None, repr=False)
    lam_span: tuple | None = None

    def __post_init__(self):
        if self.row_integer is None:
            self.row_integer = np.full(self.rows, self.t_integer)
        if self.t_end is None:
            # Model time of the final level (NaN at sigma = 0, where no model is evaluated):
            # timestep 0 for a discrete "sigma_min" level, else given by the builder.
            self.t_end = np.where(self.sigma[:, -1] == 0, np.nan, 0.0)

    @property
    def n(self) -> int:
        return self.t.shape[1]

    @property
    def rows(self) -> int:
        return self.t.shape[0]

    def t_at(self, k: int) -> np.ndarray:
        """Model time of point k (0..N), [R]."""
        return self.t[:, k] if k < self.n else self.t_end

    @property
    def final_zero(self) -> bool:
        return bool((self.sigma[:, -1] == 0).all())

    @property
    def sk(self) -> np.ndarray:
        """sigma / alpha, the k-diffusion (Euler) noise level, [R, N+1]."""
        with np.errstate(divide="ignore"):
            return self.sigma / self.alpha

    @property
    def lam(self) -> np.ndarray:
        """Half log-SNR log(alpha / sigma), [R, N+1] (+inf at sigma = 0)."""
        with np.errstate(divide="ignore"):
            return np.log(self.alpha) - np.log(self.sigma)


def _from_sk(sk):
    """VP (alpha, sigma) of the k-diffusion level sk = sigma / alpha."""
    sk = np.asarray(sk, dtype=np.float64)
    alpha = 1.0 / np.sqrt(sk * sk + 1.0)
    return alpha, sk * alpha


def _final(schedule: NoiseSchedule, final: str, t_end=None):
    if final == "zero":
        return 1.0, 0.0
    if schedule.continuous:
        t_end = schedule.t_eps if t_end is None else t_end
        return float(schedule.alpha(t_end)), float(schedule.sigma(t_end))
    ac0 = float(schedule.alphas_cumprod[0])
    return ac0 ** 0.5, (1.0 - ac0) ** 0.5


def _as_timesteps(timesteps, schedule, steps):
    """Explicit model times -> float64 [R, N], checked."""
    lo, hi = (0.0, 1.0) if schedule.continuous else (0.0, schedule.T - 1)
    return _as_times(timesteps, steps, lo, hi, repr(schedule))


def _as_times(timesteps, steps, lo, hi, what):
    if isinstance(timesteps, torch.Tensor):
        if timesteps.dtype == torch.bool or timesteps.is_complex():
            raise TypeError(f"timesteps must be real numbers, got {timesteps.dtype}")
        ts = timesteps.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            ts = np.asarray(timesteps, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError("timesteps must be a tensor, an ndarray or a list of numbers, got "
                            f"{type(timesteps).__name__}") from None
    if ts.ndim == 1:
        ts = ts[None]
    if ts.ndim != 2 or ts.shape[1] < 1:
        raise ValueError(f"timesteps must have shape [steps] or [batch, steps], got {ts.shape}")
    if steps is not None and ts.shape[1] != steps:
        raise ValueError(f"timesteps has {ts.shape[1]} steps per row but steps={steps}; "
                         "pass steps=None with explicit timesteps")
    if not np.isfinite(ts).all():
        raise ValueError("timesteps must be finite")
    if ts.shape[1] > 1 and not (np.diff(ts, axis=1) < 0).all():
        raise ValueError("timesteps must be strictly decreasing along each row (from noise to data)")
    if ts.min() < lo or ts.max() > hi:
        raise ValueError(f"timesteps must lie in [{lo:g}, {hi:g}] for {what}, got values in "
                         f"[{ts.min():g}, {ts.max():g}]")
    return ts


def build_grid(schedule: NoiseSchedule, steps: int | None, *, flavor: str,
               timesteps=None, spacing: str | None = None, steps_offset: int = 0,
               karras: bool = False, final: str = "zero", karras_t: str = "round",
               karras_range: str = "table", sigma_min: float | None = None,
               sigma_max: float | None = None, lambda_min_clipped: float = -float("inf"),
               rule: bool = False, sigma_kind: str | None = None, flow: str | None = None,
               **family_options) -> Grid:
    """The grid of one sampling run.

    Args:
        schedule: the noise schedule (discrete or continuous).
        steps: number of evaluation points N (None when ``timesteps`` is given).
        flavor: diffusers family whose timestep formulas to use: "ddim" (DDIM, DDPM,
            PNDM), "dpmsolver" (DPM-Solver, UniPC, DEIS), "euler" (Euler, Heun, LMS,
            KDPM2: fractional "linspace" timesteps and linear-in-sigma interpolation;
            "euler64" the same with float64 "linspace" timesteps: DPMSolverSDE) or
            "angle" (IPNDM's own grid, see ``fastdiff.samplers.ipndm``; the schedule is
            not used) or "cosine" (noise levels in [sigma_min, sigma_max], exponential or
            Karras, at the angle model time atan(sk) 2 / pi: diffusers'
            CosineDPMSolverMultistepScheduler; the schedule is not used).
        timesteps: explicit model times, [N] or [B, N] (one grid per sample), descending.
        spacing: "leading" / "linspace" / "trailing" (discrete) or "time_uniform" /
            "time_quadratic" / "logSNR" (DPM-Solver's own grids, in its continuous time:
            for a discrete schedule t = (index + 1) / T, log alpha piecewise linear).
        steps_offset: added to "leading" timesteps (diffusers).
        karras: Karras et al. sigmas (rho = 7) instead of the spacing; the same as
            ``sigma_kind="karras"``.
        final: "zero" (sigma = 0 after the last step), "sigma_min" (the schedule's
            smallest noise level: alphas_cumprod[0], or t_eps / the last spaced time when
            continuous) or "last" (the last evaluation point's level again: a zero-length
            last step, as diffusers' DEIS does with Karras / exponential / beta sigmas).
        karras_t: model times of Karras sigmas: "round" (DPM-Solver singlestep, UniPC),
            "dpm" (round, but truncate for the cosine schedule: DPMSolverMultistep),
            "float" (Euler family, fractional).
        karras_range: "table" (sigma range of the whole schedule: DPM-Solver, UniPC) or
            "spaced" (range of the spaced timesteps: Euler, Heun, LMS).
        sigma_min, sigma_max: override the Karras range ends (sigma / alpha units).
        lambda_min_clipped: DPM-Solver's clipping of the smallest log-SNR ("linspace" and
            "leading" only).
        rule: record diffusers' DDIM/PNDM "prev = t - T // steps" rule in the grid.
        sigma_kind: noise levels instead of the spacing: "karras", "exponential"
            (uniform in log sigma), "beta" (Beta(0.6, 0.6) quantiles in sigma) or "lu"
            (uniform in log-SNR over the whole table: Lu et al.'s DPM-Solver grid as
            diffusers' use_lu_lambdas). Model times: as ``karras_t`` for "karras" and
            "lu"; fractional (Euler flavor) or truncated to an integer (others) for
            "exponential" and "beta", as diffusers casts them.
        flow: the family's grid on a flow-matching schedule ("dpm" / "unipc": diffusers'
            ``use_flow_sigmas`` of those schedulers; None: not defined there).
        **family_options: ``mu``, ``original_inference_steps`` (see ``grid_families``).
    """
    from .grid_families import family_grid  # flow / EDM / LCM / inversion grids
    own = family_grid(schedule, steps, flavor=flavor, flow=flow, timesteps=timesteps, spacing=spacing,
                      steps_offset=steps_offset, karras=karras, final=final, sigma_min=sigma_min,
                      sigma_max=sigma_max, sigma_kind=sigma_kind, **family_options)
    if own is not None:
        return own
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastdiff.schedules.NoiseSchedule, got {type(schedule).__name__}")
    if final not in FINAL_SIGMAS:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS}, got {final!r}")
    if isinstance(lambda_min_clipped, bool) or not isinstance(lambda_min_clipped, _REAL):
        raise TypeError(f"lambda_min_clipped must be a real number (a log-SNR, -inf for no "
                        f"clipping), got {type(lambda_min_clipped).__name__}")
    if lambda_min_clipped != lambda_min_clipped:
        raise ValueError("lambda_min_clipped must be a log-SNR or -inf (no clipping), got nan")
    kind = _sigma_kind(karras, sigma_kind)
    # "euler64": the Euler flavour with float64 "linspace" timesteps (DPMSolverSDEScheduler)
    f64, flavor = flavor == "euler64", "euler" if flavor == "euler64" else flavor
    if flavor == "angle":
        if kind is not None or spacing is not None:
            raise ValueError(f"this sampler has its own time grid; {kind or 'spacing'} is not supported")
        return angle_grid(steps, timesteps)
    if flavor == "cosine":
        if spacing is not None or timesteps is not None:
            raise ValueError("the cosine DPM-Solver's grid is set by sigma_min, sigma_max and karras / "
                             "exponential_sigmas, not by a spacing or explicit timesteps")
        grid = angle_grid(steps, levels=_cosine_levels(kind, steps, sigma_min, sigma_max), final=final)
        grid.sigma_range = (0.3 if sigma_min is None else float(sigma_min),
                            500.0 if sigma_max is None else float(sigma_max))
        return grid
    if timesteps is not None:
        if kind is not None:
            raise ValueError(f"explicit timesteps and {kind} sigmas exclude each other")
        return _explicit_grid(schedule, steps, timesteps, flavor, final)
    if steps is None:
        raise ValueError("give steps or timesteps")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if schedule.continuous or (spacing in CONTINUOUS_SPACINGS and kind is None):
        return _continuous_grid(schedule, int(steps), spacing or "time_uniform", kind, final)
    T = schedule.T
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] (the schedule's training timesteps), got {steps}")
    spacing = spacing or ("leading" if flavor == "ddim" else "linspace")
    if spacing not in DISCRETE_SPACINGS:
        raise ValueError(f"spacing must be one of {DISCRETE_SPACINGS + CONTINUOUS_SPACINGS} for a discrete "
                         f"schedule ({CONTINUOUS_SPACINGS} without Karras / other sigma grids), got {spacing!r}")
    ts = _spaced(schedule, steps, spacing, steps_offset, flavor, lambda_min_clipped)
    if f64 and spacing == "linspace":
        ts = np.linspace(0, T - 1, steps)[::-1].copy()
    table = schedule.sigma_table().numpy()  # sigma / alpha per timestep, as diffusers builds it
    if kind is not None:
        if karras_range == "spaced":
            spaced_sk = np.interp(ts, np.arange(T), table)
            sigma_min = spaced_sk[-1] if sigma_min is None else sigma_min
            sigma_max = spaced_sk[0] if sigma_max is None else sigma_max
        sk = sigma_levels(schedule, kind, steps, sigma_min, sigma_max)
        ts = _level_times(schedule, schedule.sigma_to_t(sk).numpy(), kind, karras_t, flavor)
        alpha, sigma = _from_sk(sk)
    elif flavor == "ddim":
        ac = schedule.alphas_cumprod.numpy()
        alpha, sigma = np.sqrt(ac[ts.astype(np.int64)]), np.sqrt(1.0 - ac[ts.astype(np.int64)])
    else:
        alpha, sigma = _from_sk(np.interp(ts, np.arange(T), table))
    fa, fs = (alpha[-1], sigma[-1]) if final == "last" else _final(schedule, final)
    t_end = np.array([ts[-1]]) if final == "last" else None
    grid = Grid(t=ts[None].astype(np.float64),
                alpha=np.append(alpha, fa)[None], sigma=np.append(sigma, fs)[None],
                t_integer=flavor != "euler" and bool((ts == np.round(ts)).all()),
                lookup=_discrete_lookup(schedule, fa, fs), spacing=spacing, t_end=t_end,
                sk_to_t=_discrete_sk_to_t(schedule))
    if rule:
        grid.rule = T // steps
    return grid


# -- solvers: exponential / beta / lu noise levels and IPNDM's angle grid ------------------

def _sigma_kind(karras, sigma_kind):
    if sigma_kind is not None and sigma_kind not in SIGMA_KINDS:
        raise ValueError(f"sigma_kind must be one of {SIGMA_KINDS}, got {sigma_kind!r}")
    if karras and sigma_kind not in (None, "karras"):
        raise ValueError(f"karras sigmas and {sigma_kind} sigmas exclude each other (diffusers: only one "
                         "of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas / use_lu_lambdas)")
    return "karras" if karras else sigma_kind


def sigma_levels(schedule: NoiseSchedule, kind: str, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    """n descending noise levels sk = sigma / alpha of the given kind (see ``build_grid``)
    between sigma_min and sigma_max (default: the schedule's whole range), float64 [n];
    the arithmetic of diffusers' ``_convert_to_karras / _exponential / _beta / _lu``."""
    if kind == "karras":
        return schedule.karras_sigmas(n, sigma_min, sigma_max).numpy()
    if schedule.continuous:
        lo, hi = schedule.sigma_edm(schedule.t_eps).item(), schedule.sigma_edm(schedule.t_max).item()
    else:
        table = schedule.sigma_table().numpy()
        lo, hi = table[0].item(), table[-1].item()
    if kind == "lu":  # diffusers' lu ignores sigma_min / sigma_max (DPM-Solver has none)
        return np.exp(np.linspace(float(np.log(np.float32(hi))), float(np.log(np.float32(lo))), n))
    lo = lo if sigma_min is None else float(sigma_min)
    hi = hi if sigma_max is None else float(sigma_max)
    if not 0 < lo < hi:
        raise ValueError(f"{kind} sigmas need 0 < sigma_min < sigma_max, got {lo}, {hi}")
    if kind == "exponential":
        return np.exp(np.linspace(np.log(hi), np.log(lo), n))
    try:
        from scipy.stats import beta
    except ImportError:
        raise ImportError("beta sigmas need scipy (pip install scipy)") from None
    return lo + beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (hi - lo)


def _level_times(schedule, tk, kind, karras_t, flavor):
    if kind in ("karras", "lu"):
        if karras_t == "round" or (karras_t == "dpm" and schedule.kind != "cosine"):
            return np.round(tk)
        if karras_t == "dpm":
            return np.trunc(tk)  # diffusers' astype(int64) without rounding for the cosine schedule
        return tk
    return tk if flavor == "euler" else np.trunc(tk)  # diffusers' int64 cast of fractional times


def _discrete_sk_to_t(schedule):
    def sk_to_t(sk):
        return schedule.sigma_to_t(np.asarray(sk, dtype=np.float64)).numpy()
    return sk_to_t


def _cosine_levels(kind, steps, sigma_min, sigma_max):
    """The levels of diffusers' CosineDPMSolverMultistepScheduler, computed as it does in
    float32: they are also the Brownian paths' query points, where a one-ulp difference
    would change the noise by ~sqrt(ulp)."""
    lo = 0.3 if sigma_min is None else float(sigma_min)
    hi = 500.0 if sigma_max is None else float(sigma_max)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo}, {hi}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if kind in (None, "exponential"):
        sk = torch.linspace(math.log(lo), math.log(hi), int(steps)).exp().flip(0)
    elif kind == "karras":
        ramp = torch.linspace(0, 1, int(steps))
        sk = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    else:
        raise ValueError(f"the cosine DPM-Solver takes exponential or karras sigmas, not {kind}")
    return sk.float().double().numpy()


def angle_grid(steps, timesteps=None, levels=None, final="zero") -> Grid:
    """A grid in v-diffusion's angle time: alpha = cos(pi t / 2), sigma = sin(pi t / 2) at
    model times t in [0, 1] (so sk = tan(pi t / 2)). By default IPNDM's levels
    sigma_k = sin^2(pi u_k / 2), u_k = 1 - k / steps (diffusers' IPNDMScheduler); else the
    given descending times [N] or [B, N], or noise levels ``levels`` (sk, [N]). The final
    level is sigma = 0, or with ``final="sigma_min"`` the last of ``levels``."""
    if levels is not None:
        sk = np.asarray(levels, dtype=np.float64)
        ts = (np.arctan(sk) * 2 / np.pi)[None]
        alpha, sigma = _from_sk(sk)
        fa, fs = (1.0, 0.0) if final == "zero" else (alpha[-1], sigma[-1])
        return Grid(t=ts, alpha=np.append(alpha, fa)[None], sigma=np.append(sigma, fs)[None],
                    t_integer=False, lookup=_angle_lookup, sk_to_t=_angle_sk_to_t,
                    t_end=np.array([np.nan if final == "zero" else ts[0, -1]]))
    if timesteps is None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        u = np.linspace(1.0, 0.0, int(steps) + 1)[:-1]
        s = np.sin(u * np.pi / 2) ** 2
        ts = (np.arctan2(s, np.sqrt(1.0 - s * s)) * 2 / np.pi)[None]
    else:
        ts = _as_times(timesteps, steps, 0.0, 1.0, "IPNDM's angle time")
    R = ts.shape[0]
    alpha = np.concatenate([np.cos(ts * np.pi / 2), np.ones((R, 1))], axis=1)
    sigma = np.concatenate([np.sin(ts * np.pi / 2), np.zeros((R, 1))], axis=1)
    alpha[:, :-1] = np.where(ts == 1.0, 0.0, alpha[:, :-1])  # cos(pi / 2) exactly
    return Grid(t=ts, alpha=alpha, sigma=sigma, t_integer=False, lookup=_angle_lookup,
                sk_to_t=_angle_sk_to_t)


def _angle_lookup(t):
    t = np.asarray(t, dtype=np.float64)
    return np.cos(t * np.pi / 2), np.sin(t * np.pi / 2)


def _angle_sk_to_t(sk):
    return np.arctan(np.asarray(sk, dtype=np.float64)) * 2 / np.pi


def _spaced(schedule, steps, spacing, steps_offset, flavor, lambda_min_clipped):
    T = schedule.T
    if lambda_min_clipped != -float("inf") and flavor == "dpmsolver":
        # DPM-Solver: drop the timesteps whose log-SNR is below the clip (spacing over
        # [0, last) instead of [0, T)); lambda decreases with t.
        lam = schedule.lambda_(torch.arange(T)).flip(0)
        last = T - int(torch.searchsorted(lam, torch.tensor(float(lambda_min_clipped), dtype=lam.dtype)))
        if spacing == "trailing":
            raise ValueError("lambda_min_clipped is not supported with timestep_spacing='trailing'")
        return diffusers_timesteps(last, steps, spacing, steps_offset, flavor).numpy().astype(np.float64)
    return schedule.timesteps(steps, spacing, steps_offset, flavor).numpy().astype(np.float64)


def _discrete_lookup(schedule, fa, fs):
    ac = schedule.alphas_cumprod.numpy()

    def lookup(t):
        # Integer times read the table, fractional ones interpolate, element by element:
        # a row gets the same levels whatever the other rows of a per-sample grid hold.
        t = np.asarray(t, dtype=np.float64)
        tc = np.clip(t, 0, None)
        integer = tc == np.round(tc)
        idx = np.where(integer, tc, 0).astype(np.int64)
        a, s = np.sqrt(ac[idx]), np.sqrt(1.0 - ac[idx])
        if not integer.all():
            tt = torch.from_numpy(np.where(integer, 0.0, tc))
            a = np.where(integer, a, schedule.alpha(tt).numpy())
            s = np.where(integer, s, schedule.sigma(tt).numpy())
        return np.where(t < 0, fa, a), np.where(t < 0, fs, s)
    return lookup


def _continuous_lookup(schedule):
    def lookup(t):
        tt = torch.from_numpy(np.asarray(t, dtype=np.float64))
        return schedule.alpha(tt).numpy(), schedule.sigma(tt).numpy()
    return lookup


def _continuous_grid(schedule, steps, spacing, kind, final):
    """DPM-Solver's grids in its continuous time (native time of a continuous schedule;
    (index + 1) / T of a discrete one, as the official code's discrete NoiseScheduleVP)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if kind is not None:
        sk = sigma_levels(schedule, kind, steps + 1)
        alpha, sigma = _from_sk(sk)
        ts = schedule.inverse_lambda(torch.from_numpy(-np.log(sk))).numpy()
    else:
        if spacing not in CONTINUOUS_SPACINGS:
            raise ValueError(f"spacing must be one of {CONTINUOUS_SPACINGS} for a continuous schedule, "
                             f"got {spacing!r}")
        fn = {"logSNR": "logSNR_uniform", "logSNR_flat": "logSNR_uniform"}.get(spacing, spacing)
        ts = getattr(schedule, fn)(steps).numpy()
        tt = torch.from_numpy(ts)
        alpha, sigma = schedule.marginal_alpha(tt).numpy(), schedule.marginal_std(tt).numpy()
    if not schedule.continuous:
        ts = schedule.cont_to_t(torch.from_numpy(ts)).numpy()
        ts[-1] = max(ts[-1], 0.0)  # (1 / T) * T - 1 may round below 0
    with np.errstate(divide="ignore"):
        lam_span = (float(np.log(alpha[0] / sigma[0])), float(np.log(alpha[-1] / sigma[-1])))
    if final == "zero":
        alpha, sigma = alpha.copy(), sigma.copy()
        alpha[-1], sigma[-1] = 1.0, 0.0
    elif final == "last":
        alpha, sigma, ts = alpha[:-1], sigma[:-1], ts[:-1]
        alpha, sigma, ts = np.append(alpha, alpha[-1]), np.append(sigma, sigma[-1]), np.append(ts, ts[-1])
    if schedule.continuous:
        lookup, sk_to_t = _continuous_lookup(schedule), _continuous_sk_to_t(schedule)
    else:
        lookup, sk_to_t = _discrete_lookup(schedule, alpha[-1], sigma[-1]), _discrete_sk_to_t(schedule)
    return Grid(t=ts[None, :-1].copy(), alpha=alpha[None], sigma=sigma[None], t_integer=False,
                lookup=lookup, spacing=kind or spacing, sk_to_t=sk_to_t,
                t_end=np.array([np.nan if final == "zero" else ts[-1]]),
                from_lambda=_from_lambda(schedule), lam_span=lam_span)


def _from_lambda(schedule):
    def from_lambda(lam):
        t_cont = schedule.inverse_lambda(torch.from_numpy(np.asarray(lam, dtype=np.float64)))
        alpha, sigma = schedule.marginal_alpha(t_cont).numpy(), schedule.marginal_std(t_cont).numpy()
        t = t_cont.numpy() if schedule.continuous else schedule.cont_to_t(t_cont).numpy()
        return np.maximum(t, 0.0), alpha, sigma
    return from_lambda


def _continuous_sk_to_t(schedule):
    def sk_to_t(sk):
        return schedule.inverse_lambda(torch.from_numpy(-np.log(np.asarray(sk, dtype=np.float64)))).numpy()
    return sk_to_t


def _explicit_grid(schedule, steps, timesteps, flavor, final):
    ts = _as_timesteps(timesteps, schedule, steps)
    R = ts.shape[0]
    row_integer = (ts == np.round(ts)).all(axis=1)
    if schedule.continuous:
        tt = torch.from_numpy(ts)
        alpha, sigma = schedule.alpha(tt).numpy(), schedule.sigma(tt).numpy()
        t_integer, lookup = False, _continuous_lookup(schedule)
        sk_to_t, row_integer = _continuous_sk_to_t(schedule), np.zeros(R, dtype=bool)
        fa, fs = _final(schedule, final)
    else:
        fa, fs = _final(schedule, "sigma_min" if final == "last" else final)
        lookup = _discrete_lookup(schedule, fa, fs)
        table = schedule.sigma_table().numpy()
        if flavor == "euler":
            alpha, sigma = _from_sk(np.interp(ts, np.arange(schedule.T), table))
            row_integer = np.zeros(R, dtype=bool)
        else:
            alpha, sigma = lookup(ts)
            if flavor == "dpmsolver":  # its sigma table for integer rows, as diffusers
                ta, tsg = _from_sk(table[np.where(row_integer[:, None], ts, 0).astype(np.int64)])
                alpha = np.where(row_integer[:, None], ta, alpha)
                sigma = np.where(row_integer[:, None], tsg, sigma)
        t_integer = flavor != "euler" and bool(row_integer.all())
        sk_to_t = _discrete_sk_to_t(schedule)
    if final == "last":
        fa, fs = alpha[:, -1:], sigma[:, -1:]
    alpha = np.concatenate([alpha, np.broadcast_to(fa, (R, 1))], axis=1)
    sigma = np.concatenate([sigma, np.broadcast_to(fs, (R, 1))], axis=1)
    t_end = None
    if final == "last":
        t_end = ts[:, -1].copy()
    elif schedule.continuous and final != "zero":
        t_end = np.full(R, schedule.t_eps)
    return Grid(t=ts, alpha=alpha, sigma=sigma, t_integer=t_integer, lookup=lookup, t_end=t_end,
                sk_to_t=sk_to_t, row_integer=row_integer)
