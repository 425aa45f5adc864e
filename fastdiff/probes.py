"""Lipschitz probes: how fast a diffusion network's output moves with its inputs.

* :func:`lipschitz_t` measures ``K(t) = || d eps_theta(x_t, t) / dt ||_2`` with x_t held
  fixed (docs/etsdm.md, the quantity E-TSDM drives to zero near t = 0), for many
  (sample, timestep) pairs flattened into one large batch per model call.
* :func:`lipschitz_x` measures the spectral norm of ``d eps_theta(x, t) / dx`` per sample
  by batched power iteration.

Both treat the model as *per-sample independent*: row i of the output depends only on
row i of the inputs (GroupNorm / LayerNorm / attention within a sample are fine;
BatchNorm in training mode or any cross-sample op is not). That is what lets one batched
Jacobian-vector product give every sample's own derivative.

Autodiff details (all scoped to a probe call, nothing stays changed):

* torch's fused attention kernels (CPU flash attention, CUDA flash / memory-efficient)
  have neither a forward-AD formula nor a double-backward, so the derivative methods run
  ``scaled_dot_product_attention`` on its math backend (the same attention written in
  differentiable ops), except where "jvp" uses the fused rule below.
* The "jvp" method reroutes ``conv2d``, ``linear`` and ``group_norm`` (when only their
  input carries a tangent, as in every probe) to rules that read the tangent off the dual
  input and return output and tangent together (``fastdiff._dual``), so the primal is
  computed once, as in a plain forward pass: conv2d and linear add one product with the
  weight (torch's conv rule also convolves a materialised zero weight tangent, and its
  linear rule on [B, L, C] tokens multiplies by the weight expanded to a batch);
  group_norm adds ``fastdiff::group_norm_tangent``, two passes over the input and its
  tangent from the mean and rstd the primal's kernel returns (torch's rule is ~30
  elementwise ops, about 30x the norm itself, and fails on channels-last input, "view
  size is not compatible", which diffusers' attention blocks produce).
* The "jvp" method also reroutes unmasked ``scaled_dot_product_attention`` (diffusers'
  ``AttnProcessor2_0``) to :func:`fastdiff.attention.scaled_dot_product_attention`: one
  ``fastdiff::sdpa_jvp`` call forms the output and its tangent in one pass over key
  blocks, instead of the math backend's materialised attention matrix and its tangent.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _dual, _ops, attention
from ._files import atomic_write_text
from .schedules import NoiseSchedule, TimeSharing
from .wrappers import ETSDM, model_output

__all__ = ["lipschitz_t", "lipschitz_x", "LipschitzResult", "METHODS"]

METHODS = ("auto", "jvp", "fd", "vjp")
_STATS = ("mean", "median", "max", "min")
_PLOT_GID = "fastdiff.LipschitzResult"  # marks the curves plot() drew on an Axes
_DEFAULT_BATCH = 128  # (sample, t) pairs per model call: large enough to keep a CPU busy


# ---------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------

@dataclass
class LipschitzResult:
    """K(t) for every probed timestep and sample.

    Attributes:
        timesteps: [K] float64, schedule units (integer steps for discrete schedules).
        values: [K, B] float64, ``|| d eps / dt ||_2`` per timestep and sample, per unit of t.
        method: the method that produced the values ("jvp", "vjp" or "fd").
        meta: JSON-safe description (schedule, time sharing, requested method, ...).
    """

    timesteps: torch.Tensor
    values: torch.Tensor
    method: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.float64).reshape(-1)
        self.values = torch.as_tensor(self.values, dtype=torch.float64)
        if self.values.dim() != 2 or self.values.shape[0] != self.timesteps.shape[0]:
            raise ValueError(f"LipschitzResult: values must have shape [K={self.timesteps.shape[0]}, B], "
                             f"got {tuple(self.values.shape)}")

    # -- per-timestep summaries, each [K] ----------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        return self.values.mean(1)

    @property
    def median(self) -> torch.Tensor:
        return self.values.quantile(0.5, dim=1)

    @property
    def max(self) -> torch.Tensor:
        return self.values.amax(1)

    @property
    def min(self) -> torch.Tensor:
        return self.values.amin(1)

    def quantile(self, q: float) -> torch.Tensor:
        """[K] per-timestep q-quantile over samples."""
        return self.values.quantile(float(q), dim=1)

    # -- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe dict (raw values plus the summaries, for readers without fastdiff)."""
        return {"format": 1, "method": self.method, "meta": self.meta,
                "timesteps": self.timesteps.tolist(), "values": self.values.tolist(),
                **{s: getattr(self, s).tolist() for s in _STATS}}

    @classmethod
    def from_dict(cls, d: dict) -> "LipschitzResult":
        if not isinstance(d, dict) or not {"timesteps", "values", "method"} <= set(d):
            raise ValueError("LipschitzResult.from_dict: expected a dict with keys "
                             "'timesteps', 'values', 'method'")
        return cls(torch.tensor(d["timesteps"], dtype=torch.float64),
                   torch.tensor(d["values"], dtype=torch.float64).reshape(len(d["timesteps"]), -1),
                   str(d["method"]), dict(d.get("meta", {})))

    def to_json(self, path) -> str:
        """Write :meth:`to_dict` as JSON (atomically). Returns ``path``."""
        return atomic_write_text(json.dumps(self.to_dict()), path)

    @classmethod
    def from_json(cls, path) -> "LipschitzResult":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_csv(self, path) -> str:
        """One row per timestep: ``t, mean, median, max, min, k_0 .. k_{B-1}`` (atomic)."""
        B = self.values.shape[1]
        head = ["t", *_STATS] + [f"k_{b}" for b in range(B)]
        cols = torch.cat([self.timesteps[:, None]] + [getattr(self, s)[:, None] for s in _STATS]
                         + [self.values], dim=1)
        lines = [",".join(head)] + [",".join(repr(v) for v in row) for row in cols.tolist()]
        return atomic_write_text("\n".join(lines) + "\n", path)

    # -- plot ----------------------------------------------------------------------------
    def plot(self, ax=None, label: str | None = None, stat: str = "mean",
             band: str | None = "quartiles"):
        """Add K(t) against t to ``ax`` on a log y-axis, like Fig. 1b of Yang et al.

        Overlaying results is one call each: ``ax = a.plot(label="baseline");
        b.plot(ax=ax, label="E-TSDM"); ax.figure.savefig("k.png")`` (with ``ax=None`` the
        curves go to pyplot's current axes, as ``plt.plot`` does).

        Args:
            ax: a matplotlib Axes; None: ``plt.gca()`` (a new figure if there is none).
            label: legend entry (default: the method).
            stat: the curve, one of "mean", "median", "max", "min".
            band: shaded spread over samples: "quartiles", "minmax" or None.

        Every call refreshes the legend; a figure without a layout engine gets the
        constrained one, so labels and legend are not clipped. Exact zeros (E-TSDM's
        shared sub-intervals probed by jvp) have no place on a log axis: once any curve
        of ``ax`` has one, the y-axis is symlog, linear from 0 up to a decade below the
        smallest nonzero value drawn, and the zeros sit on its 0 line (the y-label
        says so). Returns ``ax``.
        """
        if stat not in _STATS:
            raise ValueError(f"plot: stat must be one of {_STATS}, got {stat!r}")
        if band not in ("quartiles", "minmax", None):
            raise ValueError(f"plot: band must be 'quartiles', 'minmax' or None, got {band!r}")
        if ax is None:
            import matplotlib.pyplot as plt
            ax = plt.gca()
        fig = ax.figure.figure  # the root figure, also for an Axes in a SubFigure
        if fig.get_layout_engine() is None:
            fig.set_layout_engine("constrained")
        ax.autoscale(True, axis="y")  # an earlier call's zero floor fixed the limits
        order = torch.argsort(self.timesteps)
        t = self.timesteps[order].numpy()
        y = getattr(self, stat)[order]
        lo = hi = None
        if band is not None:
            lo, hi = ((self.quantile(0.25), self.quantile(0.75)) if band == "quartiles"
                      else (self.min, self.max))
            lo, hi = lo[order], hi[order]
        (line,) = ax.plot(t, y.numpy(), marker="." if len(t) <= 400 else None, markersize=3,
                          label=label if label is not None else self.method, gid=_PLOT_GID)
        if band is not None:
            ax.fill_between(t, lo.numpy(), hi.numpy(), color=line.get_color(), alpha=0.2,
                            linewidth=0)
        drawn = [torch.as_tensor(ln.get_ydata(), dtype=torch.float64) for ln in ax.get_lines()
                 if ln.get_gid() == _PLOT_GID]  # not the user's own lines (axvline: 0..1)
        drawn += [lo] if lo is not None else []
        values = torch.cat([d.reshape(-1) for d in drawn])
        values = values[torch.isfinite(values)]
        ylabel = r"$\|\partial \epsilon_\theta(x_t, t) / \partial t\|_2$"
        if ax.get_yscale() == "symlog" or bool((values == 0).any()):
            pos = values[values > 0]
            thresh = 10.0 ** math.floor(math.log10(pos.min().item())) if pos.numel() else 1.0
            ax.set_yscale("symlog", linthresh=thresh, linscale=0.5)
            # a little room below 0, so zeros are not hidden by the axis line
            ax.set_ylim(bottom=-0.3 * thresh, top=None if pos.numel() else 10 * thresh)
            # (top=None: autoscaled over every curve and band of ax)
            ylabel += f"\n(symlog: linear below {thresh:.0e}; exact zeros on the 0 line)"
        else:
            ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        return ax


# ---------------------------------------------------------------------------------------
# autodiff plumbing shared by both probes
# ---------------------------------------------------------------------------------------

def _math_attention():
    """SDPA on its math backend: the fused kernels have no forward-AD / double-backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def _bind(args, kwargs, names, defaults):
    vals = dict(zip(names, defaults))
    vals.update(zip(names, args))
    vals.update(kwargs)
    return [vals[n] for n in names]


# The probe's forward-AD rules: each gets the primal input and its tangent (weights and
# biases are constants) and returns (output, output tangent), which _FastJvpRules joins
# into one dual; the primal is computed once, as in a plain forward pass.

def _conv2d_jvp(x, dx, weight, bias, stride, padding, dilation, groups):
    """conv2d and its tangent conv2d(dx, W): torch's rule also convolves a materialised
    zero weight tangent (3 convolutions instead of 2)."""
    return (F.conv2d(x, weight, bias, stride, padding, dilation, groups),
            F.conv2d(dx, weight, None, stride, padding, dilation, groups))


def _linear_jvp(x, dx, weight, bias):
    """linear and its tangent dx W^T as one matrix product: torch's rule, and F.linear on
    a [B, L, C] tangent that is not foldable in place (diffusers' transposed tokens),
    multiply by the weight expanded to a batch instead."""
    d = dx.reshape(-1, dx.shape[-1]) @ weight.t()
    return F.linear(x, weight, bias), d.reshape(*dx.shape[:-1], weight.shape[0])


def _group_norm_jvp(x, dx, groups, weight, bias, eps):
    """group_norm and its tangent. The primal's kernel also returns the per-group mean and
    rstd, from which ``fastdiff::group_norm_tangent`` forms the tangent in two passes
    over x and dx. torch's own rule builds it from ~30 elementwise ops (about 30x the norm
    itself, each allocating a full-size tensor) and fails on channels-last input ("view
    size is not compatible"), which diffusers' attention blocks produce."""
    N, C = x.shape[0], x.shape[1]
    HxW = x.numel() // (N * C) if N * C else 0
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    xk = x if cl or x.is_contiguous() else x.contiguous()
    out, mean, rstd = torch.native_group_norm(xk, weight, bias, N, C, HxW, groups, eps)
    if _dual.nested_derivatives():  # the kernel has no derivative; the reference's torch ops do
        return out, _ops.group_norm_tangent_ref(xk, dx, mean, rstd, weight, groups)
    return out, _ops.call("group_norm_tangent", xk, dx, mean, rstd, weight, groups)


def _group_norm_valid(x, groups) -> bool:
    """Groups that divide the channels of a non-empty x (anything else goes to
    F.group_norm, which raises its own error)."""
    return isinstance(groups, int) and groups > 0 and x.shape[1] % groups == 0 and x.numel() > 0


_CONV2D = (("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
           (None, None, None, 1, 0, 1, 1))
_GROUP_NORM = (("input", "num_groups", "weight", "bias", "eps"), (None, None, None, None, 1e-5))
_LINEAR = (("input", "weight", "bias"), (None, None, None))
# torch function -> (argument names and defaults, rule, index of the parameters)
_RULES = {F.conv2d: (_CONV2D, _conv2d_jvp, (1, 2)),
          F.linear: (_LINEAR, _linear_jvp, (1, 2)),
          F.group_norm: (_GROUP_NORM, _group_norm_jvp, (2, 3))}


class _FastJvpRules(TorchFunctionMode):
    """Routes conv2d / linear / group_norm calls whose input carries a tangent and whose
    parameters carry none to the rules above, and unmasked attention to the fused rule of
    :mod:`fastdiff.attention`; everything else (and any call with a tangent on a
    parameter) runs as is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            spec, fn, params = rule
            vals = _bind(args, kwargs, *spec)
            x, dx = _dual.split(vals[0])
            if (dx is not None and x.dim() >= 2
                    and not any(_dual.has_tangent(vals[i]) for i in params)
                    and (fn is not _group_norm_jvp or _group_norm_valid(x, vals[1]))):
                return _dual.join(*fn(x, dx, *vals[1:]))
        elif func is F.scaled_dot_product_attention:
            q, k, v, mask, p, causal, scale, gqa = _bind(args, kwargs, *attention._SDPA_ARGS)
            if not _dual.has_tangent(mask) and attention.fused_jvp_applies(q, k, v, mask, p,
                                                                            causal, gqa):
                return attention.scaled_dot_product_attention(q, k, v, scale=scale)
        return func(*args, **kwargs)


def _jvp(fn, primal: torch.Tensor, tangent: torch.Tensor, method: str):
    """``(fn(primal), J tangent)`` with J = d fn / d primal.

    "jvp": forward-mode AD. "vjp": the double-backward trick: g(u) = J^T u is linear in
    u, so d/du <tangent, g(u)> = J tangent; needs only reverse-mode formulas (and their
    derivatives), for models with ops that have no forward-AD rule.
    """
    if method == "jvp":
        # forward AD ignores grad mode; no_grad skips recording the parameters' graph
        with torch.no_grad(), _FastJvpRules():
            return torch.func.jvp(fn, (primal,), (tangent,))
    with torch.enable_grad():
        p = primal.detach().requires_grad_()
        out = fn(p)
        u = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, p, u, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:  # output does not depend on the primal
            return out.detach(), torch.zeros_like(out)
        (jv,) = torch.autograd.grad(g, u, tangent, allow_unused=True)
    return out.detach(), torch.zeros_like(out) if jv is None else jv


def _jvp_resolving(fn, primal, tangent, method: str, where: str):
    """``(J tangent, method used)``; "auto" tries forward AD first and falls back to "vjp"
    (with one warning) when an op has no forward-AD rule."""
    if method == "auto":
        try:
            return _jvp(fn, primal, tangent, "jvp")[1], "jvp"
        except (NotImplementedError, RuntimeError) as e:
            if not _missing_forward_rule(e):
                raise
            _fallback_warning(e, where)
            method = "vjp"
    return _jvp(fn, primal, tangent, method)[1], method


_MISSING_RULE_HINTS = ("forward ad", "forward-mode", "forward mode", "jvp", "setup_context",
                       "functorch")


def _missing_forward_rule(err: Exception) -> bool:
    if isinstance(err, NotImplementedError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and any(h in msg for h in _MISSING_RULE_HINTS)


def _fallback_warning(err: Exception, where: str):
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    warnings.warn(f"{where}: forward-mode AD is not available for this model ({first}); "
                  "falling back to method='vjp' (double backward, slower)",
                  RuntimeWarning, stacklevel=3)


def _per_sample_kwargs(model_kwargs, B: int):
    """Split kwargs into per-sample tensors (first dim B: they follow their sample) and
    shared ones (passed unchanged)."""
    if model_kwargs is None:
        return {}, {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    rows = {k: v for k, v in model_kwargs.items()
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B}
    return rows, {k: v for k, v in model_kwargs.items() if k not in rows}


def _warn_if_training(model, where):
    if isinstance(model, nn.Module) and model.training:
        warnings.warn(f"{where}: the model is in training mode (dropout / batch statistics "
                      "active); call model.eval() for a deterministic probe", RuntimeWarning,
                      stacklevel=3)


def _check_sample_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [B, ...], got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [B, ...] with B >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")


# ---------------------------------------------------------------------------------------
# Lipschitz constant in t
# ---------------------------------------------------------------------------------------

def _as_schedule(schedule) -> NoiseSchedule:
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if hasattr(schedule, "config"):  # a diffusers scheduler
        return NoiseSchedule.from_diffusers(schedule)
    raise TypeError("schedule must be a fastdiff NoiseSchedule or a diffusers scheduler, "
                    f"got {type(schedule).__name__}")


def _check_timesteps(timesteps, sched: NoiseSchedule) -> torch.Tensor:
    if isinstance(timesteps, torch.Tensor):
        if timesteps.dtype == torch.bool or timesteps.is_complex():
            raise TypeError(f"timesteps must be real numbers, got {timesteps.dtype}")
        ts = timesteps.detach().to("cpu", torch.float64).reshape(-1)
    else:
        try:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"timesteps must be a 1-D tensor or sequence of numbers: {e}") from None
    if ts.numel() == 0:
        raise ValueError("timesteps is empty; expected [K] timesteps with K >= 1")
    hi = 1.0 if sched.continuous else float(sched.T - 1)
    unit = "continuous time" if sched.continuous else f"timestep index of T={sched.T}"
    if not torch.isfinite(ts).all() or ts.min() < 0 or ts.max() > hi:
        raise ValueError(f"timesteps must lie in the schedule's range [0, {hi:g}] ({unit}), "
                         f"got values in [{ts.min().item():g}, {ts.max().item():g}]")
    if not sched.continuous and sched.T < 2:
        raise ValueError("a discrete schedule needs T >= 2 for a derivative in t")
    return ts


def _fd_partner(ts: torch.Tensor, sched: NoiseSchedule) -> torch.Tensor:
    """t' for the finite difference: t + 1 for discrete schedules (t - 1 at T - 1); the
    next larger probed timestep for continuous ones (the last one steps by its gap to the
    previous one, backwards if that leaves [0, 1])."""
    if not sched.continuous:
        up = ts + 1
        return torch.where(up <= sched.T - 1, up, ts - 1)
    grid = torch.unique(ts)  # sorted
    if grid.numel() == 1:
        h = torch.tensor(1e-3, dtype=torch.float64)
        nxt = grid + h
    else:
        h = grid[-1] - grid[-2]
        nxt = torch.cat([grid[1:], (grid[-1] + h)[None]])
    nxt = torch.where(nxt <= 1.0, nxt, grid - h)
    return nxt[torch.searchsorted(grid, ts)]


def _schedule_time(ts: torch.Tensor, sched: NoiseSchedule) -> torch.Tensor:
    # Integer steps read the discrete table exactly instead of interpolating it.
    if not sched.continuous and torch.equal(ts, ts.round()):
        return ts.long()
    return ts


def lipschitz_t(model, x0: torch.Tensor, schedule, timesteps, *, method: str = "auto",
                noise: torch.Tensor | None = None, batch_size: int | None = None,
                time_sharing: TimeSharing | None = None,
                generator: torch.Generator | None = None, progress: bool = True,
                model_kwargs: dict | None = None, distributed: bool | None = None) -> LipschitzResult:
    """Lipschitz constant of ``eps_theta`` in its time input: K(t) per timestep and sample.

    For each timestep t and sample b, ``x_t = alpha_t x0[b] + sigma_t noise[b]`` is held
    fixed and ``K = || d eps_theta(x_t, t) / dt ||_2`` (per unit of t) is measured.

    Args:
        model: ``model(x, t, **model_kwargs)`` -> eps [B, ...] (a tensor, or a diffusers
            output with ``.sample``). Must be per-sample independent (see module doc).
        x0: [B, ...] clean samples.
        schedule: a :class:`fastdiff.schedules.NoiseSchedule` (or a diffusers scheduler).
        timesteps: [K] in the schedule's units: integer steps in [0, T-1] for discrete
            schedules (passed to the model as float tensors so they are differentiable),
            [0, 1] for continuous ones.
        method: "jvp" (exact derivative, forward-mode AD), "vjp" (exact, double backward),
            "fd" (the paper's finite difference ``||eps(x_t, t) - eps(x_t, t')|| / |t - t'|``
            with t' = t + 1 for discrete schedules, the next probed timestep for continuous
            ones) or "auto" (jvp; vjp when the model has an op without a forward-AD rule).
            jvp and vjp need the model to use t as a float: a model that rounds t or looks
            it up in a table has derivative 0 there (use fd).
        noise: [B, ...] like x0, the same for every t; drawn from ``generator`` if None.
        batch_size: (sample, t) pairs per model call (fd calls the model on twice as many
            rows); default 128.
        time_sharing: a :class:`fastdiff.TimeSharing`: the model is called with f(t) (via
            :func:`fastdiff.etsdm`); its exact derivative is 0 inside shared sub-intervals.
        generator: for the noise.
        progress: tqdm bar over chunks.
        distributed: split the work over the ranks of the initialized torch.distributed
            process group (None: when there is one with more than one rank). Every rank
            must call with the same arguments (and the same ``noise``, or the same
            ``generator`` state); the chunks of (timestep, sample) pairs are dealt
            round-robin, each rank computes its own, and every rank gets the whole result,
            bit-identical to one process's.
        model_kwargs: extra model arguments; tensors whose first dim is B are per-sample
            (e.g. ``class_labels``) and follow their sample, anything else is shared.

    Returns:
        :class:`LipschitzResult` with ``values`` [K, B] (float64).
    """
    if method not in METHODS:
        raise ValueError(f"lipschitz_t: method must be one of {METHODS}, got {method!r}")
    if not callable(model):
        raise TypeError(f"lipschitz_t: model must be callable, got {type(model).__name__}")
    _check_sample_tensor(x0, "x0")
    if noise is not None:
        _check_sample_tensor(noise, "noise")
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if time_sharing is not None and not isinstance(time_sharing, TimeSharing):
        raise TypeError(f"time_sharing must be a fastdiff.TimeSharing or None, "
                        f"got {type(time_sharing).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    sched = _as_schedule(schedule)
    ts = _check_timesteps(timesteps, sched)
    _warn_if_training(model, "lipschitz_t")

    dev, dtype = x0.device, x0.dtype
    tdtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=dtype)
    noise = noise.to(dev, dtype)
    st = _schedule_time(ts, sched)
    alpha = sched.alpha(st).to(dev, dtype)
    sigma = sched.sigma(st).to(dev, dtype)
    partner = _fd_partner(ts, sched) if method == "fd" else None

    net = ETSDM(model, time_sharing) if time_sharing is not None else model
    B, K = x0.shape[0], ts.numel()
    rows_kw, shared_kw = _per_sample_kwargs(model_kwargs, B)
    bcast = (-1,) + (1,) * (x0.dim() - 1)

    def eps(x, t, b):
        kw = {**shared_kw, **{k: v[b.to(v.device)] for k, v in rows_kw.items()}}
        out = model_output(net(x, t, **kw))
        if out.dim() < 1 or out.shape[0] != x.shape[0]:
            # a batch-1 output would broadcast one value to every (t, sample)
            raise ValueError(f"lipschitz_t: the model returned shape {tuple(out.shape)} for "
                             f"{x.shape[0]} input rows; it must return one row per row of x")
        return out

    N = K * B
    chunk = batch_size or _DEFAULT_BATCH
    used = method
    from tqdm.auto import tqdm
    bar = tqdm(range(0, N, chunk), desc=f"lipschitz_t ({method})", disable=not progress,
               unit="chunk", leave=False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    from . import distributed as dist
    shard = dist.world_size() > 1 if distributed is None else bool(distributed)
    starts = list(range(0, N, chunk))
    if shard:  # the same chunks as one process, dealt to the ranks: the same bits
        starts = starts[dist.rank()::dist.world_size()]
        bar = tqdm(starts, desc=f"lipschitz_t ({method})", disable=not progress or dist.rank() != 0,
                   unit="chunk", leave=False)
    # filled on the device (no sync per chunk); zeros where other ranks' chunks go
    values = (torch.zeros if shard else torch.empty)(N, dtype=acc, device=dev)
    # fd differentiates nothing: it runs the model exactly as given.
    with contextlib.nullcontext() if method == "fd" else _math_attention():
        # Flat index i = k * B + b: timestep k, sample b.
        for start in bar:
            idx = torch.arange(start, min(start + chunk, N))
            k, b = idx // B, idx % B
            kd, bd = k.to(dev), b.to(dev)
            x = alpha[kd].reshape(bcast) * x0[bd] + sigma[kd].reshape(bcast) * noise[bd]
            t = ts[k].to(dev, tdtype)
            if used == "fd":
                t2 = partner[k].to(dev, tdtype)
                with torch.no_grad():
                    out = eps(torch.cat([x, x]), torch.cat([t, t2]), torch.cat([bd, bd]))
                n = idx.numel()
                # |t - t'| from the float tensors the model saw, not the float64 ideal.
                k_t = _ops.call("diff_norm", out[:n], out[n:]).double() / (t - t2).double().abs()
            else:
                jv, used = _jvp_resolving(lambda tt: eps(x, tt, bd), t, torch.ones_like(t),
                                          used, "lipschitz_t")
                k_t = torch.linalg.vector_norm(jv.reshape(jv.shape[0], -1).to(acc), dim=1)
            values[start:start + idx.numel()] = k_t.detach().to(acc)
            bar.set_postfix(method=used)
    if shard:  # each entry is written by one rank, the others add exact zeros
        values = dist.all_reduce_sum(values)
    meta = {"schedule": repr(sched), "requested_method": method, "samples": B,
            "time_sharing": None if time_sharing is None else
            {"t_tilde": time_sharing.t_tilde, "n": time_sharing.n}}
    return LipschitzResult(ts, values.double().cpu().reshape(K, B), used, meta)


# ---------------------------------------------------------------------------------------
# Lipschitz constant in x
# ---------------------------------------------------------------------------------------

def lipschitz_x(model, x: torch.Tensor, t, *, iters: int = 20,
                generator: torch.Generator | None = None, model_kwargs: dict | None = None,
                method: str = "auto") -> torch.Tensor:
    """Per-sample spectral norm ``|| d eps_theta(x, t) / dx ||_2`` by power iteration.

    Each step applies J (a batched Jacobian-vector product) then J^T (one backward pass
    through a graph recorded once), so every sample iterates on its own Jacobian; this
    assumes the model is per-sample independent (GroupNorm, not BatchNorm in training
    mode). The estimate ``||J v||`` with ``||v|| = 1`` approaches the largest singular
    value from below; convergence is geometric in (s_2 / s_1)^2.

    Args:
        model: ``model(x, t, **model_kwargs)`` -> eps like x.
        x: [B, ...] inputs (e.g. noisy samples x_t).
        t: the time input, passed unchanged (number, 0-d or [B] tensor).
        iters: power iterations (>= 1).
        generator: for the random start vector.
        model_kwargs: passed unchanged.
        method: "auto", "jvp" or "vjp": how J v is formed (see :func:`lipschitz_t`).

    Returns:
        [B] float32 (float64 for float64 x) on x's device.
    """
    if method not in ("auto", "jvp", "vjp"):
        raise ValueError(f"lipschitz_x: method must be 'auto', 'jvp' or 'vjp', got {method!r}")
    if not callable(model):
        raise TypeError(f"lipschitz_x: model must be callable, got {type(model).__name__}")
    _check_sample_tensor(x, "x")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"lipschitz_x: iters must be a positive int, got {iters!r}")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    _warn_if_training(model, "lipschitz_x")
    kw = model_kwargs or {}
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    B = x.shape[0]

    def f(xx):
        return model_output(model(xx, t, **kw))

    def unit(v):
        n = torch.linalg.vector_norm(v.reshape(B, -1).to(acc), dim=1)
        return v / n.clamp_min(torch.finfo(acc).tiny).to(v.dtype).reshape((B,) + (1,) * (v.dim() - 1))

    v = unit(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
    xd = x.detach()
    with _math_attention(), torch.enable_grad():
        xp = xd.clone().requires_grad_()
        out = f(xp)  # one recorded graph serves every J^T product
        if out.shape[0] != B:
            raise ValueError(f"lipschitz_x: model output has batch {out.shape[0]}, expected {B}")
        u, used = _jvp_resolving(f, xd, v, method, "lipschitz_x")
        if used == "vjp":
            # J v = d/du0 <v, J^T u0> on the recorded graph: no forward pass per product.
            u0 = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, xp, u0, create_graph=True, allow_unused=True)
            if g is None or not g.requires_grad:
                return torch.zeros(B, dtype=acc, device=x.device)

            def jv(v):
                return torch.autograd.grad(g, u0, v, retain_graph=True)[0]
        else:
            def jv(v):
                return _jvp(f, xd, v, "jvp")[1]

        for _ in range(iters):
            (w,) = torch.autograd.grad(out, xp, u, retain_graph=True, allow_unused=True)
            if w is None:  # output independent of x
                return torch.zeros(B, dtype=acc, device=x.device)
            v = unit(w)
            u = jv(v)
    return torch.linalg.vector_norm(u.detach().reshape(B, -1).to(acc), dim=1)
