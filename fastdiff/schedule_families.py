"""Noise schedules beyond the VP family: flow matching (rectified flow) and EDM.

Each family has the interface the samplers ask of a schedule: ``kind``, ``T`` (the
number of training timesteps the model's time input is scaled by), ``alpha(t)``,
``sigma(t)``, ``lambda_(t)``, ``sigma_edm(t)`` at the model time t, and its own sampling
grids (:meth:`FlowSchedule.grid_sigmas`, :meth:`EDMSchedule.grid_sigmas`), which repeat
the matching diffusers schedulers' ``set_timesteps`` exactly.

* Flow matching: ``x_t = (1 - s) x0 + s eps``, alpha = 1 - s, sigma = s, the model time
  is ``s * T`` (diffusers' timestep convention) and the network predicts the velocity
  ``v = eps - x0`` (``prediction_type="flow_prediction"``).
* EDM (variance exploding): ``x = x0 + sigma eps``, alpha = 1, the model time is
  ``0.25 log sigma`` and the network output is preconditioned (c_in, c_skip, c_out).

Build them with ``NoiseSchedule.flow(...)`` / ``NoiseSchedule.edm(...)`` or from a
diffusers scheduler through ``Sampler.from_diffusers``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["FlowSchedule", "EDMSchedule", "spaced_sigmas", "time_shift", "SIGMA_SPACINGS"]

SIGMA_SPACINGS = ("karras", "exponential", "beta")
TIME_SHIFTS = ("exponential", "linear")
_F64 = torch.float64


def spaced_sigmas(kind: str, sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min, float64: "karras" (uniform in
    sigma^(1/rho)), "exponential" (uniform in log sigma) or "beta" (Beta(0.6, 0.6)
    quantiles, Lee et al. 2024), with diffusers' ``_convert_to_*`` arithmetic."""
    if kind == "karras":
        ramp = np.linspace(0, 1, n)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho
    if kind == "exponential":
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
    if kind == "beta":
        import scipy.stats  # lazy: only beta spacing needs scipy
        ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
        return sigma_min + ppf * (sigma_max - sigma_min)
    raise ValueError(f"sigma spacing must be one of {SIGMA_SPACINGS}, got {kind!r}")


def time_shift(s, shift: float):
    """The resolution shift of flow sigmas: ``shift s / (1 + (shift - 1) s)`` (SD3's
    ``shift``; Flux's dynamic shift ``exp(mu) / (exp(mu) + 1 / s - 1)`` is this with
    shift = exp(mu), the "linear" time shift with shift = mu)."""
    return shift * s / (1 + (shift - 1) * s)


def _values(t):
    if isinstance(t, torch.Tensor):
        return t.detach().to(_F64), t.device
    return torch.as_tensor(t, dtype=_F64), None


def _out(y, device):
    return y if device is None else y.to(device)


def _check_pos(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


class FlowSchedule:
    """Flow matching / rectified flow: ``x_s = (1 - s) x0 + s eps``, s in [0, 1].

    Native (model) time t = s * T, T = ``num_train_timesteps``. The grid options are
    diffusers' FlowMatchEulerDiscreteScheduler config (see ``NoiseSchedule.flow``).
    """

    kind = "flow"
    continuous = False

    def __init__(self, T: int = 1000, *, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 shift_terminal: float | None = None, invert_sigmas: bool = False,
                 sigma_spacing: str | None = None):
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"T (num_train_timesteps) must be an int >= 2, got {T!r}")
        _check_pos("shift", shift)
        if time_shift_type not in TIME_SHIFTS:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFTS}, got {time_shift_type!r}")
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1) or None, got {shift_terminal!r}")
        if sigma_spacing is not None and sigma_spacing not in SIGMA_SPACINGS:
            raise ValueError(f"sigma_spacing must be None or one of {SIGMA_SPACINGS}, got {sigma_spacing!r}")
        self._T = T
        self._params = dict(shift=float(shift), use_dynamic_shifting=bool(use_dynamic_shifting),
                            time_shift_type=time_shift_type, base_shift=float(base_shift),
                            max_shift=float(max_shift), base_image_seq_len=int(base_image_seq_len),
                            max_image_seq_len=int(max_image_seq_len), shift_terminal=shift_terminal,
                            invert_sigmas=bool(invert_sigmas), sigma_spacing=sigma_spacing)

    @property
    def T(self) -> int:
        return self._T

    @property
    def params(self) -> dict:
        return dict(self._params)

    def __repr__(self):
        return "NoiseSchedule(flow, " + ", ".join(f"{k}={v!r}" for k, v in {"T": self.T, **self._params}.items()) + ")"

    def to_dict(self) -> dict:
        return {"format": 1, "kind": "flow", "continuous": False, "params": {"T": self.T, **self._params}}

    @classmethod
    def from_dict(cls, d: dict) -> "FlowSchedule":
        params = dict(d["params"])
        return cls(params.pop("T"), **params)

    def __eq__(self, other):
        if not isinstance(other, FlowSchedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    # -- the path ---------------------------------------------------------------------

    def _s(self, t):
        x, dev = _values(t)
        if not bool(((x >= 0) & (x <= self.T)).all()):
            raise ValueError(f"t (flow model time) must lie in [0, {self.T}], got values in "
                             f"[{x.min().item():g}, {x.max().item():g}]")
        return x / self.T, dev

    def alpha(self, t) -> torch.Tensor:
        """1 - t / T at model time t; float64."""
        s, dev = self._s(t)
        return _out(1.0 - s, dev)

    def sigma(self, t) -> torch.Tensor:
        """t / T at model time t; float64."""
        s, dev = self._s(t)
        return _out(s, dev)

    def lambda_(self, t) -> torch.Tensor:
        """log(alpha / sigma); float64 (+inf at t = 0, -inf at t = T)."""
        s, dev = self._s(t)
        return _out(torch.log1p(-s) - torch.log(s), dev)

    def sigma_edm(self, t) -> torch.Tensor:
        """sigma / alpha = s / (1 - s); float64."""
        s, dev = self._s(t)
        return _out(s / (1.0 - s), dev)

    def mu_for(self, image_seq_len: int) -> float:
        """Flux's resolution-dependent shift exponent mu for a latent of ``image_seq_len``
        tokens (diffusers' ``calculate_shift``: linear from (base_image_seq_len,
        base_shift) to (max_image_seq_len, max_shift))."""
        p = self._params
        m = (p["max_shift"] - p["base_shift"]) / (p["max_image_seq_len"] - p["base_image_seq_len"])
        return image_seq_len * m + p["base_shift"] - m * p["base_image_seq_len"]

    # -- grids ------------------------------------------------------------------------

    def _shift_of(self, mu, required: bool, exponential_only: bool = False):
        p = self._params
        if not p["use_dynamic_shifting"]:
            if mu is not None and required:
                raise ValueError("mu is only used with use_dynamic_shifting=True")
            return p["shift"]
        if mu is None:
            if required:
                raise ValueError("use_dynamic_shifting=True needs mu (e.g. schedule.mu_for(image_seq_len))")
            return p["shift"]
        mu = float(mu)
        if p["time_shift_type"] == "linear":
            if exponential_only:
                raise ValueError("this sampler's dynamic shifting supports time_shift_type='exponential' only")
            return mu
        return math.exp(mu)

    def _stretch(self, s):
        st = self._params["shift_terminal"]
        if not st:
            return s
        one_minus = 1 - s
        return 1 - one_minus / (one_minus[-1] / (1 - st))

    def grid_sigmas(self, steps: int, variant: str = "match", mu: float | None = None,
                    karras=False, sigmas=None):
        """(model times [steps], flow sigmas [steps + 1]) of one run, float64, as the
        diffusers scheduler ``variant`` builds them: "match" (FlowMatchEuler/Heun:
        shifted endpoints, shifted again, optional terminal stretch and Karras /
        exponential / beta respacing, optional inversion), "dpm" (DPM-Solver with
        ``use_flow_sigmas``) or "unipc" (UniPC with ``use_flow_sigmas``). The last sigma
        is the final level (0, or 1 when ``invert_sigmas``). ``karras``: True or a
        respacing name overriding the schedule's ``sigma_spacing``. ``sigmas``: the
        unshifted sigmas to start from instead of the default spacing (diffusers'
        ``set_timesteps(sigmas=...)``, which Flux pipelines pass), [steps]."""
        if sigmas is not None:
            if variant == "dpm":
                raise ValueError("DPM-Solver's flow sigmas take no explicit sigmas (diffusers has none)")
            # FlowMatchEuler casts them to float32, UniPC keeps them as given
            sigmas = np.asarray(sigmas, dtype=np.float32 if variant == "match" else np.float64).astype(np.float64)
            if sigmas.ndim != 1 or not ((sigmas > 0) & (sigmas <= 1)).all():
                raise ValueError(f"sigmas must be a list of values in (0, 1], got {sigmas.tolist()}")
            if len(sigmas) != steps:
                raise ValueError(f"sigmas has {len(sigmas)} values but steps={steps}; pass steps={len(sigmas)}")
        p, T, N = self._params, self.T, steps
        if variant == "match":
            shift = self._shift_of(mu, required=True)
            # the training sigmas (float32, as diffusers stores them) give the endpoints
            train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
            if not p["use_dynamic_shifting"]:
                train = p["shift"] * train / (1 + (p["shift"] - 1) * train)
            hi, lo = train[0].item(), train[-1].item()
            s = np.linspace(hi * T, lo * T, N) / T if sigmas is None else sigmas
            s = self._stretch(time_shift(s, shift))
            spacing = ("karras" if karras is True else karras) if karras else p["sigma_spacing"]
            if spacing is not None:
                s = spaced_sigmas(spacing, s[-1].item(), s[0].item(), N)
            if p["invert_sigmas"]:
                s = 1.0 - s
            s = s.astype(np.float32)  # diffusers' float32 sigmas and model times
            t = (s * np.float32(T)).astype(np.float64)
            return t, np.append(s.astype(np.float64), 1.0 if p["invert_sigmas"] else 0.0)
        if karras or p["sigma_spacing"] is not None or p["invert_sigmas"]:
            raise ValueError(f"flow sigmas of the {variant!r} grid support no sigma respacing / inversion")
        if variant == "dpm":
            if p["shift_terminal"]:
                raise ValueError("shift_terminal is not an option of DPM-Solver's flow sigmas")
            shift = self._shift_of(mu, required=False, exponential_only=True)
            s = time_shift(1.0 - np.linspace(1, 1 / T, N + 1), shift)[::-1][:-1].copy()
        elif variant == "unipc":
            shift = self._shift_of(mu, required=True)
            s = np.linspace(1, 1 / T, N + 1)[:-1] if sigmas is None else sigmas
            s = self._stretch(time_shift(s, shift))
            if abs(s[0] - 1) < 1e-6:
                s[0] -= 1e-6  # diffusers: keeps log(alpha) finite at the first step
        else:
            raise ValueError(f"unknown flow grid variant {variant!r}")
        # int64 model times of the float64 sigmas; the update uses them rounded to float32,
        # as diffusers stores them (alpha = 1 - s near s = 1 is that sensitive)
        return np.trunc(s * T), np.append(s.astype(np.float32).astype(np.float64), 0.0)


class EDMSchedule:
    """EDM's variance-exploding schedule (Karras et al. 2022): ``x = x0 + sigma eps``,
    sigma in [sigma_min, sigma_max], spaced "karras" (rho) or "exponential". Native
    (model) time t = time_scale log sigma (EDM's c_noise: 0.25; diffusers' consistency
    models: 250). T: the consistency sampler's number of distillation timesteps."""

    kind = "edm"
    continuous = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_schedule: str = "karras", T: int = 1000, time_scale: float = 0.25):
        lo, hi = _check_pos("sigma_min", sigma_min), _check_pos("sigma_max", sigma_max)
        if hi <= lo:
            raise ValueError(f"sigma_max must exceed sigma_min, got {hi} <= {lo}")
        if sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"sigma_schedule must be 'karras' or 'exponential', got {sigma_schedule!r}")
        self._T = int(T)
        self._params = dict(sigma_min=lo, sigma_max=hi, rho=_check_pos("rho", rho),
                            sigma_schedule=sigma_schedule, time_scale=_check_pos("time_scale", time_scale))

    @property
    def T(self) -> int:
        return self._T

    @property
    def params(self) -> dict:
        return dict(self._params)

    def __repr__(self):
        return "NoiseSchedule(edm, " + ", ".join(f"{k}={v!r}" for k, v in self._params.items()) + ")"

    def to_dict(self) -> dict:
        return {"format": 1, "kind": "edm", "continuous": False, "params": {"T": self.T, **self._params}}

    @classmethod
    def from_dict(cls, d: dict) -> "EDMSchedule":
        return cls(**d["params"])

    def __eq__(self, other):
        if not isinstance(other, EDMSchedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    def sigma_edm(self, t) -> torch.Tensor:
        """sigma = exp(t / time_scale) at model time t; float64."""
        x, dev = _values(t)
        return _out(torch.exp(x / self._params["time_scale"]), dev)

    def alpha(self, t) -> torch.Tensor:
        """1 (variance exploding); float64, t's shape."""
        x, dev = _values(t)
        return _out(torch.ones_like(x), dev)

    sigma = sigma_edm

    def lambda_(self, t) -> torch.Tensor:
        """log(alpha / sigma) = -t / time_scale; float64."""
        x, dev = _values(t)
        return _out(-x / self._params["time_scale"], dev)

    def grid_sigmas(self, steps: int, float32_ramp: bool = False):
        """(model times [steps], sigmas [steps]) of one run as diffusers' EDM schedulers
        build them (``float32_ramp``: EDMDPMSolverMultistep's float32 Karras ramp). Model
        times are float32 ``time_scale log sigma`` of the float32 sigmas, as diffusers feeds them."""
        p = self._params
        lo, hi = p["sigma_min"], p["sigma_max"]
        if p["sigma_schedule"] == "karras":
            ramp = np.linspace(0, 1, steps)
            if float32_ramp:
                ramp = torch.linspace(0, 1, steps).double().numpy()
            s = (hi ** (1 / p["rho"]) + ramp * (lo ** (1 / p["rho"]) - hi ** (1 / p["rho"]))) ** p["rho"]
        else:
            s = torch.linspace(math.log(lo), math.log(hi), steps).exp().flip(0).double().numpy()
        s32 = torch.from_numpy(s).float()
        return (p["time_scale"] * torch.log(s32)).double().numpy(), s32.double().numpy()
