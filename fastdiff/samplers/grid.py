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

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..schedules import _REAL, NoiseSchedule, diffusers_timesteps

__all__ = ["Grid", "build_grid", "DISCRETE_SPACINGS", "CONTINUOUS_SPACINGS"]

DISCRETE_SPACINGS = ("leading", "linspace", "trailing")
CONTINUOUS_SPACINGS = ("time_uniform", "time_quadratic", "logSNR")
FINAL_SIGMAS = ("zero", "sigma_min")


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
    """
    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    t_integer: bool
    lookup: Callable = field(repr=False)
    rule: int | None = None
    spacing: str | None = None
    t_end: np.ndarray | None = None

    def __post_init__(self):
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
    lo, hi = (0.0, 1.0) if schedule.continuous else (0.0, schedule.T - 1)
    if ts.min() < lo or ts.max() > hi:
        raise ValueError(f"timesteps must lie in [{lo:g}, {hi:g}] for {schedule!r}, got values in "
                         f"[{ts.min():g}, {ts.max():g}]")
    return ts


def build_grid(schedule: NoiseSchedule, steps: int | None, *, flavor: str,
               timesteps=None, spacing: str | None = None, steps_offset: int = 0,
               karras: bool = False, final: str = "zero", karras_t: str = "round",
               karras_range: str = "table", sigma_min: float | None = None,
               sigma_max: float | None = None, lambda_min_clipped: float = -float("inf"),
               rule: bool = False) -> Grid:
    """The grid of one sampling run.

    Args:
        schedule: the noise schedule (discrete or continuous).
        steps: number of evaluation points N (None when ``timesteps`` is given).
        flavor: diffusers family whose timestep formulas to use: "ddim" (DDIM, DDPM,
            PNDM), "dpmsolver" (DPM-Solver, UniPC) or "euler" (Euler, Heun, LMS:
            fractional "linspace" timesteps and linear-in-sigma interpolation).
        timesteps: explicit model times, [N] or [B, N] (one grid per sample), descending.
        spacing: "leading" / "linspace" / "trailing" (discrete) or "time_uniform" /
            "time_quadratic" / "logSNR" (continuous).
        steps_offset: added to "leading" timesteps (diffusers).
        karras: Karras et al. sigmas (rho = 7) instead of the spacing.
        final: "zero" (sigma = 0 after the last step) or "sigma_min" (the schedule's
            smallest noise level: alphas_cumprod[0], or t_eps / the last spaced time when
            continuous).
        karras_t: model times of Karras sigmas: "round" (DPM-Solver singlestep, UniPC),
            "dpm" (round, but truncate for the cosine schedule: DPMSolverMultistep),
            "float" (Euler family, fractional).
        karras_range: "table" (sigma range of the whole schedule: DPM-Solver, UniPC) or
            "spaced" (range of the spaced timesteps: Euler, Heun, LMS).
        sigma_min, sigma_max: override the Karras range ends (sigma / alpha units).
        lambda_min_clipped: DPM-Solver's clipping of the smallest log-SNR ("linspace" and
            "leading" only).
        rule: record diffusers' DDIM/PNDM "prev = t - T // steps" rule in the grid.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastdiff.schedules.NoiseSchedule, got {type(schedule).__name__}")
    if final not in FINAL_SIGMAS:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS}, got {final!r}")
    if isinstance(lambda_min_clipped, bool) or not isinstance(lambda_min_clipped, _REAL):
        raise TypeError(f"lambda_min_clipped must be a real number (a log-SNR, -inf for no "
                        f"clipping), got {type(lambda_min_clipped).__name__}")
    if lambda_min_clipped != lambda_min_clipped:
        raise ValueError("lambda_min_clipped must be a log-SNR or -inf (no clipping), got nan")
    if timesteps is not None:
        if karras:
            raise ValueError("explicit timesteps and karras sigmas exclude each other")
        return _explicit_grid(schedule, steps, timesteps, flavor, final)
    if steps is None:
        raise ValueError("give steps or timesteps")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if schedule.continuous:
        return _continuous_grid(schedule, int(steps), spacing or "time_uniform", karras, final)
    T = schedule.T
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] (the schedule's training timesteps), got {steps}")
    spacing = spacing or ("leading" if flavor == "ddim" else "linspace")
    if spacing not in DISCRETE_SPACINGS:
        raise ValueError(f"spacing must be one of {DISCRETE_SPACINGS} for a discrete schedule, "
                         f"got {spacing!r}")
    ts = _spaced(schedule, steps, spacing, steps_offset, flavor, lambda_min_clipped)
    table = schedule.sigma_table().numpy()  # sigma / alpha per timestep, as diffusers builds it
    if karras:
        if karras_range == "spaced":
            spaced_sk = np.interp(ts, np.arange(T), table)
            sigma_min = spaced_sk[-1] if sigma_min is None else sigma_min
            sigma_max = spaced_sk[0] if sigma_max is None else sigma_max
        sk = schedule.karras_sigmas(steps, sigma_min, sigma_max).numpy()
        tk = schedule.sigma_to_t(sk).numpy()
        if karras_t == "round" or (karras_t == "dpm" and schedule.kind != "cosine"):
            tk = np.round(tk)
        elif karras_t == "dpm":
            tk = np.trunc(tk)  # diffusers' astype(int64) without rounding for the cosine schedule
        ts = tk
        alpha, sigma = _from_sk(sk)
    elif flavor == "ddim":
        ac = schedule.alphas_cumprod.numpy()
        alpha, sigma = np.sqrt(ac[ts.astype(np.int64)]), np.sqrt(1.0 - ac[ts.astype(np.int64)])
    else:
        alpha, sigma = _from_sk(np.interp(ts, np.arange(T), table))
    fa, fs = _final(schedule, final)
    grid = Grid(t=ts[None].astype(np.float64),
                alpha=np.append(alpha, fa)[None], sigma=np.append(sigma, fs)[None],
                t_integer=flavor != "euler" and bool((ts == np.round(ts)).all()),
                lookup=_discrete_lookup(schedule, final), spacing=spacing)
    if rule:
        grid.rule = T // steps
    return grid


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


def _discrete_lookup(schedule, final):
    ac = schedule.alphas_cumprod.numpy()
    fa, fs = _final(schedule, final)

    def lookup(t):
        t = np.asarray(t, dtype=np.float64)
        if (t == np.round(t)).all():
            idx = np.clip(t, 0, None).astype(np.int64)
            a, s = np.sqrt(ac[idx]), np.sqrt(1.0 - ac[idx])
        else:
            tt = torch.from_numpy(np.clip(t, 0, None))
            a, s = schedule.alpha(tt).numpy(), schedule.sigma(tt).numpy()
        return np.where(t < 0, fa, a), np.where(t < 0, fs, s)
    return lookup


def _continuous_lookup(schedule):
    def lookup(t):
        tt = torch.from_numpy(np.asarray(t, dtype=np.float64))
        return schedule.alpha(tt).numpy(), schedule.sigma(tt).numpy()
    return lookup


def _continuous_grid(schedule, steps, spacing, karras, final):
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if karras:
        sk = schedule.karras_sigmas(steps + 1).numpy()
        alpha, sigma = _from_sk(sk)
        ts = schedule.inverse_lambda(torch.from_numpy(-np.log(sk))).numpy()
    else:
        if spacing not in CONTINUOUS_SPACINGS:
            raise ValueError(f"spacing must be one of {CONTINUOUS_SPACINGS} for a continuous schedule, "
                             f"got {spacing!r}")
        fn = {"logSNR": "logSNR_uniform"}.get(spacing, spacing)
        ts = getattr(schedule, fn)(steps).numpy()
        tt = torch.from_numpy(ts)
        alpha, sigma = schedule.alpha(tt).numpy(), schedule.sigma(tt).numpy()
    if final == "zero":
        alpha, sigma = alpha.copy(), sigma.copy()
        alpha[-1], sigma[-1] = 1.0, 0.0
    return Grid(t=ts[None, :-1].copy(), alpha=alpha[None], sigma=sigma[None], t_integer=False,
                lookup=_continuous_lookup(schedule), spacing=spacing,
                t_end=np.array([np.nan if final == "zero" else ts[-1]]))


def _explicit_grid(schedule, steps, timesteps, flavor, final):
    ts = _as_timesteps(timesteps, schedule, steps)
    if schedule.continuous:
        tt = torch.from_numpy(ts)
        alpha, sigma = schedule.alpha(tt).numpy(), schedule.sigma(tt).numpy()
        t_integer, lookup = False, _continuous_lookup(schedule)
    else:
        integer = bool((ts == np.round(ts)).all())
        if flavor == "euler":
            table = schedule.sigma_table().numpy()
            alpha, sigma = _from_sk(np.interp(ts, np.arange(schedule.T), table))
        elif flavor == "dpmsolver" and integer:
            alpha, sigma = _from_sk(schedule.sigma_table().numpy()[ts.astype(np.int64)])
        else:
            lookup = _discrete_lookup(schedule, final)
            alpha, sigma = lookup(ts)
        t_integer = flavor != "euler" and integer
        lookup = _discrete_lookup(schedule, final)
    fa, fs = _final(schedule, final)
    R = ts.shape[0]
    alpha = np.concatenate([alpha, np.full((R, 1), fa)], axis=1)
    sigma = np.concatenate([sigma, np.full((R, 1), fs)], axis=1)
    t_end = None
    if schedule.continuous and final != "zero":
        t_end = np.full(R, schedule.t_eps)
    return Grid(t=ts, alpha=alpha, sigma=sigma, t_integer=t_integer, lookup=lookup, t_end=t_end)
