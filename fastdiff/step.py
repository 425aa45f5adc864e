"""The fused sampler update: the one tensor pass every sampler step makes.

A sampler computes per-sample scalar coefficients on the host (float64) and calls
:func:`fused_step`, which reads x, the model output(s), the history and the noise once
and writes each requested output once. The coefficient layout is documented in
``fastdiff._ops.step_ref`` (the reference implementation); :class:`StepCoeffs` builds it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import _ops
from ._ops import STEP_HEAD, step_n_basis

__all__ = ["fused_step", "StepCoeffs"]


class StepCoeffs:
    """Builder of the ``coeffs`` matrix of :func:`fused_step` (float64, on the host).

    ``B`` rows (one per sample; 1 broadcasts), ``n_out`` outputs, ``n_history`` history
    tensors. Columns are set by name so samplers read like their equations::

        c = StepCoeffs(B, n_out=2, n_history=1)
        c.convert(p_x=1/alpha, p_m=-sigma/alpha, w_m=...)      # d from the model output
        c.out(0, x=a, d=b, h=[c1])                             # x_next
        c.out(1, d=1.0)                                        # store d for the history

    Every value may be a Python float or a float64 tensor [B].
    """

    def __init__(self, B: int, n_out: int = 1, n_history: int = 0):
        self.n_out, self.n_history = n_out, n_history
        self.nb = step_n_basis(n_history)
        # numpy, not torch: a sampler sets ~20 columns per step and a numpy column write
        # costs ~0.2 us against ~5 us for a torch indexing op (measured by bench_step).
        self._data = np.zeros((B, STEP_HEAD + n_out * self.nb))
        self._data[:, 4] = 1.0  # s_div: no division unless set

    @property
    def data(self) -> torch.Tensor:
        """The matrix [B, STEP_HEAD + n_out * nb], float64; a view: writes go through."""
        return torch.from_numpy(self._data)

    @property
    def array(self) -> np.ndarray:
        """The same matrix as a numpy array (a view)."""
        return self._data

    def guidance(self, g) -> "StepCoeffs":
        """Classifier-free guidance m = m_uncond + g * (m_cond - m_uncond)."""
        self._data[:, 0] = _col(g)
        return self

    def convert(self, *, p_x=0.0, p_m=0.0, w_x=0.0, w_m=0.0, w_c=0.0, s=0.0,
                s_div=1.0) -> "StepCoeffs":
        """x0 = p_x x + p_m m; x0c = clamp(x0, -s, s) / s_div; d = w_x x + w_m m + w_c x0c."""
        for j, v in ((1, p_x), (2, p_m), (3, s), (4, s_div), (5, w_x), (6, w_m), (7, w_c)):
            self._data[:, j] = _col(v)
        return self

    def out(self, o: int, *, x=0.0, x_base=0.0, d=0.0, noise=0.0, h: Sequence = ()) -> "StepCoeffs":
        """Output ``o`` = x*x + x_base*x_base + d*d + noise*noise + sum_k h[k]*history[k]."""
        if not 0 <= o < self.n_out:
            raise ValueError(f"StepCoeffs.out: output index {o} not in [0, {self.n_out})")
        if len(h) > self.n_history:
            raise ValueError(f"StepCoeffs.out: {len(h)} history coefficients for "
                             f"n_history={self.n_history}")
        base = STEP_HEAD + o * self.nb
        for j, v in enumerate((x, x_base, d, noise)):
            self._data[:, base + j] = _col(v)
        for k, v in enumerate(h):
            self._data[:, base + 4 + k] = _col(v)
        return self

    def tensor(self, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """The matrix for the kernel: float32 (float64 for float64 samples)."""
        return torch.from_numpy(self._data).to(device=device, dtype=dtype, non_blocking=True)


def _col(v):
    """A column value: a Python float, or a float64 array [B] from a tensor or array."""
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if isinstance(v, np.ndarray):
        return np.asarray(v, dtype=np.float64).reshape(-1)
    return float(v)


def _check_like(name, t, x, optional=True):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fused_step: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"fused_step: {name} has shape {tuple(t.shape)}, expected x's shape "
                         f"{tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"fused_step: {name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"fused_step: {name} is on {t.device}, expected x's device {x.device}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


# -- autograd ------------------------------------------------------------------------------
# The kernels have no backward of their own. The update is linear in every tensor input
# (piecewise linear through the clamp, bilinear with the coefficients), so its
# vector-Jacobian product is that of the pure-torch reference at the same inputs: the
# forward runs the kernel, the backward differentiates the reference (itself
# differentiable again, so double backward works too).

class _Differentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, clamp, n_out, n_hist, x, x_base, model_out, model_out_cond, noise,
                coeffs, *history):
        ctx.clamp, ctx.n_out = clamp, n_out
        ctx.save_for_backward(x, x_base, model_out, model_out_cond, noise, coeffs, *history)
        return tuple(fn(x, x_base, model_out, model_out_cond, list(history), noise, coeffs,
                        clamp, n_out))

    @staticmethod
    def backward(ctx, *grads):
        x, x_base, m, mc, noise, coeffs, *history = ctx.saved_tensors
        inputs = (x, x_base, m, mc, noise, coeffs, *history)
        wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[4 + i]]
        with torch.enable_grad():
            leaves = [t if t is None or t.requires_grad else t.detach().requires_grad_(i in wanted)
                      for i, t in enumerate(inputs)]
            x, x_base, m, mc, noise, coeffs, *history = leaves
            outs = _ops.step_ref(x, x_base, m, mc, history, noise, coeffs, ctx.clamp, ctx.n_out)
            got = torch.autograd.grad(outs, [leaves[i] for i in wanted], grads, allow_unused=True,
                                      create_graph=torch.is_grad_enabled())
        result = [None] * len(inputs)
        for i, g in zip(wanted, got):
            result[i] = g
        return (None, None, None, None, *result)


def needs_grad(*tensors) -> bool:
    """Whether autograd records an op on these tensors (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def differentiable_step(fn, x, x_base, model_out, model_out_cond, history, noise, coeffs,
                        clamp: bool, n_out: int) -> list[torch.Tensor]:
    """``fn`` (a ``sampler_step`` implementation with the op's arguments) with a backward
    rule: use when :func:`needs_grad` of the inputs."""
    return list(_Differentiable.apply(fn, clamp, n_out, len(history), x, x_base, model_out,
                                      model_out_cond, noise, coeffs, *history))


def dense_perm(x: torch.Tensor):
    """For a non-contiguous x whose memory is dense with the batch outermost (channels_last
    and the like): the dimension order in which it is contiguous, else None. The kernels
    then run on ``x.permute(perm)`` and their outputs, permuted back, keep x's layout."""
    if x.dim() < 3:
        return None
    perm = (0, *sorted(range(1, x.dim()), key=lambda i: -x.stride(i)))
    return perm if x.permute(perm).is_contiguous() else None


def inverse_perm(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def fused_step(x: torch.Tensor, model_out: torch.Tensor, coeffs: torch.Tensor, *,
               x_base: torch.Tensor | None = None, model_out_cond: torch.Tensor | None = None,
               history: Sequence[torch.Tensor] = (), noise: torch.Tensor | None = None,
               clamp: bool = False, n_out: int = 1,
               out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One fused sampler update (see ``fastdiff._ops.step_ref`` for the exact formula).

    Args:
        x: [B, ...] current sample (float32/float16/bfloat16/float64).
        model_out: [B, ...] model output (the unconditional one under guidance).
        coeffs: [B or 1, STEP_HEAD + n_out * (4 + len(history))] per-sample scalars, float32
            (float64 when x is float64), on x's device; see :class:`StepCoeffs`.
        x_base, model_out_cond, history, noise: optional [B, ...] tensors like x.
        clamp: clamp the data estimate (static clip or dynamic thresholding).
        n_out: number of outputs.
        out: optional ``n_out`` contiguous tensors like x to write the outputs into. Each
            may be one of the inputs itself (x, a history tensor, ...; at most 4 outputs
            then), so a sampler can update its state and history in place: every input
            element is read before the output element at the same index is written. An
            output that shares only part of an input's memory is an error.

    Returns:
        list of ``n_out`` tensors shaped like x, in x's dtype and memory layout (e.g.
        channels_last; ``out`` when given). The outputs are differentiable with respect to
        every tensor input (the coefficients too) on every backend; with ``out`` an input
        that requires grad is an error (in-place outputs cannot record a graph).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fused_step: x must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"fused_step: x must have shape [B, ...] with B >= 1, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"fused_step: x must be float32/float16/bfloat16/float64, got {x.dtype}")
    _check_like("model_out", model_out, x, optional=False)
    for name, t in (("x_base", x_base), ("model_out_cond", model_out_cond), ("noise", noise)):
        _check_like(name, t, x)
    if isinstance(history, torch.Tensor) or not isinstance(history, (list, tuple)):
        raise TypeError(f"fused_step: history must be a list of tensors, got {type(history).__name__}")
    history = list(history)
    for k, h in enumerate(history):
        _check_like(f"history[{k}]", h, x, optional=False)
    if not _is_int(n_out):
        raise TypeError(f"fused_step: n_out must be an int, got {type(n_out).__name__}")
    if n_out < 1:
        raise ValueError(f"fused_step: n_out must be a positive int, got {n_out!r}")
    n_out = int(n_out)
    want = STEP_HEAD + n_out * step_n_basis(len(history))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(coeffs, torch.Tensor):
        raise TypeError(f"fused_step: coeffs must be a tensor [B or 1, {want}] (see StepCoeffs."
                        f"tensor()), got {type(coeffs).__name__}")
    if coeffs.dim() != 2 or coeffs.shape[0] not in (1, x.shape[0]) or coeffs.shape[1] != want:
        raise ValueError(f"fused_step: coeffs must have shape [{x.shape[0]} or 1, {want}] for "
                         f"n_out={n_out} and {len(history)} history tensors, got "
                         f"{tuple(coeffs.shape)}")
    if coeffs.dtype != acc:
        raise TypeError(f"fused_step: coeffs must be {acc} for {x.dtype} samples, got {coeffs.dtype}")
    if coeffs.device != x.device:
        raise ValueError(f"fused_step: coeffs is on {coeffs.device}, expected {x.device}")
    grad = needs_grad(x, x_base, model_out, model_out_cond, noise, coeffs, *history)
    if out is None:
        perm = None if x.is_contiguous() else dense_perm(x)
        if perm is not None:  # run in x's memory order; the outputs keep its layout
            x, x_base, model_out, model_out_cond, noise = (
                None if t is None else t.permute(perm) for t in (x, x_base, model_out, model_out_cond, noise))
            history = [h.permute(perm) for h in history]
        fn = _ops._impl("sampler_step", x.device)
        args = (x, x_base, model_out, model_out_cond, history, noise, coeffs, bool(clamp), n_out)
        outs = differentiable_step(fn, *args) if grad else fn(*args)
        if perm is not None:
            inv = inverse_perm(perm)
            outs = [o.permute(inv) for o in outs]
        return outs
    if grad:
        raise ValueError("fused_step: out= does not support autograd, and an input requires grad; "
                         "call fused_step without out (its outputs are differentiable), or under "
                         "torch.no_grad()")
    if isinstance(out, torch.Tensor) or not isinstance(out, (list, tuple)):
        raise TypeError(f"fused_step: out must be a list of tensors, got {type(out).__name__}")
    out = list(out)
    if len(out) != n_out:
        raise ValueError(f"fused_step: out has {len(out)} tensors, expected n_out={n_out}")
    if not torch.compiler.is_compiling():  # fake tensors have no memory to compare
        _ops.check_step_out(x, x_base, model_out, model_out_cond, history, noise, coeffs, out)
    _ops.call("sampler_step.out", x, x_base, model_out, model_out_cond, history, noise, coeffs,
              bool(clamp), out=out)
    return out
