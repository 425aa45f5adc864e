"""The op registry: loads the compiled extension, registers fake (meta) kernels and
autograd / forward-AD / vmap rules, and holds the pure-PyTorch reference of every op.

Schemas live in one place, ``csrc/fastdiff.cpp``; when the extension is missing the
same schemas are defined here and the reference implementations registered for every
device, so the public API behaves identically (only slower).

Backends for an op call are chosen per tensor device:
  * ``torch.ops.fastdiff.*`` dispatches to the C++ CPU or CUDA kernel;
  * on CUDA tensors the Triton kernel is used instead when ``FASTDIFF_BACKEND=triton``
    (or ``set_backend("triton")``) and triton is importable;
  * ``set_backend("reference")`` forces the pure-torch path (for debugging).
"""
from __future__ import annotations

import os
import warnings

import torch

from .schedules import share_tensor

__all__ = ["backends", "set_backend", "get_backend", "HAS_EXTENSION"]

# Every op's schema, keyed by "name" or "name.overload". Must match csrc/fastdiff.cpp
# exactly; used only when the extension failed to load (then the references serve as the
# CPU/CUDA kernels).
SCHEMAS = {
    "timestep_embedding": (
        "timestep_embedding(Tensor t, Tensor freqs, Tensor? table, int dim, bool flip_sin_to_cos, "
        "float scale, float share_width, float share_end, bool derivative) -> Tensor"),
    "sampler_step": (
        "sampler_step(Tensor x, Tensor? x_base, Tensor model_out, Tensor? model_out_cond, "
        "Tensor[] history, Tensor? noise, Tensor coeffs, bool clamp, int n_out) -> Tensor[]"),
    "sampler_step.out": (
        "sampler_step.out(Tensor x, Tensor? x_base, Tensor model_out, Tensor? model_out_cond, "
        "Tensor[] history, Tensor? noise, Tensor coeffs, bool clamp, *, Tensor(a!)[] out) -> ()"),
    "diff_norm": "diff_norm(Tensor a, Tensor b) -> Tensor",
    "sdpa_jvp": ("sdpa_jvp(Tensor q, Tensor k, Tensor v, Tensor dq, Tensor dk, Tensor dv, "
                 "float scale) -> (Tensor, Tensor)"),
    "group_norm_tangent": ("group_norm_tangent(Tensor x, Tensor dx, Tensor mean, Tensor rstd, "
                           "Tensor? weight, int groups) -> Tensor"),
}
# Ops without a CUDA kernel: on CUDA tensors their Triton kernel serves them where there is
# one and triton is installed, else the reference; backends() does not count them.
NO_CUDA_KERNEL = ("sdpa_jvp", "group_norm_tangent")

_LOAD_ERROR = None
try:
    from . import _C  # noqa: F401  (registers the ops with the dispatcher)
    HAS_EXTENSION = True
except ImportError as e:  # pragma: no cover - exercised by the no-extension test
    HAS_EXTENSION = False
    _LOAD_ERROR = e



def extension():
    """The compiled module fastdiff._C, or None when it could not be loaded."""
    return _C if HAS_EXTENSION else None


_lib_fallback = None
if not HAS_EXTENSION:
    warnings.warn(
        f"fastdiff: the compiled extension fastdiff._C could not be loaded ({_LOAD_ERROR}); "
        "running on the pure-PyTorch reference ops (correct, but slower). Reinstall with "
        "`pip install --no-build-isolation .` to build the kernels.", RuntimeWarning, stacklevel=2)
    _lib_fallback = torch.library.Library("fastdiff", "DEF")
    for _schema in SCHEMAS.values():
        _lib_fallback.define(_schema)


def _has_schema(name: str) -> bool:
    base, _, overload = name.partition(".")
    try:
        torch._C._get_schema(f"fastdiff::{base}", overload)
        return True
    except RuntimeError:
        return False


# An extension built before an op was added (a stale build) lacks its schema: define it
# here and let the reference serve it (registered below), rather than fail at import.
_STALE = [n for n in SCHEMAS if HAS_EXTENSION and not _has_schema(n)]
_lib_stale = torch.library.Library("fastdiff", "FRAGMENT") if _STALE else None
for _name in _STALE:
    _lib_stale.define(SCHEMAS[_name])


def _has_cuda_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff::{name}", "CUDA")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


_TRITON_IMPORTABLE: list = []


def _triton_importable() -> bool:
    """:func:`_triton_available`, asked once (a failing import is slow to repeat)."""
    if not _TRITON_IMPORTABLE:
        _TRITON_IMPORTABLE.append(_triton_available())
    return _TRITON_IMPORTABLE[0]


_BACKEND = os.environ.get("FASTDIFF_BACKEND", "auto").lower()
_VALID_BACKENDS = ("auto", "kernels", "triton", "reference")
if _BACKEND not in _VALID_BACKENDS:
    raise ValueError(f"FASTDIFF_BACKEND must be one of {_VALID_BACKENDS}, got {_BACKEND!r}")


def set_backend(name: str) -> None:
    """Choose the implementation used by the public API.

    ``"auto"`` (default): compiled kernels (C++ on CPU, CUDA on GPU); ``"kernels"``: the
    same, explicitly; ``"triton"``: Triton kernels for CUDA tensors (and for CPU tensors
    under ``TRITON_INTERPRET=1``, for testing); ``"reference"``: pure PyTorch.
    """
    global _BACKEND
    if name not in _VALID_BACKENDS:
        raise ValueError(f"backend must be one of {_VALID_BACKENDS}, got {name!r}")
    if name != _BACKEND and HAS_EXTENSION:
        _C._backend_changed()  # runs in the compiled step hold the old backend's op
    _BACKEND = name


def get_backend() -> str:
    """The backend name set by :func:`set_backend` or ``FASTDIFF_BACKEND``."""
    return _BACKEND


def use_triton(device: torch.device) -> bool:
    """Whether the Triton kernel should serve a call on tensors of ``device``."""
    if _BACKEND != "triton":
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_reference() -> bool:
    return _BACKEND == "reference"


def backends() -> dict:
    """What is available: ``{"cpu_kernels", "cuda_kernels", "triton", "cuda_device",
    "backend", "torch", "load_error"}``."""
    ops = [n for n in SCHEMAS if n not in NO_CUDA_KERNEL]
    return {
        "cpu_kernels": HAS_EXTENSION,
        "cuda_kernels": HAS_EXTENSION and all(_has_cuda_kernel(n) for n in ops),
        "triton": _triton_available(),
        "cuda_device": torch.cuda.is_available(),
        "backend": _BACKEND,
        "torch": torch.__version__,
        "load_error": None if _LOAD_ERROR is None else str(_LOAD_ERROR),
    }


# ---------------------------------------------------------------------------------------
# timestep_embedding
# ---------------------------------------------------------------------------------------

def embedding_ref(t, freqs, table, dim, flip_sin_to_cos, scale, share_width, share_end,
                  derivative):
    """Reference of ``fastdiff::timestep_embedding``.

    t: [B] int or float timesteps; freqs: [dim // 2] float32/float64 frequencies (as
    diffusers computes them); table: optional [R, dim] precomputed embedding of integer
    t in [0, R) (ignored when ``derivative``). Returns [B, dim] in freqs' dtype: the
    sinusoidal embedding of f(t) (f the sharing map when ``share_end > 0``), or with
    ``derivative`` its derivative d emb / d t (zero where t is shared).
    """
    half = dim // 2
    ts = share_tensor(t, share_width, share_end) if share_end > 0 else t
    arg = scale * (ts.to(freqs.dtype)[:, None] * freqs[None, :])
    if derivative:
        if share_end > 0:
            # Compare in the precision the sharing map uses (float32 for half t).
            tm = t.float() if t.is_floating_point() and t.dtype != torch.float64 else t.double()
            dshare = (tm >= share_end).to(freqs.dtype)
        else:
            dshare = torch.ones(t.shape[0], dtype=freqs.dtype, device=t.device)
        k = (scale * freqs)[None, :] * dshare[:, None]
        first, second = torch.cos(arg) * k, -torch.sin(arg) * k
    else:
        first, second = torch.sin(arg), torch.cos(arg)
        if table is not None and not t.is_floating_point():
            rows = table.shape[0]
            ti = t.long()  # as the kernels index: a uint64 t above INT64_MAX turns negative
            inside = (ti >= 0) & (ti < rows)
            gathered = table.index_select(0, ti.clamp(0, rows - 1))
            full = torch.cat([second, first] if flip_sin_to_cos else [first, second], dim=-1)
            if dim % 2:
                full = torch.nn.functional.pad(full, (0, 1))
            return torch.where(inside[:, None], gathered.to(freqs.dtype), full)
    out = torch.cat([second, first] if flip_sin_to_cos else [first, second], dim=-1)
    if dim % 2:
        out = torch.nn.functional.pad(out, (0, 1))
    return out


@torch.library.register_fake("fastdiff::timestep_embedding")
def _embedding_fake(t, freqs, table, dim, flip_sin_to_cos, scale, share_width, share_end,
                    derivative):
    return t.new_empty((t.shape[0], dim), dtype=freqs.dtype)


# ---------------------------------------------------------------------------------------
# sampler_step
# ---------------------------------------------------------------------------------------

STEP_HEAD = 8  # coefficient columns before the output matrix; see step_ref


def step_n_basis(n_history: int) -> int:
    """Number of basis terms of sampler_step: x, x_base, d, noise, then the history."""
    return 4 + n_history


def step_ref(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, n_out):
    """Reference of ``fastdiff::sampler_step``: one fused sampler update.

    All tensors share x's shape [B, ...] and dtype; math in float32 (float64 for float64).
    ``coeffs`` [B or 1, STEP_HEAD + n_out * n_basis] per-sample scalars:

      col 0  g     guidance: m = mu + g * (mc - mu) when ``model_out_cond`` is given
      col 1  p_x   col 2 p_m:  x0 = p_x * x + p_m * m   (prediction -> data estimate)
      col 3  s     col 4 s_div: x0c = clamp(x0, -s, s) / s_div   (only when ``clamp``)
      col 5  w_x   col 6 w_m   col 7 w_c:  d = w_x * x + w_m * m + w_c * x0c
      then, for each output o, n_basis coefficients over the basis
      [x, x_base, d, noise, history_0, ..., history_{H-1}]:  out_o = sum_j C[o, j] * basis_j

    Absent x_base / noise contribute zero. An output whose row selects d alone (1 on d, 0
    on x and on every other term present) is d itself: the sum would give the same values
    but for the sign of a zero d and where another term is Inf or NaN (0 * Inf). Multistep
    samplers store their data estimate so, and every backend skips that sum.
    Returns a list of n_out tensors.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    nb = step_n_basis(len(history))
    c = coeffs.to(acc)
    view = (-1,) + (1,) * (x.dim() - 1)

    def col(j):
        return c[:, j].reshape(view)

    xf = x.to(acc)
    m = model_out.to(acc)
    if model_out_cond is not None:
        m = m + col(0) * (model_out_cond.to(acc) - m)
    d = col(5) * xf + col(6) * m
    if clamp:
        x0 = col(1) * xf + col(2) * m
        s = col(3)
        x0c = torch.maximum(torch.minimum(x0, s), -s) / col(4)
        d = d + col(7) * x0c
    zeros = torch.zeros_like(xf)
    basis = [xf, x_base.to(acc) if x_base is not None else zeros, d,
             noise.to(acc) if noise is not None else zeros] + [h.to(acc) for h in history]
    present = [True, x_base is not None, False, noise is not None] + [True] * len(history)
    outs = []
    for o in range(n_out):
        base = STEP_HEAD + o * nb
        y = col(base) * basis[0]
        for j in range(1, nb):
            y = y + col(base + j) * basis[j]
        row = c[:, base:base + nb]
        only_d = (row[:, 2] == 1) & (row[:, present] == 0).all(dim=1)
        outs.append(torch.where(only_d.reshape(view), d, y).to(x.dtype))
    return outs


@torch.library.register_fake("fastdiff::sampler_step")
def _step_fake(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, n_out):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(n_out)]


# Outputs that are inputs: at most this many (csrc/checks.h kStepMaxAliasOut; every
# backend forms up to 4 outputs of an element before it stores any).
STEP_MAX_ALIAS_OUT = 4


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [begin, end) a strided tensor can touch."""
    if t.numel() == 0:
        return (0, 0)
    begin = t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return begin, begin + (last + 1) * t.element_size()


def check_step_out(x, x_base, model_out, model_out_cond, history, noise, coeffs, out) -> bool:
    """Validate the outputs of ``sampler_step.out`` (the rule of csrc/checks.h): contiguous
    tensors like x, none overlapping another, each either sharing no memory with the
    inputs or being exactly one of them. Returns whether some output is an input; raises
    TypeError / ValueError naming the offending output."""
    if not isinstance(out, (list, tuple)) or not out:
        raise ValueError("sampler_step.out: out must be a non-empty list of tensors")
    inputs = [("x", x), ("model_out", model_out), ("coeffs", coeffs), ("x_base", x_base),
              ("model_out_cond", model_out_cond), ("noise", noise)]
    inputs += [(f"history[{k}]", h) for k, h in enumerate(history)]
    inputs = [(n, t, _byte_extent(t)) for n, t in inputs if t is not None]
    alias = False
    seen = []
    for o, y in enumerate(out):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"sampler_step.out: out[{o}] must be a tensor, got {type(y).__name__}")
        if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
            raise ValueError(f"sampler_step.out: out[{o}] must be like x (shape {tuple(x.shape)}, "
                             f"{x.dtype}, {x.device}), got {tuple(y.shape)}, {y.dtype}, {y.device}")
        if not y.is_contiguous():
            raise ValueError(f"sampler_step.out: out[{o}] must be contiguous")
        ey = _byte_extent(y)
        if ey[0] == ey[1]:
            continue
        for p, ep in seen:
            if ep[0] < ey[1] and ey[0] < ep[1]:
                raise ValueError(f"sampler_step.out: out[{o}] overlaps out[{p}]")
        seen.append((o, ey))
        for name, t, et in inputs:
            if not (et[0] < ey[1] and ey[0] < et[1]):
                continue
            if not (t.data_ptr() == y.data_ptr() and t.shape == y.shape and t.dtype == y.dtype
                    and t.is_contiguous()):
                raise ValueError(f"sampler_step.out: out[{o}] partially overlaps {name} (an output "
                                 "may be an input exactly, or share no memory with it)")
            alias = True
    if alias and len(out) > STEP_MAX_ALIAS_OUT:
        raise ValueError(f"sampler_step.out: outputs that are inputs need n_out <= "
                         f"{STEP_MAX_ALIAS_OUT}, got {len(out)}")
    return alias


def step_out_ref(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, *, out):
    """Reference of ``fastdiff::sampler_step.out``: :func:`step_ref` written into ``out``
    (n_out = len(out)); an output may be one of the inputs (see :func:`check_step_out`)."""
    check_step_out(x, x_base, model_out, model_out_cond, history, noise, coeffs, out)
    for o, r in zip(out, step_ref(x, x_base, model_out, model_out_cond, history, noise, coeffs,
                                  clamp, len(out))):
        o.copy_(r)


@torch.library.register_fake("fastdiff::sampler_step.out")
def _step_out_fake(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, *, out):
    return None


# ---------------------------------------------------------------------------------------
# diff_norm
# ---------------------------------------------------------------------------------------

def diff_norm_ref(a, b):
    """Reference of ``fastdiff::diff_norm``: per-row L2 norm ``||a[i] - b[i]||_2``.

    a, b: [B, ...] same shape and dtype. Returns [B] float32 (float64 for float64
    inputs), accumulated in float64 (a float32 sum of a 1e6-element row is off by ~1e-5
    relative; the kernels' blocked sums are not).
    """
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    d = (a.double() - b.double()).reshape(a.shape[0], -1)
    return torch.linalg.vector_norm(d, dim=1).to(acc)


@torch.library.register_fake("fastdiff::diff_norm")
def _diff_norm_fake(a, b):
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.new_empty((a.shape[0],), dtype=acc)


# ---------------------------------------------------------------------------------------
# sdpa_jvp
# ---------------------------------------------------------------------------------------

def sdpa_jvp_ref(q, k, v, dq, dk, dv, scale):
    """Reference of ``fastdiff::sdpa_jvp``: attention and its tangent, written directly
    (it materialises the [Lq, Lk] matrices; the kernels never do).

    q, dq: [..., Lq, D]; k, dk: [..., Lk, D]; v, dv: [..., Lk, Dv] (equal batch dims, one
    dtype). With s = q k^T * scale, ds = (dq k^T + q dk^T) * scale and p = softmax(s):
    returns ``(p v, p dv + (p * (ds - rowsum(p * ds))) v)``, each [..., Lq, Dv] in q's
    dtype, computed in float32 (float64 for float64).
    """
    if not (q.dim() >= 2 and k.dim() == q.dim() == v.dim()
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):  # as the kernel: no broadcasting
        raise ValueError(f"sdpa_jvp: q, k, v must have the same batch dims, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    dtype = q.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v, dq, dk, dv = (x.to(acc) for x in (q, k, v, dq, dk, dv))
    s = (q @ k.transpose(-1, -2)) * scale
    ds = (dq @ k.transpose(-1, -2) + q @ dk.transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)
    pds = p * (ds - (p * ds).sum(-1, keepdim=True))
    out, dout = p @ v, p @ dv + pds @ v
    return out.to(dtype), dout.to(dtype)


@torch.library.register_fake("fastdiff::sdpa_jvp")
def _sdpa_jvp_fake(q, k, v, dq, dk, dv, scale):
    shape = q.shape[:-1] + v.shape[-1:]
    return q.new_empty(shape), q.new_empty(shape)


# ---------------------------------------------------------------------------------------
# group_norm_tangent
# ---------------------------------------------------------------------------------------

def group_norm_tangent_ref(x, dx, mean, rstd, weight, groups):
    """Reference of ``fastdiff::group_norm_tangent``: the forward-mode tangent of
    ``group_norm(x, groups, weight, bias, eps)`` along ``dx`` (weight and bias constant).

    x, dx: [N, C, ...] of one dtype; mean, rstd: [N, groups] per-group mean and
    ``(var + eps)^-1/2`` of x (what ``torch.native_group_norm`` returns with the primal);
    weight: [C] or None. With xc = x - mean per group,
    ``d = weight * rstd * (dx - mean(dx) - xc rstd^2 mean(xc dx))``; [N, C, ...] in x's
    dtype, computed in float32 (float64 for float64).
    """
    N, C = x.shape[0], x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg, tg = x.reshape(N, groups, -1).to(acc), dx.reshape(N, groups, -1).to(acc)
    mean = mean.reshape(N, groups, 1).to(acc)
    rstd = rstd.reshape(N, groups, 1).to(acc)
    xc = xg - mean
    k = (xc * tg).mean(-1, keepdim=True) * rstd * rstd
    d = (tg - tg.mean(-1, keepdim=True) - xc * k) * rstd
    d = d.reshape(N, C, -1)
    if weight is not None:
        d = d * weight.to(acc).reshape(1, C, 1)
    return d.reshape(x.shape).to(x.dtype)


@torch.library.register_fake("fastdiff::group_norm_tangent")
def _group_norm_tangent_fake(x, dx, mean, rstd, weight, groups):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------

REFERENCE = {"timestep_embedding": embedding_ref, "sampler_step": step_ref,
             "sampler_step.out": step_out_ref, "diff_norm": diff_norm_ref,
             "sdpa_jvp": sdpa_jvp_ref, "group_norm_tangent": group_norm_tangent_ref}
# Triton implementations take exactly the op's arguments (fastdiff/triton/<file>.py).
TRITON = {"timestep_embedding": ("embedding", "timestep_embedding"),
          "sampler_step": ("step", "sampler_step"),
          "sampler_step.out": ("step", "sampler_step_out"),
          "diff_norm": ("reduce", "diff_norm"),
          "sdpa_jvp": ("attention", "sdpa_jvp")}

if _lib_fallback is not None:
    for _name, _fn in REFERENCE.items():
        for _key in ("CPU", "CUDA"):
            _lib_fallback.impl(_name, _fn, _key)
for _name in _STALE:
    for _key in ("CPU", "CUDA"):
        _lib_stale.impl(_name, REFERENCE[_name], _key)


def constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its ``import torch._dynamo``
    (about 2 s, most of ``import fastdiff``): that decorator only sets this marker
    (tests/test_ops_fixes.py checks that it still does)."""
    fn._dynamo_marked_constant = True
    return fn


_kernel_cache: dict = {}


@constant_result
def has_kernel(name: str, device_type: str) -> bool:
    """Whether ``fastdiff::name`` has a compiled kernel for ``device_type`` ("cpu",
    "cuda", "meta": the fake kernels above; other devices use the reference)."""
    key = (name, device_type)
    if key not in _kernel_cache:
        try:
            dispatch_key = torch._C._dispatch_key_for_device(device_type)
        except RuntimeError:  # a device type torch has no dispatch key for
            dispatch_key = None
        _kernel_cache[key] = bool(
            dispatch_key is not None and (HAS_EXTENSION or device_type == "meta")
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff::{name}", dispatch_key))
    return _kernel_cache[key]


# The Triton implementations are registered as ops of their own (same schemas, under
# "fastdiff_triton"), so that torch.compile puts them in its graph as opaque calls (a
# Python launcher cannot be traced); triton itself is imported on the first call only.
_lib_triton = torch.library.Library("fastdiff_triton", "DEF")
for _schema in SCHEMAS.values():
    _lib_triton.define(_schema)


def _triton_launcher(name: str):
    loaded = []

    def launch(*args, **kwargs):
        if not loaded:
            import importlib
            mod, fn = TRITON[name]
            loaded.append(getattr(importlib.import_module(f"fastdiff.triton.{mod}"), fn))
        return loaded[0](*args, **kwargs)
    return launch


_FAKE = {"timestep_embedding": _embedding_fake, "sampler_step": _step_fake,
         "sampler_step.out": _step_out_fake, "diff_norm": _diff_norm_fake,
         "sdpa_jvp": _sdpa_jvp_fake, "group_norm_tangent": _group_norm_tangent_fake}


def _no_backward(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"derivative for fastdiff_triton::{name} is not implemented")
    return backward


for _name in TRITON:
    # CPU tensors reach it only under TRITON_INTERPRET=1 (use_triton); the launchers
    # refuse them otherwise.
    for _key in ("CPU", "CUDA"):
        _lib_triton.impl(_name, _triton_launcher(_name), _key)
    torch.library.register_fake(f"fastdiff_triton::{_name}", _FAKE[_name], lib=_lib_triton)
    if not _name.endswith(".out"):
        # As the compiled kernels (autograd-not-implemented fallback): backward through
        # them raises instead of silently giving no gradient.
        torch.library.register_autograd(f"fastdiff_triton::{_name}", _no_backward(_name),
                                        lib=_lib_triton)


def triton_fn(name: str):
    """The Triton implementation of op ``name`` as a dispatcher op."""
    return op(name, "fastdiff_triton")


def op(name: str, namespace: str = "fastdiff") -> torch._ops.OpOverload:
    """The dispatcher op ``namespace::name`` ("sampler_step" or "sampler_step.out")."""
    base, _, overload = name.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), base), overload or "default")


def _impl(name: str, device: torch.device):
    """What serves op ``name`` on ``device`` under the current backend setting."""
    if use_reference():
        return REFERENCE[name]
    if use_triton(device):
        return triton_fn(name)
    if not has_kernel(name, device.type):
        if (device.type == "cuda" and name in NO_CUDA_KERNEL and name in TRITON
                and _triton_importable()):
            return triton_fn(name)
        return REFERENCE[name]
    return op(name)


def call(name: str, *args, **kwargs):
    """Run op ``name`` ("name" or "name.overload") on the backend chosen for its first
    tensor argument's device."""
    return _impl(name, args[0].device)(*args, **kwargs)


_resolved: dict = {}


def resolve(name: str, device: torch.device):
    """:func:`call`'s choice for ``device`` as a callable, cached per backend setting:
    for loops that call one op many times (a sampler), where the choice costs more than
    a small kernel."""
    key = (name, device.type, _BACKEND)
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _impl(name, device)
    return fn
