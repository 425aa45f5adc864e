"""Noise schedules, timestep spacings and E-TSDM time sharing.

All schedule arithmetic is float64 on the host; tensors handed to kernels are cast at
the boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TimeSharing", "NoiseSchedule", "diffusers_timesteps", "rescale_zero_terminal_snr"]


@dataclass(frozen=True)
class TimeSharing:
    """E-TSDM time sharing (Yang et al., ICLR 2024, docs/etsdm.md).

    Splits ``[0, t_tilde)`` into ``n`` equal sub-intervals and maps every t inside one to
    the sub-interval's LEFT end; t >= t_tilde is unchanged::

        f(t) = floor(t / width) * width   if t < t_tilde,   width = t_tilde / n
        f(t) = t                          otherwise

    Discrete time (integer ``t_tilde``, default 100 of T = 1000 steps, n = 5) maps
    0..19 -> 0, 20..39 -> 20, ..., 80..99 -> 80. Continuous time uses a float
    ``t_tilde`` in the schedule's own units (``TimeSharing.continuous()`` gives 0.1).

    Only the network's time *condition* is shared; the forward process and the
    sampler's update keep the true t.
    """

    t_tilde: float = 100
    n: int = 5

    def __post_init__(self):
        if isinstance(self.n, (bool, np.bool_)) or not isinstance(self.n, (int, np.integer)):
            raise TypeError(f"TimeSharing: n must be an int, got {type(self.n).__name__}")
        if isinstance(self.t_tilde, (bool, np.bool_)) or not isinstance(self.t_tilde, _REAL):
            raise TypeError(f"TimeSharing: t_tilde must be a number, got {type(self.t_tilde).__name__}")
        # numpy scalars become Python ones (a numpy integer t_tilde stays discrete).
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "t_tilde", int(self.t_tilde) if isinstance(
            self.t_tilde, (int, np.integer)) else float(self.t_tilde))
        if not math.isfinite(self.t_tilde) or self.t_tilde <= 0:
            raise ValueError(f"TimeSharing: t_tilde must be a positive finite number, got {self.t_tilde}")
        if self.n < 1:
            raise ValueError(f"TimeSharing: n must be >= 1, got {self.n}")
        if self.discrete:
            if self.n > self.t_tilde:
                raise ValueError(
                    f"TimeSharing: n={self.n} sub-intervals cannot split t_tilde={self.t_tilde} "
                    "integer timesteps (need n <= t_tilde)")
            if self.t_tilde % self.n != 0:
                raise ValueError(
                    f"TimeSharing: discrete t_tilde={self.t_tilde} must be divisible by n={self.n} "
                    "so that shared timesteps stay integers")

    @classmethod
    def continuous(cls, t_tilde: float = 0.1, n: int = 5) -> "TimeSharing":
        """The continuous-time form on [0, 1] (docs/etsdm.md: t~ = 0.1, n = 5)."""
        return cls(float(t_tilde), n)

    @property
    def discrete(self) -> bool:
        """True when t_tilde is an integer: timesteps are integer steps."""
        return isinstance(self.t_tilde, int)

    @property
    def width(self) -> float:
        """Length of one shared sub-interval, t_tilde / n (schedule units)."""
        return self.t_tilde / self.n

    def __call__(self, t):
        """Apply f(t). ``t``: a Python number or a tensor of any shape and dtype.

        Integer tensors stay integer (floor division). Floating tensors are mapped in
        float32 (float64 for float64 input) and returned in their own dtype; this is the
        exact arithmetic the fused kernels use.
        """
        if isinstance(t, torch.Tensor):
            return share_tensor(t, self.width, self.t_tilde)
        if not isinstance(t, (int, float)):
            raise TypeError(f"TimeSharing: t must be a number or a tensor, got {type(t).__name__}")
        if t < self.t_tilde:
            if isinstance(t, int) and self.discrete:
                w = int(self.width)
                return (t // w) * w
            return math.floor(t / self.width) * self.width
        return t

    def is_shared(self, t):
        """Boolean mask (or bool) of where f(t) != identity could apply: t < t_tilde."""
        return t < self.t_tilde


def share_tensor(t: torch.Tensor, width: float, end: float) -> torch.Tensor:
    """f(t) on a tensor (pure torch). Used by the reference ops and by TimeSharing."""
    if not t.is_floating_point():
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"time sharing expects integer or floating timesteps, got {t.dtype}")
        # Unshared t is returned as is: a round trip through float64 would change int64
        # t above 2^53 (and overflow at INT64_MAX).
        td = t.double()
        return torch.where(td < end, (torch.floor(td / width) * width).to(t.dtype), t)
    op = torch.float64 if t.dtype == torch.float64 else torch.float32
    tf = t.to(op)
    w = torch.tensor(width, dtype=op)
    return torch.where(tf < end, torch.floor(tf / w) * w, tf).to(t.dtype)


# ---------------------------------------------------------------------------------------
# Noise schedules (VP: x_t = alpha_t x0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1)
# ---------------------------------------------------------------------------------------

_F64 = torch.float64
# diffusers' sigma-based schedulers (Euler, DPM-Solver, UniPC) store this instead of an
# alpha_bar of exactly 0 (the smallest fp16 subnormal), so the first sigma stays finite.
_ZERO_SNR_ALPHA_BAR = 2.0 ** -24
_SPACINGS = ("leading", "linspace", "trailing")
_FLAVORS = ("ddim", "dpmsolver", "euler")
_DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_REAL = (int, float, np.integer, np.floating)
# Discrete kinds whose constructor rebuilds the tables from the stored params alone.
_RECIPES = ("linear", "scaled_linear", "cosine")


def _check_int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def _check_real(name, value, positive=False):
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()  # lets callers pass e.g. schedule.sigma_table()[i]
    if isinstance(value, bool) or not isinstance(value, _REAL):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_bool(name, value):
    # Only real booleans: a truthy string such as "no" must not read as True.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _as_values(t, name):
    """Number / tensor / ndarray -> (CPU tensor, device to return on, is_integer)."""
    if isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
        raise TypeError(f"{name} must be a number or a numeric tensor, got bool")
    if isinstance(t, np.ndarray):
        if t.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a numeric array, got dtype {t.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(t))
    if isinstance(t, torch.Tensor):
        if t.is_complex():
            raise TypeError(f"{name} must be real, got {t.dtype}")
        is_int = not t.is_floating_point()
        x = t.detach().to("cpu")
        return (x.long() if is_int else x.to(_F64)), t.device, is_int
    if isinstance(t, (int, np.integer)):
        return torch.tensor(int(t), dtype=torch.int64), None, True
    if isinstance(t, (float, np.floating)):
        return torch.tensor(float(t), dtype=_F64), None, False
    raise TypeError(f"{name} must be a number, an ndarray or a tensor, got {type(t).__name__}")


def _out(y, device):
    return y if device is None or device.type == "cpu" else y.to(device)


def _check_range(x, lo, hi, what):
    xd = x.to(_F64)
    if torch.isnan(xd).any():
        raise ValueError(f"{what} contains NaN")
    if xd.numel() and (xd.min() < lo or xd.max() > hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got values in "
                         f"[{xd.min().item():g}, {xd.max().item():g}]")


def _as_1d(values, name):
    """Betas / alphas_cumprod input -> 1-D CPU tensor. float32 input stays float32 so that
    the derived quantities repeat diffusers' float32 arithmetic; everything else is float64."""
    if isinstance(values, torch.Tensor):
        if not values.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {values.dtype}")
        x = values.detach().to("cpu")
        x = x if x.dtype == torch.float32 else x.to(_F64)
    elif isinstance(values, np.ndarray):
        if values.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {values.dtype}")
        x = torch.from_numpy(values.astype(np.float32 if values.dtype == np.float32 else np.float64))
    elif isinstance(values, (list, tuple)):
        if not all(isinstance(v, _REAL) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{name} must contain only real numbers")
        x = torch.tensor([float(v) for v in values], dtype=_F64)
    else:
        raise TypeError(f"{name} must be a tensor, ndarray or list of floats, got {type(values).__name__}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape [T], got shape {tuple(x.shape)}")
    if x.numel() < 1:
        raise ValueError(f"T must be >= 1, got an empty {name}")
    return x.clone()


def _first(mask):
    return int(mask.nonzero()[0, 0])


def _validate_betas(betas):
    b = betas.to(_F64)
    if not torch.isfinite(b).all():
        i = _first(~torch.isfinite(b))
        raise ValueError(f"betas must be finite (no NaN/inf): betas[{i}] = {b[i].item()}")
    bad = (b <= 0) | (b >= 1)
    bad[-1] = bool(b[-1] <= 0 or b[-1] > 1)  # beta_T = 1 exactly is zero terminal SNR
    if bad.any():
        i = _first(bad)
        raise ValueError(f"betas must lie in (0, 1) (only the last may be exactly 1, zero "
                         f"terminal SNR): betas[{i}] = {b[i].item()!r}")


def _validate_alphas_cumprod(ac):
    a = ac.to(_F64)
    if not torch.isfinite(a).all():
        i = _first(~torch.isfinite(a))
        raise ValueError(f"alphas_cumprod must be finite (no NaN/inf): alphas_cumprod[{i}] = {a[i].item()}")
    if not 0 < a[0] < 1:
        raise ValueError(f"alphas_cumprod[0] must lie in (0, 1), got {a[0].item()!r}")
    if a[-1] < 0:
        raise ValueError(f"alphas_cumprod must be >= 0, got alphas_cumprod[-1] = {a[-1].item()!r}")
    # Strict decrease also rules out a zero anywhere but the end (a zero cannot decrease further).
    up = a[1:] >= a[:-1]
    if up.any():
        i = _first(up)
        raise ValueError(f"alphas_cumprod must be strictly decreasing (each beta in (0, 1)): "
                         f"alphas_cumprod[{i + 1}] = {a[i + 1].item()!r} >= "
                         f"alphas_cumprod[{i}] = {a[i].item()!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. zero-terminal-SNR rescale (docs/singdiffusion.md), as diffusers does it.

    ``betas``: floating tensor [T], T >= 2. Works in the input's dtype, so float32 input
    reproduces diffusers' ``rescale_zero_terminal_snr`` bit for bit. Returns betas [T] with
    ``betas[-1] == 1`` (alphas_cumprod[-1] == 0) and alphas_cumprod[0] unchanged.
    """
    if not isinstance(betas, torch.Tensor) or not betas.is_floating_point():
        raise TypeError(f"betas must be a floating-point tensor, got {type(betas).__name__}")
    if betas.ndim != 1 or betas.numel() < 2:
        raise ValueError("zero-terminal-SNR rescale needs betas of shape [T] with T >= 2, "
                         f"got {tuple(betas.shape)}")
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = s - s_last
    s = s * (s0 / (s0 - s_last))
    ab = s ** 2
    return 1 - torch.cat([ab[0:1], ab[1:] / ab[:-1]])


def _diffusers_betas(T, beta_start, beta_end, beta_schedule, max_beta=0.999):
    """float32 betas exactly as diffusers' DDIM/DPM/Euler/UniPC ``__init__`` builds them."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t):  # diffusers.betas_for_alpha_bar, "cosine": Python float64, then float32
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; "
                     f"use one of {_DIFFUSERS_BETA_SCHEDULES} or trained_betas")


def diffusers_timesteps(T: int, steps: int, spacing: str = "leading", steps_offset: int = 0,
                        flavor: str = "ddim") -> torch.Tensor:
    """Descending inference timesteps exactly as diffusers' ``set_timesteps(steps)``.

    ``spacing``: ``timestep_spacing`` ("leading", "linspace", "trailing"; Lin et al. Table 2).
    ``steps_offset`` is only used by "leading", as in diffusers. ``flavor`` picks the family,
    because diffusers' schedulers disagree on "linspace" and "leading":

    * ``"ddim"``: DDIMScheduler, DDPMScheduler. int64 [steps].
    * ``"dpmsolver"``: DPMSolverMultistepScheduler (default ``lambda_min_clipped=-inf``),
      UniPCMultistepScheduler, DEISMultistepScheduler: they space ``steps + 1`` points and
      drop the last. int64 [steps].
    * ``"euler"``: EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
      LMSDiscreteScheduler: "linspace" is NOT rounded (fractional timesteps). float64 [steps]
      holding diffusers' float32 values.

    Raises ValueError for steps outside [1, T], and where diffusers' formula degenerates
    (e.g. "trailing" with steps=998 of 1000 yields 999 values ending in -1 through a
    floating-point ``np.arange`` artifact; "leading" with steps_offset=1 yields timestep T
    at steps=T ("ddim") or steps=T-1 ("dpmsolver"); "dpmsolver" "linspace" repeats
    timesteps at steps=T): diffusers returns such sequences silently, here they are refused.
    """
    T = _check_int("T", T, 1)
    steps = _check_int("steps", steps, 1, T)
    steps_offset = _check_int("steps_offset", steps_offset, 0)
    if spacing not in _SPACINGS:
        raise ValueError(f"spacing must be one of {_SPACINGS}, got {spacing!r}")
    if flavor not in _FLAVORS:
        raise ValueError(f"flavor must be one of {_FLAVORS}, got {flavor!r}")
    # The numpy expressions below are diffusers' own, so rounding ties and float artifacts match.
    out_dtype = np.float32 if flavor == "euler" else np.int64
    if flavor == "dpmsolver":
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = T // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            ts += steps_offset
        else:
            ts = np.arange(T, 0, -(T / steps)).round().copy().astype(np.int64)
            ts -= 1
    else:
        if spacing == "linspace":
            if flavor == "euler":
                ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
            else:
                ts = np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = T // steps
            ts = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(out_dtype)
            ts += steps_offset
        else:
            ts = np.round(np.arange(T, 0, -(T / steps))).astype(out_dtype)
            ts -= 1
    what = f"diffusers' {spacing!r} spacing ({flavor} family) with T={T}, steps={steps}"
    if len(ts) != steps or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"{what}, steps_offset={steps_offset} degenerates to {len(ts)} timesteps in "
                         f"[{ts.min()}, {ts.max()}] (need {steps} in [0, {T - 1}]); choose another steps")
    if steps > 1 and not (np.diff(ts) < 0).all():
        raise ValueError(f"{what} repeats timesteps; use fewer steps")
    return torch.from_numpy(ts.astype(np.float64) if flavor == "euler" else ts)


def _std(log_alpha):
    # sqrt(1 - alpha^2) without cancellation; "0.0 -" turns expm1(0)'s -0.0 into +0.0 so that
    # sigma = 0 divides to +inf, not -inf.
    return torch.sqrt(0.0 - torch.expm1(2 * log_alpha))


def _lambda(log_alpha):
    """Half log-SNR log(alpha / sigma) from log alpha."""
    return log_alpha - 0.5 * torch.log(0.0 - torch.expm1(2 * log_alpha))


def _interp(x, xp, yp):
    """Piecewise-linear y(x) through (xp, yp), xp increasing, extended linearly beyond the
    ends with the first/last segment: DPM-Solver's ``interpolate_fn``."""
    if xp.numel() == 1:
        return yp[0].expand(x.shape).clone()
    idx = (torch.searchsorted(xp, x.contiguous(), right=True) - 1).clamp(0, xp.numel() - 2)
    x0, x1 = xp[idx], xp[idx + 1]
    # lerp returns the knot values exactly at w = 0 and w = 1.
    return torch.lerp(yp[idx], yp[idx + 1], (x - x0) / (x1 - x0))


class NoiseSchedule:
    """A VP noise schedule: ``x_t = alpha_t x0 + sigma_t eps``, ``alpha_t^2 + sigma_t^2 = 1``.

    Build one with a constructor: discrete ``linear``, ``scaled_linear``, ``cosine``,
    ``from_betas``, ``from_alphas_cumprod``, ``from_diffusers``; continuous ``vp_linear``,
    ``vp_cosine``; or ``from_dict``. All tables are float64 CPU tensors.

    Two time axes:

    * native time ``t``, taken by ``alpha``, ``sigma``, ``lambda_``, ``sigma_edm``: the
      timestep index in [0, T-1] for a discrete schedule (integers read the table exactly,
      floats interpolate), t in [0, 1] for a continuous one;
    * DPM-Solver's continuous time ``t_cont``, taken by ``marginal_*`` and returned by
      ``inverse_lambda`` and the ``time_*`` / ``logSNR_uniform`` spacings: for a discrete
      schedule index i sits at ``t_cont = (i + 1) / T`` (``t_to_cont`` / ``cont_to_t``) and
      log alpha is piecewise linear in between (NoiseScheduleVP 'discrete'); for a
      continuous schedule ``t_cont == t``.
    """

    def __init__(self, kind: str, params: dict, *, betas=None, alphas_cumprod=None):
        # Not public: use the constructors, which validate their input.
        self._kind = kind
        self._params = dict(params)
        self._continuous = betas is None
        if self._continuous:
            if kind == "vp_cosine":
                s = self._params["s"]
                self._cos_log_alpha_0 = math.log(math.cos(s / (1.0 + s) * math.pi / 2.0))
            return
        self._betas = betas.to(_F64)
        self._ac = alphas_cumprod.to(_F64)
        T = self._ac.numel()
        self._log_alpha = 0.5 * torch.log(self._ac)  # -inf at a zero-SNR end
        self._knots_idx = torch.arange(T, dtype=_F64)
        self._knots_cont = torch.linspace(0.0, 1.0, T + 1, dtype=_F64)[1:]

    # -- constructors ------------------------------------------------------------------

    @classmethod
    def _discrete(cls, kind, params, betas, rescale):
        """betas: float32 (diffusers' arithmetic) or float64 tensor [T]."""
        _validate_betas(betas)
        if rescale:
            betas = rescale_zero_terminal_snr(betas)
        ac = torch.cumprod(1.0 - betas, dim=0)
        _validate_alphas_cumprod(ac)
        return cls(kind, {**params, "rescale_zero_terminal_snr": rescale}, betas=betas, alphas_cumprod=ac)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *,
               rescale_zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """DDPM linear betas (diffusers ``beta_schedule="linear"``, float32 linspace)."""
        T = _check_int("T", T, 1)
        bs, be = _check_real("beta_start", beta_start), _check_real("beta_end", beta_end)
        rescale = _check_bool("rescale_zero_terminal_snr", rescale_zero_terminal_snr)
        return cls._discrete("linear", {"T": T, "beta_start": bs, "beta_end": be},
                             _diffusers_betas(T, bs, be, "linear"), rescale)

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, *,
                      rescale_zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Latent/Stable Diffusion betas: linspace of sqrt(beta), squared (float32, as diffusers)."""
        T = _check_int("T", T, 1)
        bs, be = _check_real("beta_start", beta_start), _check_real("beta_end", beta_end)
        if bs < 0 or be < 0:
            raise ValueError(f"scaled_linear needs beta_start, beta_end >= 0, got {bs}, {be}")
        rescale = _check_bool("rescale_zero_terminal_snr", rescale_zero_terminal_snr)
        return cls._discrete("scaled_linear", {"T": T, "beta_start": bs, "beta_end": be},
                             _diffusers_betas(T, bs, be, "scaled_linear"), rescale)

    @classmethod
    def cosine(cls, T: int = 1000, *, max_beta: float = 0.999,
               rescale_zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Improved-DDPM cosine (diffusers ``"squaredcos_cap_v2"``, s = 0.008, betas capped
        at ``max_beta``; float64 formula stored as float32 like diffusers)."""
        T = _check_int("T", T, 1)
        mb = _check_real("max_beta", max_beta)
        if not 0 < mb <= 1:
            raise ValueError(f"max_beta must lie in (0, 1] (the cap on each beta), got {mb}")
        rescale = _check_bool("rescale_zero_terminal_snr", rescale_zero_terminal_snr)
        return cls._discrete("cosine", {"T": T, "max_beta": mb},
                             _diffusers_betas(T, 0.0, 0.0, "squaredcos_cap_v2", mb), rescale)

    @classmethod
    def from_betas(cls, betas, *, rescale_zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Discrete schedule from betas [T] (tensor, ndarray or list), each in (0, 1); the
        last may be exactly 1 (zero terminal SNR). float32 input is cumprod'ed in float32
        as diffusers does; anything else in float64."""
        rescale = _check_bool("rescale_zero_terminal_snr", rescale_zero_terminal_snr)
        b = _as_1d(betas, "betas")
        return cls._discrete("betas", {"dtype": str(b.dtype).replace("torch.", "")}, b, rescale)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, *,
                            rescale_zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Discrete schedule from alphas_cumprod [T], strictly decreasing in (0, 1); the last
        may be exactly 0 (zero terminal SNR). Values are kept as given (betas are derived)."""
        rescale = _check_bool("rescale_zero_terminal_snr", rescale_zero_terminal_snr)
        ac = _as_1d(alphas_cumprod, "alphas_cumprod")
        _validate_alphas_cumprod(ac)
        betas = 1 - torch.cat([ac[0:1], ac[1:] / ac[:-1]])
        params = {"dtype": str(ac.dtype).replace("torch.", "")}
        if rescale:
            return cls._discrete("alphas_cumprod", params, betas, True)
        return cls("alphas_cumprod", {**params, "rescale_zero_terminal_snr": False},
                   betas=betas, alphas_cumprod=ac)

    @classmethod
    def from_diffusers(cls, scheduler_or_config) -> "NoiseSchedule":
        """The schedule of a diffusers DDPM-family scheduler (DDIM, DDPM, PNDM, DPM-Solver,
        UniPC, Euler, ...): a scheduler instance, its ``.config`` or a plain dict. Reads
        ``num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        rescale_betas_zero_snr`` (diffusers' defaults for missing keys) and repeats
        diffusers' float32 arithmetic, so ``betas``/``alphas_cumprod`` equal the scheduler's.
        Exception: with zero SNR, Euler/DPM-Solver/UniPC store 2**-24 for alphas_cumprod[-1];
        this keeps the exact 0 (DDIM's value)."""
        cfg = scheduler_or_config
        if not isinstance(cfg, dict) and hasattr(cfg, "config"):
            cfg = cfg.config
        if not isinstance(cfg, dict):
            raise TypeError("from_diffusers expects a diffusers scheduler, its .config or a dict, "
                            f"got {type(scheduler_or_config).__name__}")
        if "beta_schedule" not in cfg and cfg.get("trained_betas") is None:
            raise ValueError("config has neither beta_schedule nor trained_betas: not a DDPM-type (VP) "
                             f"scheduler; keys: {sorted(cfg)}")
        T = _check_int("num_train_timesteps", cfg.get("num_train_timesteps", 1000), 1)
        sched = cfg.get("beta_schedule", "linear")
        bs = _check_real("beta_start", cfg.get("beta_start", 0.0001))
        be = _check_real("beta_end", cfg.get("beta_end", 0.02))
        rescale = _check_bool("rescale_betas_zero_snr", cfg.get("rescale_betas_zero_snr", False))
        trained = cfg.get("trained_betas")
        if trained is not None:
            betas = torch.tensor(trained, dtype=torch.float32)
            if betas.ndim != 1 or betas.numel() != T:
                raise ValueError(f"trained_betas must have shape [{T}], got {tuple(betas.shape)}")
            return cls._discrete("trained_betas", {"T": T}, betas, rescale)
        if sched not in _DIFFUSERS_BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {sched!r} is not supported; "
                             f"use one of {_DIFFUSERS_BETA_SCHEDULES}")
        kind = {"squaredcos_cap_v2": "cosine"}.get(sched, sched)
        if kind == "cosine":
            params = {"T": T, "max_beta": 0.999}
        else:
            params = {"T": T, "beta_start": bs, "beta_end": be}
        return cls._discrete(kind, params, _diffusers_betas(T, bs, be, sched), rescale)

    @classmethod
    def flow(cls, T: int = 1000, **options):
        """Flow matching / rectified flow, ``x_s = (1 - s) x0 + s eps`` (SD3, Flux), model
        time ``s * T``: a :class:`fastdiff.schedule_families.FlowSchedule`. Options are
        diffusers' FlowMatchEulerDiscreteScheduler config: ``shift``,
        ``use_dynamic_shifting`` (then pass ``mu`` to the sampler), ``time_shift_type``,
        ``base_shift``, ``max_shift``, ``base_image_seq_len``, ``max_image_seq_len``,
        ``shift_terminal``, ``invert_sigmas``, ``sigma_spacing`` ("karras",
        "exponential", "beta")."""
        from .schedule_families import FlowSchedule
        return FlowSchedule(T, **options)

    @classmethod
    def edm(cls, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
            sigma_schedule: str = "karras"):
        """EDM's variance-exploding schedule (Karras et al. 2022), model time
        ``0.25 log sigma``: a :class:`fastdiff.schedule_families.EDMSchedule`."""
        from .schedule_families import EDMSchedule
        return EDMSchedule(sigma_min, sigma_max, rho, sigma_schedule)

    @classmethod
    def vp_linear(cls, beta_0: float = 0.1, beta_1: float = 20.0, *,
                  t_eps: float = 1e-3) -> "NoiseSchedule":
        """Continuous VP-SDE with beta(t) = beta_0 + t (beta_1 - beta_0), t in [0, 1]:
        log alpha_t = -t^2 (beta_1 - beta_0) / 4 - t beta_0 / 2 (DPM-Solver 'linear').

        ``t_eps`` in (0, 0.5): the smallest time, where sampling ends and the lower end
        of training's uniform t (1e-3: DPM-Solver's default; score-SDE trains VP at 1e-5).
        """
        b0, b1 = _check_real("beta_0", beta_0), _check_real("beta_1", beta_1)
        if b0 < 0 or b1 <= 0:
            raise ValueError("vp_linear needs beta_0 >= 0 and beta_1 > 0 (alpha must decrease), "
                             f"got {b0}, {b1}")
        t_eps = _check_real("t_eps", t_eps)
        if not 0 < t_eps < 0.5:
            raise ValueError(f"vp_linear needs t_eps in (0, 0.5), got {t_eps}")
        params = {"beta_0": b0, "beta_1": b1}
        if t_eps != 1e-3:  # only when set: the default's dict (and saved models) stay as before
            params["t_eps"] = t_eps
        return cls("vp_linear", params)

    @classmethod
    def vp_cosine(cls, s: float = 0.008, t_max: float = 0.9946) -> "NoiseSchedule":
        """Continuous cosine schedule alpha_t = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2)
        (DPM-Solver 'cosine'). alpha_1 = 0, so sampling starts at ``t_max`` (DPM-Solver's
        T = 0.9946); ``cosine_t_max`` is where beta(t) reaches 999."""
        s = _check_real("s", s, positive=True)
        t_max = _check_real("t_max", t_max)
        if not 0 < t_max < 1:
            raise ValueError(f"vp_cosine needs t_max in (0, 1), got {t_max}")
        return cls("vp_cosine", {"s": s, "t_max": t_max})

    # -- description -------------------------------------------------------------------

    @property
    def continuous(self) -> bool:
        """True for vp_linear / vp_cosine (closed form in t in [0, 1])."""
        return self._continuous

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def params(self) -> dict:
        return dict(self._params)

    @property
    def T(self):
        """Number of training timesteps (int) for a discrete schedule, None if continuous."""
        return None if self._continuous else self._ac.numel()

    @property
    def betas(self) -> torch.Tensor:
        """float64 [T]."""
        return self._require_discrete("betas")._betas.clone()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """float64 [T] (alpha_t^2 of timestep index t)."""
        return self._require_discrete("alphas_cumprod")._ac.clone()

    @property
    def zero_terminal_snr(self) -> bool:
        """True if alphas_cumprod[-1] == 0 (alpha = 0 at the last timestep)."""
        return not self._continuous and bool(self._ac[-1] == 0)

    @property
    def t_max(self) -> float:
        """Default start of sampling in continuous time: 1 (0.9946 for vp_cosine)."""
        return self._params["t_max"] if self._kind == "vp_cosine" else 1.0

    @property
    def t_eps(self) -> float:
        """Default end of sampling in continuous time: 1/T (discrete), 1e-3 (DPM-Solver's
        default) or ``vp_linear``'s ``t_eps``."""
        return self._params.get("t_eps", 1e-3) if self._continuous else 1.0 / self.T

    @property
    def cosine_t_max(self) -> float:
        """vp_cosine only: DPM-Solver's ``cosine_t_max``, where beta(t) = 999."""
        if self._kind != "vp_cosine":
            raise ValueError(f"cosine_t_max is defined for vp_cosine only, this is {self._kind}")
        s = self._params["s"]
        return math.atan(999.0 * (1.0 + s) / math.pi) * 2.0 * (1.0 + s) / math.pi - s

    def _require_discrete(self, what):
        if self._continuous:
            raise ValueError(f"{what} needs a discrete schedule; {self._kind} is continuous")
        return self

    def __repr__(self):
        params = self._params if self._continuous else {"T": self.T, **self._params}
        return f"NoiseSchedule({self._kind}, " + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"

    def to_dict(self) -> dict:
        """JSON-safe dict; ``from_dict(to_dict())`` rebuilds the schedule bit for bit."""
        d = {"format": 1, "kind": self._kind, "continuous": self._continuous, "params": dict(self._params)}
        if not self._continuous:
            d["betas"] = self._betas.tolist()
            d["alphas_cumprod"] = self._ac.tolist()
        return d

    def to_recipe(self) -> dict:
        """Compact JSON-safe dict (no tables) when a constructor rebuilds this schedule bit
        for bit from its parameters (linear, scaled_linear, cosine, continuous); else
        ``to_dict()``. ``from_dict`` reads both."""
        d = {"format": 1, "kind": self._kind, "continuous": self._continuous,
             "params": dict(self._params)}
        if self._continuous or (self._kind in _RECIPES and self.from_dict(d) == self):
            return d
        return self.to_dict()

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        """Inverse of ``to_dict`` and ``to_recipe``; also reads the flat form
        ``{"kind": "linear", "T": ..., "beta_start": ..., ...}`` of earlier model.json files."""
        if not isinstance(d, dict):
            raise TypeError(f"from_dict expects a dict, got {type(d).__name__}")
        if d.get("kind") in _RECIPES and "params" not in d and "T" in d:
            d = {"kind": d["kind"], "continuous": False,
                 "params": {k: v for k, v in d.items() if k != "kind"}}
        if (not d.get("continuous") and d.get("kind") in _RECIPES and "params" in d
                and "betas" not in d):
            try:
                return getattr(cls, d["kind"])(**d.get("params", {}))
            except TypeError as e:
                raise ValueError(f"bad {d['kind']} schedule parameters {d.get('params')!r}: {e}") from None
        missing = {"kind", "continuous", "params"} - set(d)
        if missing:
            raise ValueError(f"schedule dict is missing keys {sorted(missing)}")
        params = dict(d["params"])
        if d["kind"] in ("flow", "edm"):
            from .schedule_families import EDMSchedule, FlowSchedule
            return (FlowSchedule if d["kind"] == "flow" else EDMSchedule).from_dict(d)
        if d["continuous"]:
            if d["kind"] == "vp_linear":
                return cls.vp_linear(params["beta_0"], params["beta_1"],
                                     t_eps=params.get("t_eps", 1e-3))
            if d["kind"] == "vp_cosine":
                return cls.vp_cosine(params["s"], params["t_max"])
            raise ValueError(f"unknown continuous schedule kind {d['kind']!r}")
        if "betas" not in d or "alphas_cumprod" not in d:
            raise ValueError("discrete schedule dict needs 'betas' and 'alphas_cumprod'")
        betas, ac = _as_1d(d["betas"], "betas"), _as_1d(d["alphas_cumprod"], "alphas_cumprod")
        if betas.numel() != ac.numel():
            raise ValueError(f"betas has {betas.numel()} entries but alphas_cumprod {ac.numel()}")
        _validate_betas(betas)
        _validate_alphas_cumprod(ac)
        return cls(str(d["kind"]), params, betas=betas, alphas_cumprod=ac)

    def __eq__(self, other):
        if not isinstance(other, NoiseSchedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    # -- native time -------------------------------------------------------------------

    def _native(self, t):
        """-> (alphas_cumprod or None, log alpha or None, device). Exactly one is set."""
        x, dev, is_int = _as_values(t, "t")
        if self._continuous:
            x = x.to(_F64)
            _check_range(x, 0.0, 1.0, "t (continuous time)")
            return None, self._cont_log_alpha(x), dev
        _check_range(x, 0, self.T - 1, "t (discrete timestep index)")
        if is_int:
            return self._ac[x], None, dev
        return None, self._interp_log_alpha(x, self._knots_idx), dev

    def alpha(self, t) -> torch.Tensor:
        """alpha_t (signal scale) at native time t (number or tensor); float64, t's shape."""
        ac, la, dev = self._native(t)
        return _out(ac.sqrt() if la is None else la.exp(), dev)

    def sigma(self, t) -> torch.Tensor:
        """sigma_t = sqrt(1 - alpha_t^2) (noise scale) at native time t; float64."""
        ac, la, dev = self._native(t)
        return _out((1 - ac).sqrt() if la is None else _std(la), dev)

    def lambda_(self, t) -> torch.Tensor:
        """Half log-SNR lambda_t = log(alpha_t / sigma_t) at native time t; float64
        (-inf at a zero-SNR end, +inf where sigma = 0)."""
        ac, la, dev = self._native(t)
        if la is None:
            return _out(0.5 * (torch.log(ac) - torch.log1p(-ac)), dev)
        return _out(_lambda(la), dev)

    def sigma_edm(self, t) -> torch.Tensor:
        """sigma_t / alpha_t, the k-diffusion / Euler / EDM noise level, at native time t."""
        ac, la, dev = self._native(t)
        if la is None:
            return _out(((1 - ac) / ac).sqrt(), dev)
        return _out(torch.exp(-_lambda(la)), dev)

    sigmas_karras_style = sigma_edm

    def d_alpha_dt(self, t) -> torch.Tensor:
        """d alpha_t / dt (closed form; continuous schedules only), per unit of t in [0, 1]."""
        x, dev = self._cont_time_checked(t, "d_alpha_dt")
        return _out(self._cont_log_alpha(x).exp() * self._cont_dlog_alpha(x), dev)

    def d_sigma_dt(self, t) -> torch.Tensor:
        """d sigma_t / dt = -(alpha_t / sigma_t) d alpha_t / dt (continuous only). Diverges
        (+inf) at t = 0, the singularity E-TSDM addresses (docs/etsdm.md)."""
        x, dev = self._cont_time_checked(t, "d_sigma_dt")
        la = self._cont_log_alpha(x)
        alpha, sigma = la.exp(), _std(la)
        return _out(-alpha * alpha * self._cont_dlog_alpha(x) / sigma, dev)

    def _cont_time_checked(self, t, what):
        if not self._continuous:
            raise NotImplementedError(f"{what} has a closed form for continuous schedules only; "
                                      "use finite differences of marginal_alpha for discrete ones")
        x, dev, _ = _as_values(t, "t")
        x = x.to(_F64)
        _check_range(x, 0.0, 1.0, "t (continuous time)")
        return x, dev

    def _cont_log_alpha(self, x):
        p = self._params
        if self._kind == "vp_linear":
            return -0.25 * x ** 2 * (p["beta_1"] - p["beta_0"]) - 0.5 * x * p["beta_0"]
        s = p["s"]
        la = torch.log(torch.cos((x + s) / (1.0 + s) * math.pi / 2.0)) - self._cos_log_alpha_0
        # torch.cos and math.cos may differ by an ulp: keep alpha <= 1 so sigma(0) is 0, not NaN.
        return la.clamp(max=0.0)

    def _cont_dlog_alpha(self, x):
        p = self._params
        if self._kind == "vp_linear":
            return -0.5 * x * (p["beta_1"] - p["beta_0"]) - 0.5 * p["beta_0"]
        s = p["s"]
        return -torch.tan((x + s) / (1.0 + s) * math.pi / 2.0) * (math.pi / (2.0 * (1.0 + s)))

    # -- DPM-Solver's continuous-time view -----------------------------------------------

    def t_to_cont(self, t) -> torch.Tensor:
        """Native time -> DPM-Solver continuous time: (t + 1) / T for discrete; identity else."""
        x, dev, _ = _as_values(t, "t")
        x = x.to(_F64)
        return _out(x if self._continuous else (x + 1) / self.T, dev)

    def cont_to_t(self, t_cont) -> torch.Tensor:
        """DPM-Solver continuous time -> native time (fractional timestep index for discrete;
        DPM-Solver's model input time ``(t_cont - 1/N) * 1000`` when T = 1000)."""
        x, dev, _ = _as_values(t_cont, "t_cont")
        x = x.to(_F64)
        return _out(x if self._continuous else x * self.T - 1, dev)

    def _interp_log_alpha(self, x, knots):
        la = self._log_alpha
        if not self.zero_terminal_snr:
            return _interp(x, knots, la)
        # log alpha_{T-1} = -inf: log-linear interpolation would give -inf/NaN on the whole
        # last segment, so there alpha itself goes linearly to 0 (finite and invertible).
        head = _interp(x, knots[:-1], la[:-1])
        w = (x - knots[-2]) / (knots[-1] - knots[-2])
        return torch.where(x > knots[-2], la[-2] + torch.log1p(-w), head)

    def _inverse_log_alpha(self, log_alpha, knots):
        la = self._log_alpha
        if not self.zero_terminal_snr:
            return _interp(log_alpha, la.flip(0), knots.flip(0))
        head = _interp(log_alpha, la[:-1].flip(0), knots[:-1].flip(0))
        w = -torch.expm1(log_alpha - la[-2])  # 1 - alpha / alpha_{T-2}
        return torch.where(log_alpha < la[-2], knots[-2] + w * (knots[-1] - knots[-2]), head)

    def marginal_log_mean_coeff(self, t_cont) -> torch.Tensor:
        """log alpha at continuous time t_cont (number or tensor); float64. Discrete
        schedules: piecewise linear through (i+1)/T, extended linearly past the ends."""
        x, dev, _ = _as_values(t_cont, "t_cont")
        x = x.to(_F64)
        la = self._cont_log_alpha(x) if self._continuous else self._interp_log_alpha(x, self._knots_cont)
        return _out(la, dev)

    def marginal_alpha(self, t_cont) -> torch.Tensor:
        """alpha at continuous time t_cont; float64."""
        return self.marginal_log_mean_coeff(t_cont).exp()

    def marginal_std(self, t_cont) -> torch.Tensor:
        """sigma at continuous time t_cont; float64."""
        return _std(self.marginal_log_mean_coeff(t_cont))

    def marginal_lambda(self, t_cont) -> torch.Tensor:
        """Half log-SNR lambda at continuous time t_cont; float64."""
        return _lambda(self.marginal_log_mean_coeff(t_cont))

    def inverse_lambda(self, lamb) -> torch.Tensor:
        """Continuous time t_cont with marginal_lambda(t_cont) = lamb (number or tensor);
        float64. For a discrete schedule ``cont_to_t`` turns it into a timestep index."""
        x, dev, _ = _as_values(lamb, "lamb")
        x = x.to(_F64)
        # log alpha = -log(1 + exp(-2 lambda)) / 2, written with logaddexp to avoid overflow.
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(x), -2.0 * x)
        if not self._continuous:
            return _out(self._inverse_log_alpha(log_alpha, self._knots_cont), dev)
        p = self._params
        if self._kind == "vp_linear":
            # DPM-Solver's tmp / (sqrt(Delta) + beta_0) / (beta_1 - beta_0) with the
            # (beta_1 - beta_0) factor cancelled, so constant beta needs no special case.
            two_l = -4.0 * log_alpha  # = 2 * logaddexp(-2 lambda, 0)
            delta = p["beta_0"] ** 2 + (p["beta_1"] - p["beta_0"]) * two_l
            return _out(two_l / (torch.sqrt(delta) + p["beta_0"]), dev)
        s = p["s"]
        t = torch.arccos(torch.exp(log_alpha + self._cos_log_alpha_0)) * 2.0 * (1.0 + s) / math.pi - s
        return _out(t, dev)

    # -- inference time grids ----------------------------------------------------------

    def timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 0,
                  flavor: str = "ddim") -> torch.Tensor:
        """Descending discrete timesteps [steps] exactly as diffusers' ``set_timesteps``; see
        ``diffusers_timesteps`` for ``flavor`` ("ddim", "dpmsolver", "euler") and dtypes."""
        self._require_discrete("timesteps")
        return diffusers_timesteps(self.T, steps, spacing, steps_offset, flavor)

    def _time_bounds(self, steps, t_start, t_end):
        steps = _check_int("steps", steps, 1)
        t_start = self.t_max if t_start is None else _check_real("t_start", t_start)
        t_end = self.t_eps if t_end is None else _check_real("t_end", t_end)
        for name, v in (("t_start", t_start), ("t_end", t_end)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must lie in (0, 1] (continuous time), got {v}")
        if t_start == t_end:
            raise ValueError(f"t_start and t_end must differ, both are {t_start}")
        return steps, t_start, t_end

    def time_uniform(self, steps: int, t_start=None, t_end=None) -> torch.Tensor:
        """steps + 1 continuous times, uniform in t from t_start (default ``t_max``) to t_end
        (default ``t_eps``); float64 [steps + 1]. DPM-Solver skip_type 'time_uniform'."""
        steps, t0, t1 = self._time_bounds(steps, t_start, t_end)
        return torch.linspace(t0, t1, steps + 1, dtype=_F64)

    def time_quadratic(self, steps: int, t_start=None, t_end=None) -> torch.Tensor:
        """steps + 1 continuous times uniform in sqrt(t) (denser near t_end); float64.
        DPM-Solver skip_type 'time_quadratic'."""
        steps, t0, t1 = self._time_bounds(steps, t_start, t_end)
        return torch.linspace(t0 ** 0.5, t1 ** 0.5, steps + 1, dtype=_F64).pow(2)

    def logSNR_uniform(self, steps: int, t_start=None, t_end=None) -> torch.Tensor:
        """steps + 1 continuous times uniform in lambda; float64. DPM-Solver 'logSNR'."""
        steps, t0, t1 = self._time_bounds(steps, t_start, t_end)
        l0, l1 = self.marginal_lambda(t0).item(), self.marginal_lambda(t1).item()
        if not (math.isfinite(l0) and math.isfinite(l1)):
            raise ValueError(f"logSNR spacing needs finite lambda at both ends, got lambda({t0}) = {l0}, "
                             f"lambda({t1}) = {l1}; move t_start below 1 for a zero-terminal-SNR schedule")
        return self.inverse_lambda(torch.linspace(l0, l1, steps + 1, dtype=_F64))

    # -- Karras / k-diffusion sigmas -----------------------------------------------------

    def _sigma_table(self, diffusers_compat):
        # A zero-SNR end gets alphas_cumprod = 2**-24, as in diffusers' sigma-based schedulers.
        ac = self._ac.to(torch.float32) if diffusers_compat else self._ac.clone()
        if self.zero_terminal_snr:
            ac[-1] = _ZERO_SNR_ALPHA_BAR
        return (((1 - ac) / ac) ** 0.5).numpy()

    def sigma_table(self, diffusers_compat: bool = True) -> torch.Tensor:
        """sigma_edm of every timestep index, float64 [T], as diffusers' Euler / DPM-Solver
        build ``sigmas``: in float32 arithmetic when ``diffusers_compat`` (exact for schedules
        made with diffusers' float32 betas), else in float64. A zero-SNR end is finite
        (alphas_cumprod[-1] taken as 2**-24, diffusers' choice)."""
        _check_bool("diffusers_compat", diffusers_compat)
        table = self._require_discrete("sigma_table")._sigma_table(diffusers_compat)
        return torch.from_numpy(table.astype(np.float64))

    def karras_sigmas(self, steps: int, sigma_min=None, sigma_max=None, rho: float = 7.0, *,
                      diffusers_compat: bool = True) -> torch.Tensor:
        """Karras et al. (EDM) noise levels, descending, float64 [steps] (diffusers appends a
        final 0 to ``scheduler.sigmas``; this does not). Same arithmetic as diffusers'
        ``_convert_to_karras``. Defaults: discrete schedules take the full sigma_edm table
        range [sigma_edm(0), sigma_edm(T-1)] like DPMSolverMultistep and Euler with
        "linspace" spacing (Euler with "leading"/"trailing" instead uses its spaced
        timesteps' range: ``tab = sigma_table(); sigma_min=tab[ts[-1]], sigma_max=tab[ts[0]]``);
        see ``sigma_table`` for ``diffusers_compat``.
        Continuous schedules take [sigma_edm(t_eps), sigma_edm(t_max)]."""
        steps = _check_int("steps", steps, 1)
        rho = _check_real("rho", rho, positive=True)
        _check_bool("diffusers_compat", diffusers_compat)
        if self._continuous:
            lo, hi = self.sigma_edm(self.t_eps).item(), self.sigma_edm(self.t_max).item()
        else:
            table = self._sigma_table(diffusers_compat)
            lo, hi = table[0].item(), table[-1].item()
        sigma_min = lo if sigma_min is None else _check_real("sigma_min", sigma_min, positive=True)
        sigma_max = hi if sigma_max is None else _check_real("sigma_max", sigma_max, positive=True)
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max must exceed sigma_min, got {sigma_max} <= {sigma_min}")
        ramp = np.linspace(0, 1, steps)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return torch.from_numpy((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)

    def sigma_to_t(self, sigmas, *, diffusers_compat: bool = True) -> torch.Tensor:
        """Fractional timestep index of each sigma_edm (number, ndarray or tensor, any shape),
        by linear interpolation of log sigma over the table, clamped to [0, T-1]: diffusers'
        ``_sigma_to_t``. float64, sigmas' shape. EulerDiscreteScheduler uses these values
        (as float32); DPMSolverMultistep rounds them (truncates for squaredcos_cap_v2)."""
        self._require_discrete("sigma_to_t")
        _check_bool("diffusers_compat", diffusers_compat)
        if self.T < 2:
            raise ValueError("sigma_to_t needs T >= 2 to interpolate")
        x, dev, _ = _as_values(sigmas, "sigmas")
        sigma = x.to(_F64).numpy()
        # Kept in diffusers' dtypes: float32 log table, float64 queries.
        log_sigmas = np.log(self._sigma_table(diffusers_compat))
        log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return _out(torch.from_numpy(t.reshape(sigma.shape).astype(np.float64)), dev)
