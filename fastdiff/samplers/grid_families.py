"""Time grids of the flow-matching, EDM, consistency (LCM/TCD) and inversion samplers.

``build_grid`` hands over to :func:`family_grid` for these; each repeats the matching
diffusers scheduler's ``set_timesteps``. The grids hold the path's own (alpha, sigma):
1 - s and s for flow matching, 1 and sigma for EDM, the VP values otherwise, so the
exponential integrators (DPM-Solver, UniPC), which only read alpha, sigma and
lambda = log(alpha / sigma), run unchanged on any of them.
"""
from __future__ import annotations

import numpy as np

from ..schedules import NoiseSchedule
from .grid import Grid, _as_times, _discrete_lookup, _explicit_grid, _final, _from_sk

__all__ = ["family_grid", "GRID_OPTIONS", "lcm_timesteps"]

GRID_OPTIONS = ("mu", "sigmas", "original_inference_steps")  # run options that shape the grid
_OWN_FLAVORS = ("flow", "edm", "cm", "lcm", "ddim-inverse", "dpm-inverse")


def family_grid(schedule, steps, *, flavor, flow, timesteps, spacing, steps_offset, karras, final,
                sigma_min, sigma_max, sigma_kind=None, mu=None, sigmas=None, original_inference_steps=None):
    """The grid of a family built here, or None (build_grid's own VP families)."""
    kind = getattr(schedule, "kind", None)
    if sigma_kind is not None and (kind in ("flow", "edm") or flavor in _OWN_FLAVORS):
        if kind != "flow" or sigma_kind not in ("karras", "exponential", "beta"):
            raise ValueError(f"{sigma_kind} sigmas are not an option of this sampler / schedule")
        karras = sigma_kind
    if (mu is not None or sigmas is not None) and kind != "flow":
        raise ValueError("mu (dynamic shifting) and sigmas need a flow schedule (NoiseSchedule.flow)")
    if original_inference_steps is not None and flavor != "lcm":
        raise ValueError("original_inference_steps is an option of the lcm / tcd samplers only")
    if kind == "flow":
        variant = "match" if flavor == "flow" else flow
        if variant is None:
            raise ValueError(f"this sampler is not defined on a flow-matching schedule; use flow-euler, "
                             "flow-heun or a DPM-Solver / UniPC name")
        if sigma_min is not None or sigma_max is not None:
            raise ValueError("sigma_min / sigma_max are not options of flow-matching grids")
        if sigmas is not None and timesteps is not None and variant != "match":
            raise ValueError("give either timesteps or sigmas")
        return _flow_grid(schedule, steps, variant, timesteps, karras, final, mu, sigmas)  # karras: bool or a kind
    if flavor == "flow":
        raise ValueError(f"flow-matching samplers need a flow schedule (NoiseSchedule.flow()), got {schedule!r}")
    if kind == "edm" or flavor in ("edm", "cm"):
        if kind != "edm" or flavor not in ("edm", "cm"):
            raise ValueError("EDM samplers (edm-euler, edm-dpm++2m, cm) and NoiseSchedule.edm() go together; "
                             f"got {schedule!r}")
        if karras or sigma_min is not None or sigma_max is not None:
            raise ValueError("set the EDM grid on the schedule: NoiseSchedule.edm(sigma_min, sigma_max, rho, "
                             "sigma_schedule)")
        if flavor == "cm":
            return _cm_grid(schedule, steps, timesteps)
        return _edm_grid(schedule, steps, timesteps, final)
    if flavor not in _OWN_FLAVORS:
        return None
    if not isinstance(schedule, NoiseSchedule) or schedule.continuous:
        raise ValueError(f"the {flavor} samplers need a discrete VP schedule, got {schedule!r}")
    if karras:
        raise ValueError(f"karras sigmas are not an option of the {flavor} samplers")
    if flavor == "lcm":
        if timesteps is None:
            timesteps = lcm_timesteps(schedule.T, _steps(steps), original_inference_steps or 50)
        return _explicit_grid(schedule, None, timesteps, "ddim", "zero")
    if timesteps is not None:
        raise ValueError("inversion samplers build their own ascending timesteps; explicit timesteps "
                         "are not supported")
    if flavor == "ddim-inverse":
        return _ddim_inverse_grid(schedule, _steps(steps), spacing or "leading", steps_offset, final)
    return _dpm_inverse_grid(schedule, _steps(steps), spacing or "linspace", steps_offset)


def _steps(steps):
    if steps is None or isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return int(steps)


# -- flow matching ------------------------------------------------------------------------

class _FlowLookup:
    """(alpha, sigma) = (1 - t / T, t / T) of model times t (a class: picklable)."""

    def __init__(self, T):
        self.T = T

    def __call__(self, t):
        s = np.asarray(t, dtype=np.float64) / self.T
        return 1.0 - s, s


def _flow_grid(schedule, steps, variant, timesteps, karras, final, mu, sigmas=None):
    T = schedule.T
    if timesteps is not None and sigmas is None:
        if karras:
            raise ValueError("explicit timesteps and karras sigmas exclude each other")
        ts = _as_times(timesteps, steps, 0.0, float(T), f"a flow schedule (model times in [0, {T}])")
        s = np.concatenate([ts / T, np.zeros((ts.shape[0], 1))], axis=1)
        return Grid(t=ts, alpha=1.0 - s, sigma=s, t_integer=variant != "match" and bool((ts == np.round(ts)).all()),
                    lookup=_FlowLookup(T))
    if sigmas is not None and steps is None:  # explicit timesteps came with them
        steps = len(sigmas)
    t, s = schedule.grid_sigmas(_steps(steps), variant, mu, karras, sigmas)
    if timesteps is not None and not schedule.params["invert_sigmas"]:
        # FlowMatchEuler's set_timesteps(sigmas=, timesteps=): the sigmas go through the
        # shift, the model times are used as given (float32); inversion recomputes them
        ts = _as_times(timesteps, len(t), 0.0, float(T), f"a flow schedule (model times in [0, {T}])")
        if ts.shape[0] != 1:
            raise ValueError("explicit sigmas take one row of timesteps, not per-sample timesteps")
        t = ts[0].astype(np.float32).astype(np.float64)
    t_end = None
    if variant == "match":
        if schedule.params["invert_sigmas"]:
            t_end = np.array([float(T)])
    elif final == "sigma_min":
        if variant == "dpm":
            raise ValueError("final_sigmas_type='sigma_min' with flow sigmas: diffusers' DPM-Solver then "
                             "ends at the VP beta table's sigma_min, which a flow schedule does not have; "
                             "use final_sigmas_type='zero'")
        s[-1], t_end = s[-2], t[-1:].copy()  # UniPC: the last sigma repeated (a zero-length step)
    return Grid(t=t[None], alpha=1.0 - s[None], sigma=s[None], t_integer=variant != "match",
                lookup=_FlowLookup(T), t_end=t_end)


# -- EDM ----------------------------------------------------------------------------------

class _EDMLookup:
    """(alpha, sigma) = (1, exp(t / scale)) of model times t (a class: picklable)."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, t):
        t = np.asarray(t, dtype=np.float64)
        return np.ones_like(t), np.exp(t / self.scale)


def _edm_grid(schedule, steps, timesteps, final):
    if timesteps is not None:
        ts = np.asarray(timesteps, dtype=np.float64)
        ts = ts[None] if ts.ndim == 1 else ts
        if ts.ndim != 2 or not np.isfinite(ts).all() or (ts.shape[1] > 1 and not (np.diff(ts, axis=1) < 0).all()):
            raise ValueError("EDM timesteps (0.25 log sigma) must be finite and strictly decreasing, [N] or [B, N]")
        s = np.exp(ts / schedule.params["time_scale"])
    else:
        t, s = schedule.grid_sigmas(_steps(steps))
        ts, s = t[None], s[None]
    last = np.zeros((s.shape[0], 1)) if final == "zero" else s[:, -1:]
    sig = np.concatenate([s, last], axis=1)
    return Grid(t=ts, alpha=np.ones_like(sig), sigma=sig, t_integer=False,
                lookup=_EDMLookup(schedule.params["time_scale"]), t_end=None if final == "zero" else ts[:, -1].copy())


# -- consistency models ---------------------------------------------------------------------

def _cm_grid(schedule, steps, timesteps):
    """CMStochasticIterativeScheduler: ``steps`` of the T (distillation) timesteps, mapped
    to Karras sigmas by their position; model time time_scale log sigma (250 in diffusers);
    final level sigma_min."""
    p, T = schedule.params, schedule.T
    if timesteps is not None:
        raise ValueError("the consistency sampler builds its own timesteps; pass steps")
    steps = _steps(steps)
    if steps > T:
        raise ValueError(f"steps must be <= the schedule's {T} timesteps, got {steps}")
    ramp = np.arange(0, steps) * (T // steps) / (T - 1)
    lo, hi = p["sigma_min"] ** (1 / p["rho"]), p["sigma_max"] ** (1 / p["rho"])
    sig = (hi + ramp * (lo - hi)) ** p["rho"]
    t = p["time_scale"] * np.log(sig + 1e-44)
    sig = np.append(sig, p["sigma_min"]).astype(np.float32).astype(np.float64)
    return Grid(t=t[None], alpha=np.ones((1, steps + 1)), sigma=sig[None], t_integer=False,
                lookup=_EDMLookup(p["time_scale"]), t_end=t[-1:].copy())


def lcm_timesteps(T: int, steps: int, original_steps: int = 50, strength: float = 1.0) -> np.ndarray:
    """LCM / TCD timesteps (diffusers' set_timesteps): ``steps`` of the distillation's
    ``original_steps`` skipping-step schedule, descending, int-valued float64 [steps].
    ``strength`` in (0, 1]: only the lowest ``int(original_steps * strength)`` of its
    timesteps are spaced over (diffusers' img2img schedule of these schedulers)."""
    if not 1 <= original_steps <= T:
        raise ValueError(f"original_inference_steps must be in [1, {T}], got {original_steps}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    origin = np.arange(1, int(original_steps * strength) + 1) * (T // original_steps) - 1
    if steps > original_steps:
        raise ValueError(f"steps ({steps}) must not exceed original_inference_steps ({original_steps})")
    if steps > len(origin):
        raise ValueError(f"steps ({steps}) must not exceed int(original_inference_steps * strength) "
                         f"({len(origin)})")
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[::-1][idx].astype(np.float64)


# -- inversion (data to noise): ascending timesteps ---------------------------------------

def _ddim_inverse_grid(schedule, steps, spacing, steps_offset, final):
    """DDIMInverseScheduler: step k goes from the level at t_k - T // steps (the initial
    level below 0) to the level at t_k, the model evaluated at t_k (diffusers' rule)."""
    T = schedule.T
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "leading":
        ts = np.arange(0, steps) * (T // steps) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)[::-1]).astype(np.int64) - 1
    else:
        raise ValueError(f"DDIM inversion supports timestep_spacing 'leading' or 'trailing', got {spacing!r}")
    ts = ts.astype(np.float64)
    lookup = _discrete_lookup(schedule, *_final(schedule, final))
    a0, s0 = lookup(ts - T // steps)
    a1, s1 = lookup(ts[-1:])
    grid = Grid(t=ts[None], alpha=np.append(a0, a1)[None], sigma=np.append(s0, s1)[None], t_integer=True,
                lookup=lookup, spacing=spacing, t_end=ts[-1:])
    grid.rule = T // steps
    return grid


def _dpm_inverse_grid(schedule, steps, spacing, steps_offset):
    """DPMSolverMultistepInverseScheduler: ascending timesteps, sigmas interpolated in the
    sigma table, the last level the noisiest timestep's."""
    T = schedule.T
    top = T - 1
    if spacing == "linspace":
        ts = np.linspace(0, top, steps + 1).round()[:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * ((top + 1) // (steps + 1))).round()[:-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.arange(top + 1, 0, -T / steps).round()[::-1].astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")
    table = schedule.sigma_table().numpy()
    if len(np.unique(ts)) < len(ts):
        raise ValueError(f"{steps} steps repeat timesteps of a {T}-step schedule; use fewer steps")
    alpha, sigma = _from_sk(np.append(np.interp(ts, np.arange(T), table), table[top]))
    ts = ts.astype(np.float64)
    return Grid(t=ts[None], alpha=alpha[None], sigma=sigma[None], t_integer=True,
                lookup=_discrete_lookup(schedule, 1.0, 0.0), spacing=spacing, t_end=np.array([float(top)]))

