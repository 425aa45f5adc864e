"""What every sampler family shares: the plan of fused calls and the model-output conversion.

A sampler family is one function ``plan(grid, *, pred, clamp, **options) -> Plan`` that
does all its scalar math on the host in float64, once, before the loop: for each model
evaluation it records the model time, the model-input scale and one :class:`Op`, the
coefficients of the single ``fastdiff.step.fused_step`` call that consumes that model
output. The runtime (:class:`fastdiff.samplers.Sampler`) only replays the plan.

Tensors the plan refers to are named: ``"x"`` is the sampler state (what ``step`` takes
and returns); every other output gets a name (usually ``(kind, step)``), is kept while a
later op still reads it as history or ``x_base``, and dropped after its last reader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .._ops import STEP_HEAD
from ..step import StepCoeffs

__all__ = ["Op", "Call", "Plan", "Clamp", "Coeffs", "convert", "Terms", "PREDICTIONS", "EDMPrecond"]

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")


@dataclass(frozen=True)
class EDMPrecond:
    """EDM's preconditioned network (Karras et al. 2022) as a prediction type: the data
    estimate is ``x0 = c_skip x_ve + c_out F`` with x_ve = x / alpha the variance-exploding
    sample at level sk = sigma / alpha, ``c_skip = sd^2 / (sk^2 + sd^2)`` and
    ``c_out = +-sk sd / sqrt(sk^2 + sd^2)`` (sign -1 for diffusers' "v_prediction"),
    sd = ``sigma_data``. ``kind``: "epsilon" or "v_prediction" (diffusers' names).
    ``sigma_min`` > 0: consistency models' boundary condition, sk - sigma_min in place of
    sk in c_skip's denominator and c_out's numerator (x0 = x at sk = sigma_min)."""
    kind: str = "epsilon"
    sigma_data: float = 0.5
    sigma_min: float = 0.0

    def __post_init__(self):
        if self.kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"EDM preconditioning supports prediction_type 'epsilon' or 'v_prediction', "
                             f"got {self.kind!r}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")


class Clamp(NamedTuple):
    """Clamping of the data estimate x0: ``"clip"`` to [-value, value] (diffusers'
    clip_sample), or ``"dynamic"`` Imagen thresholding (per-sample ``ratio`` quantile of
    |x0|, clamped to [1, value], then clamp and divide by it)."""
    kind: str
    value: float
    ratio: float = 0.995


class Coeffs(StepCoeffs):
    """:class:`fastdiff.step.StepCoeffs` with the combinators the plans use."""

    def combo(self, o, comb, *, x=0.0, x_base=0.0, noise=0.0):
        """Output ``o`` = x*x + x_base*x_base + noise*noise + comb . [d, history...], with
        ``comb`` a [1 + n_history, R] array of :class:`Terms`."""
        comb = np.asarray(comb, dtype=np.float64)
        return self.out(o, x=x, x_base=x_base, noise=noise, d=comb[0], h=list(comb[1:]))

    def with_output(self, src: int, scale) -> "Coeffs":
        """A copy with one more output: ``scale`` ([R] array or float) times output ``src``."""
        c = Coeffs(self._data.shape[0], self.n_out + 1, self.n_history)
        nb, base = self.nb, self._data.shape[1]
        c._data[:, :base] = self._data
        lo = STEP_HEAD + src * nb
        c._data[:, base:base + nb] = self._data[:, lo:lo + nb] * np.reshape(scale, (-1, 1))
        return c

    def select_outputs(self, keep) -> "Coeffs":
        """A copy with only the outputs ``keep`` (indices, in the new order)."""
        c = Coeffs(self._data.shape[0], len(keep), self.n_history)
        c._data[:, :STEP_HEAD] = self._data[:, :STEP_HEAD]
        nb = self.nb
        for j, o in enumerate(keep):
            c._data[:, STEP_HEAD + j * nb:STEP_HEAD + (j + 1) * nb] = \
                self._data[:, STEP_HEAD + o * nb:STEP_HEAD + (o + 1) * nb]
        return c


@dataclass
class Op:
    """One fused call.

    coeffs: its coefficient matrix (see ``fastdiff._ops.step_ref``).
    history: names of the tensors passed as ``history`` (coefficient order).
    x_base: name of the tensor passed as ``x_base``, or None.
    outputs: names of the outputs; ``"x"`` is the new state, ``"x_in"`` the next model
        input (state times the next call's c_in), folded in so no separate pass scales it.
    keep_x: remember the input state under this name (a reference, not a copy).
    noise: the op takes a fresh standard-normal tensor.
    clamp: the op clamps the data estimate (clip or dynamic thresholding).
    brownian: (sa, sb) [R] each: the noise is the standardised increment of the plan's
        Brownian paths between these levels (see ``fastdiff.samplers.brownian``), not a
        fresh normal draw.
    """
    coeffs: Coeffs
    history: tuple = ()
    x_base: object = None
    outputs: tuple = ("x",)
    keep_x: object = None
    noise: bool = False
    clamp: bool = False
    brownian: tuple | None = None


@dataclass
class Call:
    """One model evaluation: model time t [R], input scale c_in [R] (None: the state
    itself is the model input) and the op that consumes the output."""
    t: np.ndarray
    op: Op
    c_in: np.ndarray | None = None


@dataclass
class Plan:
    """The whole run: ``calls`` in order; the state starts as ``x_T * init_scale``
    (None: x_T itself, VP samplers); ``sigma_space``: the state is x / alpha (k-diffusion
    convention, Euler family); ``brownian``: (lo [R], hi [R], seed or None), the range and
    seed of the Brownian paths that ops with ``brownian`` spans draw from; ``grid``: the
    grid the plan was built on when the family re-spaced the one it was given (singlestep
    DPM-Solver's grouped logSNR grid)."""
    calls: list
    init_scale: np.ndarray | None = None
    sigma_space: bool = False
    brownian: tuple | None = None
    grid: object = None


def data_eps(pred, a, s):
    """Coefficients of the data and noise estimates from a model output m at a point
    x = a x0 + s eps (VP, flow or VE): ``x0 = px x + pm m``, ``eps = ex x + em m``.

    "flow_prediction" is the velocity v = eps - x0 (rectified flow, diffusers' name);
    then x0 = (x - s v) / (a + s), eps = (x + a v) / (a + s), i.e. x - s v and x + a v on
    the flow path a = 1 - s. An :class:`EDMPrecond` reads the preconditioned output."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if isinstance(pred, EDMPrecond):
            sk, sd = s / a, pred.sigma_data
            off = sk - pred.sigma_min
            c_skip = sd * sd / (off * off + sd * sd)
            c_out = (1.0 if pred.kind == "epsilon" else -1.0) * off * sd / np.sqrt(sk * sk + sd * sd)
            px, pm = c_skip / a, c_out + 0.0 * a
            return (px, pm), ((1.0 - a * px) / s, -a * pm / s)
        if pred == "flow_prediction":
            n = a + s
            return (1.0 / n, -s / n), (1.0 / n, a / n)
        if pred == "epsilon":
            return (1.0 / a, -s / a), (0.0 * a, 1.0 + 0.0 * a)
        if pred == "v_prediction":
            return (a, -s), (s, a)
        if pred == "sample":
            return (0.0 * a, 1.0 + 0.0 * a), (1.0 / s, -a / s)
    raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {pred!r}")


def convert(c: Coeffs, pred: str, a, s, *, scale=1.0, x=0.0, x0=0.0, eps=0.0,
            clamp: Clamp | None = None) -> bool:
    """Set the model-output conversion of ``c``: ``d = x*state + x0*X0 + eps*EPS``.

    X0 and EPS are the data and noise estimates at the VP point (a, s), X0 clamped when
    ``clamp`` is given (EPS stays the unclamped one, as in diffusers' DDIM). ``scale``:
    the VP sample is ``scale * state`` (1 for VP samplers, alpha for sigma-space ones).
    Returns whether the op must clamp.
    """
    (px, pm), (ex, em) = data_eps(pred, a, s)
    px, ex = px * scale, ex * scale
    wx, wm = x + eps * ex, eps * em
    if clamp is None:
        c.convert(p_x=px, p_m=pm, w_x=wx + x0 * px, w_m=wm + x0 * pm)
        return False
    limit = clamp.value if clamp.kind == "clip" else 1.0  # dynamic: set per step on device
    c.convert(p_x=px, p_m=pm, s=limit, s_div=1.0, w_x=wx, w_m=wm, w_c=x0)
    return True


class Terms:
    """Linear combinations of the model-output terms of one op, ``[d, h_0, ..., h_{H-1}]``
    (d the converted output of this step, h_k the history tensors), as [1 + H, 1] arrays
    that broadcast with per-row scalars [R]: ``D1 = (t.d - t.h(0)) / r0``."""

    def __init__(self, n_history: int):
        self.K = 1 + n_history

    def _unit(self, j):
        e = np.zeros((self.K, 1))
        e[j] = 1.0
        return e

    @property
    def d(self):
        return self._unit(0)

    def h(self, k):
        return self._unit(1 + k)

    @property
    def zero(self):
        return np.zeros((self.K, 1))
