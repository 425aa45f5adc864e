"""fastdiff::sampler_step: the C++ CPU kernel and the Triton kernel (interpreted on CPU)
against the pure-torch reference ``fastdiff._ops.step_ref``, on fresh random inputs;
opcheck; autograd behaviour; argument errors at the Python boundary and in the op.

The CUDA kernel runs the per-element math of csrc/kernels/step.h that the CPU kernel
runs too, so these tests cover its formulas (not its launch) on machines without a GPU.
"""
import itertools
import math

import pytest
import torch

from fastdiff import _ops
from fastdiff._ops import STEP_HEAD, step_n_basis, step_ref
from fastdiff.step import StepCoeffs, fused_step

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(3, 3, 7, 5), (1, 1, 1, 1), (5, 1001), (2, 4, 33)]
# Agreement with the reference: the kernels compute in the reference's rounding order,
# so float32/float64 agree to rounding noise; half types may differ by one unit in the
# last place of the output when the float32 values straddle a rounding boundary.
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2 ** -10, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5)}

# Kernel tests fail loudly (never skip) when the compiled extension is missing.
needs_kernel = pytest.mark.usefixtures("compiled_kernels")


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand(shape, dtype, gen, noncontig=False):
    """Random normal tensor of ``shape``; with ``noncontig`` a transposed or strided view."""
    if not noncontig:
        return torch.randn(shape, generator=gen).to(dtype)
    if len(shape) >= 2:  # transposed storage: strides reversed in the last two dims
        t = torch.randn(shape[:-2] + (shape[-1], shape[-2]), generator=gen).to(dtype)
        return t.transpose(-1, -2)
    return torch.randn((shape[0] * 2,), generator=gen).to(dtype)[::2]


def make_case(gen, shape, dtype, *, n_hist=0, n_out=1, cond=False, noise=False, x_base=False,
              clamp=False, per_sample=True, noncontig=False):
    """Arguments of sampler_step. Coefficients are random too; the clamp bound s is drawn
    so that some data estimates are clipped and some are not, and s_div > 0."""
    def t(i):  # alternate layouts so that mixed contiguous / strided inputs are covered
        return rand(shape, dtype, gen, noncontig and i % 2 == 0)

    B = shape[0]
    rows = B if per_sample else 1
    coeffs = torch.randn(rows, STEP_HEAD + n_out * step_n_basis(n_hist), generator=gen,
                         dtype=torch.float64)
    coeffs[:, 3] = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5   # s
    coeffs[:, 4] = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5   # s_div
    return (t(0), t(1) if x_base else None, t(2), t(3) if cond else None,
            [t(4 + k) for k in range(n_hist)], t(9) if noise else None,
            coeffs.to(acc_dtype(dtype)), clamp, n_out)


def poison(op, args):
    """Make the memory the next call's outputs will get NaN, so that an element the kernel
    forgets to write shows up: free a few NaN buffers of the output size (for the system
    allocator), and run the op once on a NaN x (its outputs, all NaN, go back to the CPU
    kernel's output-block cache when dropped)."""
    x = args[0]
    bufs = [torch.full((x.numel() + 64,), float("nan"), dtype=x.dtype) for _ in range(args[-1])]
    del bufs
    outs = op(torch.full_like(x, float("nan")), *args[1:])
    assert all(bool(torch.isnan(o).all()) for o in outs)
    del outs


def overlaps(a, b):
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()


def check_outputs(outs, args):
    """Fresh, contiguous outputs of x's shape and dtype, sharing no memory with the inputs
    or each other, every element written (finite: the inputs are finite)."""
    x, x_base, m, mc, hist, noise, coeffs, clamp, n_out = args
    assert isinstance(outs, (list, tuple)) and len(outs) == n_out
    inputs = [t for t in (x, x_base, m, mc, noise, coeffs, *hist) if t is not None]
    for o in outs:
        assert o.shape == x.shape and o.dtype == x.dtype and o.device == x.device
        assert o.is_contiguous()
        assert bool(torch.isfinite(o).all()), "an output element was not written"
        for t in inputs + [p for p in outs if p is not o]:
            assert not overlaps(o, t)


def assert_matches_ref(outs, args):
    want = step_ref(*args)
    tol = TOL[args[0].dtype]
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, **tol)


# --------------------------------------------------------------------------------------
# CPU kernel vs reference
# --------------------------------------------------------------------------------------

@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_hist", [0, 1, 2, 3, 4, 6])
def test_cpu_kernel_matches_reference(gen, dtype, shape, n_hist):
    # Every combination of the optional inputs and clamp, 1..3 outputs; per-sample and
    # broadcast coefficient rows and contiguous / strided inputs alternate.
    for i, (cond, noise, x_base, clamp, n_out) in enumerate(
            itertools.product([False, True], [False, True], [False, True], [False, True],
                              [1, 2, 3])):
        args = make_case(gen, shape, dtype, n_hist=n_hist, n_out=n_out, cond=cond, noise=noise,
                         x_base=x_base, clamp=clamp, per_sample=i % 2 == 0,
                         noncontig=i % 3 == 0)
        poison(torch.ops.fastdiff.sampler_step, args)
        outs = torch.ops.fastdiff.sampler_step(*args)
        check_outputs(outs, args)
        assert_matches_ref(outs, args)


@needs_kernel
def test_cpu_kernel_long_rows_and_many_outputs(gen):
    # Several parallel tasks and chunks per sample, sample boundaries inside tasks, an
    # element count that is not a multiple of the chunk or vector width, 5 outputs.
    for shape, dtype in [((3, 70001), torch.float32), ((2, 3, 129, 131), torch.bfloat16)]:
        args = make_case(gen, shape, dtype, n_hist=2, n_out=5, cond=True, noise=True,
                         x_base=True, clamp=True)
        outs = torch.ops.fastdiff.sampler_step(*args)
        check_outputs(outs, args)
        assert_matches_ref(outs, args)


@needs_kernel
def test_clamp_propagates_nan_like_reference(gen):
    # torch.minimum/maximum propagate NaN; the kernel's clamp must too (a NaN from the
    # model is a bug the sampler should see, not something clipped to +-s).
    args = list(make_case(gen, (2, 64), torch.float32, clamp=True))
    args[2][0, 5] = float("nan")
    out = torch.ops.fastdiff.sampler_step(*args)[0]
    want = step_ref(*args)[0]
    assert torch.isnan(out[0, 5]) and torch.isnan(want[0, 5])
    torch.testing.assert_close(out, want, equal_nan=True, **TOL[torch.float32])


@needs_kernel
def test_empty_batch(gen):
    x = torch.randn(0, 3)
    coeffs = torch.randn(1, STEP_HEAD + 2 * step_n_basis(0))
    outs = torch.ops.fastdiff.sampler_step(x, None, x.clone(), None, [], None, coeffs, False, 2)
    assert len(outs) == 2 and all(o.shape == (0, 3) for o in outs)


# --------------------------------------------------------------------------------------
# Triton kernel (interpreter) vs reference
# --------------------------------------------------------------------------------------

# (n_hist, n_out, cond, noise, x_base, clamp): each feature on and off, 5 outputs (two
# launches) and 8 history tensors (every pointer slot).
TRITON_CASES = [
    (0, 1, False, False, False, False),
    (1, 2, True, False, False, False),
    (2, 3, False, True, True, False),
    (4, 1, True, True, True, True),
    (3, 5, False, False, False, True),
    (8, 2, True, False, True, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_triton_kernel_matches_reference(gen, dtype, shape):
    kernel = _ops.triton_fn("sampler_step")
    for i, (n_hist, n_out, cond, noise, x_base, clamp) in enumerate(TRITON_CASES):
        args = make_case(gen, shape, dtype, n_hist=n_hist, n_out=n_out, cond=cond, noise=noise,
                         x_base=x_base, clamp=clamp, per_sample=i % 2 == 0, noncontig=i % 3 == 1)
        poison(kernel, args)
        outs = kernel(*args)
        check_outputs(outs, args)
        assert_matches_ref(outs, args)


def test_fused_step_routes_to_triton(gen, triton_backend):
    args = make_case(gen, (2, 3, 5), torch.float32, n_hist=1, n_out=2, cond=True)
    x, x_base, m, mc, hist, noise, coeffs, clamp, n_out = args
    outs = fused_step(x, m, coeffs, model_out_cond=mc, history=hist, n_out=n_out)
    assert_matches_ref(outs, args)


def test_triton_rejects_too_much_history(gen):
    args = make_case(gen, (2, 3), torch.float32, n_hist=9)
    with pytest.raises(ValueError, match="history"):
        _ops.triton_fn("sampler_step")(*args)


# --------------------------------------------------------------------------------------
# The public wrapper against a closed form
# --------------------------------------------------------------------------------------

def test_fused_step_ddim_against_closed_form(gen):
    # DDIM (eta = 0) from t to s with eps-prediction, per-sample coefficients, computed
    # independently in float64: x_s = alpha_s x0 + sigma_s eps, x0 = (x - sigma_t eps) / alpha_t.
    B = 3
    a_t = torch.rand(B, generator=gen, dtype=torch.float64) * 0.5 + 0.2
    a_s = torch.rand(B, generator=gen, dtype=torch.float64) * 0.3 + 0.7
    s_t, s_s = (1 - a_t ** 2).sqrt(), (1 - a_s ** 2).sqrt()
    x = torch.randn(B, 4, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(B, 4, 8, 8, generator=gen, dtype=torch.float64)
    c = StepCoeffs(B, n_out=2)
    c.convert(p_x=1 / a_t, p_m=-s_t / a_t, w_x=1 / a_t, w_m=-s_t / a_t)
    # x_s = alpha_s x0 + sigma_s (x - alpha_t x0) / sigma_t
    c.out(0, x=s_s / s_t, d=a_s - a_t * s_s / s_t)
    c.out(1, d=1.0)
    v = (-1, 1, 1, 1)
    x0 = (x - s_t.view(v) * eps) / a_t.view(v)
    x_s = a_s.view(v) * x0 + s_s.view(v) * eps
    for dtype in (torch.float64, torch.float32):
        out, x0_out = fused_step(x.to(dtype), eps.to(dtype), c.tensor(acc_dtype(dtype)), n_out=2)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.double(), x_s, **tol)
        torch.testing.assert_close(x0_out.double(), x0, **tol)


# --------------------------------------------------------------------------------------
# opcheck and autograd
# --------------------------------------------------------------------------------------

OPCHECK_CASES = [
    dict(shape=(2, 3, 4), dtype=torch.float32),
    dict(shape=(2, 3, 4), dtype=torch.float32, n_hist=2, n_out=3, cond=True, noise=True,
         x_base=True, clamp=True),
    dict(shape=(1, 5), dtype=torch.float64, n_hist=1, n_out=2, per_sample=False),
    dict(shape=(3, 2, 2), dtype=torch.bfloat16, n_hist=1, cond=True, noncontig=True),
    dict(shape=(3, 7), dtype=torch.float16, noise=True, clamp=True),
]


@needs_kernel
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(gen, case):
    kw = dict(case)
    args = make_case(gen, kw.pop("shape"), kw.pop("dtype"), **kw)
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args)


@needs_kernel
def test_not_differentiable_raises_on_backward(gen):
    # Registered with PyTorch's autograd-not-implemented fallback (csrc/cpu/step.cpp):
    # forward works on inputs that require grad, backward raises instead of silently
    # producing no gradient.
    args = list(make_case(gen, (2, 3, 4), torch.float32, n_hist=1, n_out=2))
    args[0] = args[0].clone().requires_grad_()
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, tuple(args),
                          test_utils="test_autograd_registration")
    outs = torch.ops.fastdiff.sampler_step(*args)
    assert outs[0].requires_grad
    plain = [args[0].detach()] + args[1:]
    assert_matches_ref([o.detach() for o in outs], plain)
    with pytest.raises(RuntimeError, match="not implemented"):
        outs[0].sum().backward()


# --------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------

def _good(gen, B=3):
    x = torch.randn(B, 4, 5, generator=gen)
    return dict(x=x, m=torch.randn(B, 4, 5, generator=gen),
                h=torch.randn(B, 4, 5, generator=gen),
                c=torch.randn(B, STEP_HEAD + 2 * step_n_basis(1), generator=gen))


BAD = [  # (name, change to the good arguments, error type at the API, op message)
    ("model_out shape", lambda a: a.update(m=a["m"][:, :3]), ValueError, "model_out has shape"),
    ("history shape", lambda a: a.update(h=a["h"][:2]), ValueError, r"history\[0\] has shape"),
    ("x_base dtype", lambda a: a.update(xb=a["x"].double()), TypeError, "x_base has dtype"),
    ("noise dtype", lambda a: a.update(nz=a["x"].half()), TypeError, "noise has dtype"),
    ("cond shape", lambda a: a.update(mc=a["x"][:, :, :2]), ValueError, "model_out_cond has shape"),
    ("coeffs width", lambda a: a.update(c=a["c"][:, :-1]), ValueError, "coeffs must have shape"),
    ("coeffs rows", lambda a: a.update(c=a["c"][:2]), ValueError, "coeffs must have shape"),
    ("coeffs 1-d", lambda a: a.update(c=a["c"][0]), ValueError, "coeffs must have shape"),
    ("coeffs dtype", lambda a: a.update(c=a["c"].double()), TypeError, "coeffs must be"),
    ("n_out 0", lambda a: a.update(n_out=0), ValueError, "n_out must be"),
    ("x int", lambda a: a.update(x=a["x"].int(), m=a["m"].int(), h=a["h"].int()), TypeError,
     "x must be"),
]


def _call_api(a):
    return fused_step(a["x"], a["m"], a["c"], x_base=a.get("xb"), model_out_cond=a.get("mc"),
                      history=[a["h"]], noise=a.get("nz"), n_out=a.get("n_out", 2))


def _call_op(a):
    return torch.ops.fastdiff.sampler_step(a["x"], a.get("xb"), a["m"], a.get("mc"), [a["h"]],
                                           a.get("nz"), a["c"], False, a.get("n_out", 2))


@pytest.mark.parametrize("name,change,api_error,op_message", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(gen, name, change, api_error, op_message):
    a = _good(gen)
    _call_api(a)  # the unchanged arguments are fine
    change(a)
    with pytest.raises(api_error):
        _call_api(a)
    if _ops.has_kernel("sampler_step", "cpu"):
        with pytest.raises(RuntimeError, match=op_message):
            _call_op(a)


def test_bad_device_at_api(gen):
    # Only one real device here; a meta tensor stands in for "another device" (the raw
    # op would dispatch it to the fake kernel, so only the API check is testable).
    a = _good(gen)
    a["h"] = a["h"].to("meta")
    with pytest.raises(ValueError, match="history"):
        _call_api(a)
    a = _good(gen)
    a["c"] = a["c"].to("meta")
    with pytest.raises(ValueError, match="coeffs"):
        _call_api(a)


# --------------------------------------------------------------------------------------
# sampler_step.out: outputs written into given tensors, which may be the inputs
# --------------------------------------------------------------------------------------

def out_case(args, alias):
    """Outputs for ``args`` (a make_case tuple) and the arguments as the op must see
    them. ``alias``: output o is the o-th of [x, history..., model_out, noise] (made
    contiguous first: only exact aliases are allowed); fresh outputs are NaN-poisoned."""
    x, x_base, m, mc, hist, noise, coeffs, clamp, n_out = args
    x, m = x.contiguous(), m.contiguous()
    hist = [h.contiguous() for h in hist]
    noise = noise.contiguous() if noise is not None else None
    pool = [x] + hist + [m] + ([noise] if noise is not None else [])
    out = [pool[o] if alias and o < len(pool) else torch.full_like(x, float("nan"))
           for o in range(n_out)]
    return out, (x, x_base, m, mc, hist, noise, coeffs, clamp)


def run_out(kernel, args, alias):
    """Run an out kernel; return (outputs, the reference computed before it ran)."""
    out, inputs = out_case(args, alias)
    want = step_ref(*inputs, len(out))  # new tensors: the kernel cannot overwrite them
    kernel(*inputs, out=out)
    return out, want


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], (2, 3, 129, 131)], ids=str)
@pytest.mark.parametrize("n_hist", [0, 1, 3, 5])
def test_cpu_out_kernel_in_place(gen, dtype, shape, n_hist):
    # Every feature combination with 1..4 outputs, each output either fresh or one of the
    # inputs (x, the history, the model output, the noise): the one-pass loops, the
    # several-pass ones (float64, 3+ outputs, 5 history terms) and the widened half types.
    op = torch.ops.fastdiff.sampler_step.out
    for i, (cond, noise, x_base, clamp, n_out) in enumerate(
            itertools.product([False, True], [False, True], [False, True], [False, True],
                              [1, 2, 3, 4])):
        args = make_case(gen, shape, dtype, n_hist=n_hist, n_out=n_out, cond=cond, noise=noise,
                         x_base=x_base, clamp=clamp, per_sample=i % 2 == 0,
                         noncontig=i % 3 == 0)
        for alias in (False, True):
            out, want = run_out(op, args, alias)
            for o, w in zip(out, want):
                assert bool(torch.isfinite(o).all()), "an output element was not written"
                torch.testing.assert_close(o, w, **TOL[dtype])


@needs_kernel
def test_out_equals_functional_bitwise(gen):
    # The in-place step is the same arithmetic as the functional one, bit for bit.
    for dtype in DTYPES:
        args = make_case(gen, (3, 4, 17, 9), dtype, n_hist=2, n_out=2, noise=True, x_base=True)
        fresh = torch.ops.fastdiff.sampler_step(*args)
        out, _ = run_out(torch.ops.fastdiff.sampler_step.out, args, alias=True)
        for a, b in zip(out, fresh):
            assert torch.equal(a, b)


def test_out_reference_in_place(gen):
    # The reference serves when the extension is missing: it must alias correctly too.
    for n_out in (1, 2, 3):
        args = make_case(gen, (2, 3, 5), torch.float32, n_hist=2, n_out=n_out, cond=True)
        out, want = run_out(_ops.step_out_ref, args, alias=True)
        for o, w in zip(out, want):
            torch.testing.assert_close(o, w, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_out_kernel_in_place(gen, dtype):
    kernel = _ops.triton_fn("sampler_step.out")
    for i, (n_hist, n_out, cond, noise, x_base, clamp) in enumerate(TRITON_CASES):
        if n_out > _ops.STEP_MAX_ALIAS_OUT:
            continue
        args = make_case(gen, (3, 2, 33), dtype, n_hist=n_hist, n_out=n_out, cond=cond,
                         noise=noise, x_base=x_base, clamp=clamp, per_sample=i % 2 == 0)
        for alias in (False, True):
            out, want = run_out(kernel, args, alias)
            for o, w in zip(out, want):
                torch.testing.assert_close(o, w, **TOL[dtype])


def test_fused_step_out_routes_to_triton(gen, triton_backend):
    args = make_case(gen, (2, 3, 5), torch.float32, n_hist=1, n_out=2, cond=True)
    x, x_base, m, mc, hist, noise, coeffs, clamp, n_out = args
    want = step_ref(*args)
    got = fused_step(x, m, coeffs, model_out_cond=mc, history=hist, n_out=2, out=[x, hist[0]])
    assert got[0] is x and got[1] is hist[0]
    for o, w in zip(got, want):
        torch.testing.assert_close(o, w, **TOL[torch.float32])


@needs_kernel
def test_fused_step_out_compiles_fullgraph(gen):
    # The mutation is declared in the schema (Tensor(a!)[] out), so torch.compile
    # functionalizes it and writes the results back into the given tensors.
    args = make_case(gen, (2, 3, 8, 8), torch.float32, n_hist=1, n_out=2, per_sample=False)
    x, _, m, _, hist, _, coeffs, _, _ = args
    want = step_ref(*args)

    def f(x, m, h, c):
        fused_step(x, m, c, history=[h], n_out=2, out=[x, h])
        return x + 0

    xx, hh = x.clone(), hist[0].clone()
    r = torch.compile(f, fullgraph=True, backend="eager")(xx, m, hh, coeffs)
    for got, w in ((xx, want[0]), (hh, want[1]), (r, want[0])):
        torch.testing.assert_close(got, w, **TOL[torch.float32])


@needs_kernel
@pytest.mark.parametrize("case", OPCHECK_CASES[:3])
def test_opcheck_out(gen, case):
    kw = dict(case)
    args = make_case(gen, kw.pop("shape"), kw.pop("dtype"), **kw)
    x, n_out = args[0], args[-1]
    out = [torch.empty(x.shape, dtype=x.dtype) for _ in range(n_out)]
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.out, args[:-1], {"out": out})


BAD_OUT = [  # (name, outputs from (x, x shifted by one element, h, fresh), message)
    ("partial overlap", lambda x, xs, h, f: [xs, f()], r"out\[0\] partially overlaps x"),
    ("outputs overlap", lambda x, xs, h, f: [h, h], r"out\[1\] overlaps out\[0\]"),
    ("shape", lambda x, xs, h, f: [f()[:2], f()], r"out\[0\] must be like x"),
    ("dtype", lambda x, xs, h, f: [f().double(), f()], r"out\[0\] must be like x"),
    ("not contiguous", lambda x, xs, h, f: [f(), f().transpose(1, 2).contiguous().transpose(1, 2)],
     r"out\[1\] must be contiguous"),
    ("too many aliased", lambda x, xs, h, f: [x, f(), f(), f(), f()], "n_out <= 4"),
]


@pytest.mark.parametrize("name,outs,message", BAD_OUT, ids=[b[0] for b in BAD_OUT])
def test_bad_out_arguments(gen, name, outs, message):
    a = _good(gen)
    buf = torch.randn(a["x"].numel() + 1, generator=gen)  # x, and a view one element later
    x, xs = buf[:-1].view(a["x"].shape), buf[1:].view(a["x"].shape)
    out = outs(x, xs, a["h"], lambda: torch.empty_like(x))
    c = torch.randn(3, STEP_HEAD + len(out) * step_n_basis(1), generator=gen)
    with pytest.raises(ValueError, match=message):
        fused_step(x, a["m"], c, history=[a["h"]], n_out=len(out), out=out)
    if _ops.has_kernel("sampler_step.out", "cpu"):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastdiff.sampler_step.out(x, None, a["m"], None, [a["h"]], None, c, False,
                                                out=out)


# --------------------------------------------------------------------------------------
# Half types: bit for bit
# --------------------------------------------------------------------------------------

def bits(t):
    return t.contiguous().view(torch.int16)


# Element counts per sample around the 16-lane vectors and 512-element chunks of the CPU
# kernel (tails of every length class), batch 1 and several samples per parallel task.
EXACT_SHAPES = [(1, 1), (1, 15), (2, 17), (3, 511), (1, 513), (2, 1027), (1, 3, 129, 131)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_kernel_bitwise_float32_rounded_once(gen, dtype):
    # The kernel's contract for half storage: widen exactly, compute in float32 in the
    # reference's order (no FMA), round once to nearest even on store. step_ref computes
    # that same float32 value and rounds it once, so the bits must agree exactly (the
    # tolerance of assert_matches_ref is for other backends); for finite data an absent
    # x_base / noise term (which the kernel skips and the reference adds as 0) changes no bit.
    cases = itertools.product([False, True], [False, True], [False, True], [False, True],
                              [1, 2, 3], [0, 1, 4])
    for i, (cond, noise, x_base, clamp, n_out, n_hist) in enumerate(cases):
        shape = EXACT_SHAPES[i % len(EXACT_SHAPES)]
        args = make_case(gen, shape, dtype, n_hist=n_hist, n_out=n_out, cond=cond, noise=noise,
                         x_base=x_base, clamp=clamp, per_sample=i % 2 == 0,
                         noncontig=i % 3 == 0)
        outs = torch.ops.fastdiff.sampler_step(*args)
        for o, w in zip(outs, step_ref(*args)):
            assert torch.equal(bits(o), bits(w)), (shape, cond, noise, x_base, clamp, n_out, n_hist)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_kernel_in_place_bitwise(gen, dtype):
    # sampler_step.out with x_next over x and the second output over a history tensor
    # (what fastdiff.sample does): the same bits as the functional op.
    for shape in EXACT_SHAPES:
        args = list(make_case(gen, shape, dtype, n_hist=1, n_out=2, cond=True, noise=True))
        want = torch.ops.fastdiff.sampler_step(*args)
        x, hist = args[0].contiguous().clone(), [args[4][0].contiguous().clone()]
        args[0], args[4] = x, hist
        torch.ops.fastdiff.sampler_step.out(*args[:-1], out=[x, hist[0]])
        assert torch.equal(bits(x), bits(want[0])) and torch.equal(bits(hist[0]), bits(want[1]))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_kernel_nan_inf_and_rounding_edges(gen, dtype):
    # x_next = x + m / 2 on half values x, m whose exponents differ by 0..12: exact in
    # float32, with more bits than the half type holds, so the store alone rounds (exact
    # ties among them); magnitudes from float16 subnormals to overflow, and NaN inputs.
    # Compared with torch's own float32 -> half conversion; NaN stores as c10 does
    # (bfloat16: the single quiet NaN 0x7FC0; float16: a quiet NaN).
    n = 4099
    top = 60000.0 if dtype == torch.float16 else 3e38
    mag = torch.logspace(-7, math.log10(top), n)[torch.randperm(n, generator=gen)]
    x = (torch.randn(n, generator=gen).sign() * mag).to(dtype)
    shift = torch.randint(0, 13, (n,), generator=gen).float()
    m = (x.float() * torch.randn(n, generator=gen).sign() * torch.exp2(-shift)).to(dtype)
    m[3::50] = float("nan")
    big = torch.finfo(dtype).max
    # sums that overflow the half type (to +Inf and -Inf) and two large ones that do not
    x[:4] = torch.tensor([big, -big, big, big / 2]).to(dtype)
    m[:4] = torch.tensor([big, -big, -big / 4, big / 2]).to(dtype)
    coeffs = torch.zeros(1, STEP_HEAD + step_n_basis(0))
    coeffs[0, 5], coeffs[0, 6] = 1.0, 0.5      # d = x + 0.5 m
    coeffs[0, STEP_HEAD + 2] = 1.0             # x_next = d
    out = torch.ops.fastdiff.sampler_step(x.reshape(1, n), None, m.reshape(1, n), None, [],
                                          None, coeffs, False, 1)[0].reshape(n)
    want_f = x.float() + 0.5 * m.float()
    nan = torch.isnan(want_f)
    low = want_f.view(torch.int32) & (0xFFFF if dtype == torch.bfloat16 else 0x1FFF)
    tie = 0x8000 if dtype == torch.bfloat16 else 0x1000
    assert bool((low == tie).any()) and bool(torch.isinf(want_f.to(dtype)).any())
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(bits(out[~nan]), bits(want_f[~nan].to(dtype)))
    if dtype == torch.bfloat16:
        assert bool((bits(out[nan]) == 0x7FC0).all())
    else:
        assert bool(((bits(out[nan]) & 0x7E00) == 0x7E00).all())  # exponent all ones, quiet


# Per-sample sizes around the CPU kernel's vector blocks (16 float16 / 32 bfloat16 values)
# and 512-element chunks: whole blocks, every kind of short tail, one value past.
BLOCK_SIZES = [16, 31, 32, 33, 47, 64, 65, 512, 1000]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_kernel_block_tails_bitwise(gen, dtype):
    # Both loops of the kernel: the one that forms d itself (no guidance, no clamp: a whole
    # sample in one piece) and the one that reads d from the chunk buffer (guidance and
    # clamp), with one and two outputs and 1-4 history terms; functional and in place
    # (x_next over x, the second output over a history tensor): the reference's bits.
    cases = itertools.product(BLOCK_SIZES, [False, True], [1, 2])
    for i, (size, buffered, n_out) in enumerate(cases):
        args = list(make_case(gen, (2, size), dtype, n_hist=1 + i % 4, n_out=n_out,
                              cond=buffered, clamp=buffered, noise=True, x_base=True,
                              per_sample=i % 2 == 0))
        want = step_ref(*args)
        for o, w in zip(torch.ops.fastdiff.sampler_step(*args), want):
            assert torch.equal(bits(o), bits(w)), (size, buffered, n_out)
        x, hist = args[0].clone(), [h.clone() for h in args[4]]
        args[0], args[4] = x, hist
        out = [x, hist[0]][:n_out]
        torch.ops.fastdiff.sampler_step.out(*args[:-1], out=out)
        for o, w in zip(out, want):
            assert torch.equal(bits(o), bits(w)), ("in place", size, buffered, n_out)


def bf16_bits_closed_form(f):
    """float32 -> bfloat16 bits, round to nearest even on the integer bits (exact for
    subnormals and overflow), NaN -> 0x7FC0: c10's rule, written out independently."""
    u = f.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(torch.isnan(f), torch.full_like(r, 0x7FC0), r)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_kernel_special_values_per_block(gen, dtype):
    # The bfloat16 store rounds a block of 32 values with the CPU's conversion instruction
    # unless one of them is a NaN or a float32 subnormal (which that instruction gets
    # wrong), then with integer arithmetic: blocks of normal values (with Inf among them),
    # blocks with one NaN, blocks of subnormals, mixed, across one sample (x_next over x in
    # place too). float16 runs the same data (subnormal float32 values flush to zero there).
    n_blocks = 48
    n = 32 * n_blocks + 19  # and a partial block
    x = torch.randn(n, generator=gen)
    m = torch.randn(n, generator=gen)
    kind = torch.arange(n) // 32 % 4
    tiny = torch.finfo(torch.float32).tiny
    x[kind == 1] *= tiny / 7         # float32 subnormals (bfloat16 keeps them)
    m[kind == 1] *= tiny / 3
    x[kind == 3] *= tiny * 2         # results on both sides of the subnormal boundary
    m[kind == 3] *= tiny
    pick = torch.randint(0, 32, (n_blocks + 1,), generator=gen)
    pos = (torch.arange(n_blocks + 1) * 32 + pick).clamp(max=n - 1)
    nan_at = pos[kind[pos] == 2]
    m[nan_at] = float("nan")          # one NaN in each such block
    inf_at = pos[kind[pos] == 0]
    x[inf_at] = float("inf") * torch.randn(len(inf_at), generator=gen).sign()
    x, m = x.to(dtype), m.to(dtype)
    coeffs = torch.zeros(1, STEP_HEAD + step_n_basis(0))
    coeffs[0, 5], coeffs[0, 6] = 1.0, 0.5                        # d = x + 0.5 m
    coeffs[0, STEP_HEAD + 0], coeffs[0, STEP_HEAD + 2] = 0.25, 1.0  # x_next = 0.25 x + d
    args = (x.reshape(1, n), None, m.reshape(1, n), None, [], None, coeffs, False, 1)
    out = torch.ops.fastdiff.sampler_step(*args)[0].reshape(n)
    xf, mf = x.float(), m.float()
    want_f = 0.25 * xf + (1.0 * xf + 0.5 * mf)  # the kernel's order of float32 operations
    assert bool(torch.isnan(want_f).any()) and bool(torch.isinf(want_f).any())
    if dtype == torch.bfloat16:
        assert bool((want_f.abs() < tiny).logical_and(want_f != 0).any())  # subnormal results
        assert torch.equal(bits(out).to(torch.int64) & 0xFFFF, bf16_bits_closed_form(want_f))
    else:
        nan = torch.isnan(want_f)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(bits(out[~nan]), bits(want_f[~nan].to(dtype)))
    xi = x.reshape(1, n).clone()
    torch.ops.fastdiff.sampler_step.out(xi, *args[1:-1], out=[xi])
    assert torch.equal(bits(xi), bits(out.reshape(1, n)))


# --------------------------------------------------------------------------------------
# Outputs whose row selects d alone (the stored data estimate of multistep samplers)
# --------------------------------------------------------------------------------------

# (n_hist, n_out, d outputs, cond, noise, x_base, clamp): the CPU kernel's routes: the
# joint two-output pass with d last, d formed in the chunk buffer (guidance, clamp), with
# x_base / noise present, d first, one output (with noise; alone: deterministic DDIM),
# history past the four fused terms, d between two sums.
D_ROW_CASES = [
    (1, 2, (1,), False, False, False, False),
    (4, 2, (1,), False, False, False, False),
    (0, 2, (1,), False, False, False, False),
    (2, 2, (1,), True, False, False, True),
    (1, 2, (1,), False, True, True, False),
    (3, 2, (0,), False, False, False, False),
    (0, 1, (0,), False, True, False, False),
    (2, 1, (0,), False, False, False, False),
    (6, 2, (1,), False, False, False, False),
    (2, 3, (1,), True, True, False, False),
]


def d_row_case(gen, shape, dtype, n_hist, n_out, d_outs, cond, noise, x_base, clamp):
    """make_case with the rows of `d_outs` set to 1 on d and 0 elsewhere for every sample
    but the last (per-sample rows: one sample keeps the full sum), and values the full
    sum would not pass through: Inf and NaN in x_base, noise and the history, and zeros in
    x and the model output that make d = -0 (no guidance, no clamp: d = w_x x + w_m m)."""
    args = list(make_case(gen, shape, dtype, n_hist=n_hist, n_out=n_out, cond=cond, noise=noise,
                          x_base=x_base, clamp=clamp, per_sample=True))
    coeffs = args[6]
    nb = step_n_basis(n_hist)
    coeffs[:, 5:7] = coeffs[:, 5:7].abs()  # w_x, w_m > 0: -0 * w = -0, and -0 + -0 = -0
    for o in d_outs:
        coeffs[:-1, STEP_HEAD + o * nb:STEP_HEAD + (o + 1) * nb] = 0.0
        coeffs[:-1, STEP_HEAD + o * nb + 2] = 1.0
    S = args[0][0].numel()
    specials = [float("inf"), float("-inf"), float("nan")]
    for t in [args[1], args[5], *args[4]]:
        if t is not None:
            flat = t.view(t.shape[0], -1)
            for j, v in enumerate(specials):
                flat[:, (7 * j + 3) % S::29] = v
    if not cond and not clamp:
        for t in (args[0], args[2]):
            t.view(t.shape[0], -1)[:, 5 % S::31] = -0.0
    return tuple(args)


def assert_same_values(out, want, bitwise=True):
    """Bit for bit (else equal values: the sign of a zero may differ), NaN where the
    reference has NaN (whose payload is not specified)."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan)
    if not bitwise:
        assert torch.equal(out[~nan], want[~nan])
        return
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]
    assert torch.equal(out[~nan].view(int_type), want[~nan].view(int_type))


def assert_d_row_outputs(outs, want, d_outs):
    # Outputs that are d (all samples but the last): bit for bit. The rest are full sums,
    # where the reference adds its absent terms as c * 0 and the kernels skip them, so a
    # -0 sum may come out +0 there.
    for o, (out, w) in enumerate(zip(outs, want)):
        assert_same_values(out[:-1], w[:-1], bitwise=o in d_outs)
        assert_same_values(out[-1:], w[-1:], bitwise=False)


def test_reference_output_selecting_d_is_d(gen):
    args = d_row_case(gen, (3, 64), torch.float32, 1, 2, (1,), False, False, False, False)
    x, _, m, _, hist, _, coeffs, _, _ = args
    d = coeffs[:, 5:6] * x + coeffs[:, 6:7] * m
    out = step_ref(*args)[1]
    assert_same_values(out[:-1], d[:-1])
    assert bool((torch.signbit(d[:-1]) & (d[:-1] == 0)).any())  # a -0 d kept as -0
    assert bool(torch.isnan(out[-1]).any())  # the last sample's full sum: 0 * Inf
    # The sum over the row gives +0 where d is -0 (-0 + 0 * h): the two really differ.
    dense = 0.0 * x + 1.0 * d + 0.0 * hist[0]
    assert not torch.equal(torch.signbit(dense[:-1]), torch.signbit(d[:-1]))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", D_ROW_CASES, ids=lambda c: f"h{c[0]}-o{c[1]}-d{c[2][0]}")
def test_cpu_kernel_output_selecting_d(gen, dtype, case):
    for size in (45, 1000):  # a tail of the vector blocks; several blocks and chunks
        args = d_row_case(gen, (3, size), dtype, *case)
        want = step_ref(*args)
        poison(torch.ops.fastdiff.sampler_step, args)
        assert_d_row_outputs(torch.ops.fastdiff.sampler_step(*args), want, case[2])
        # In place: x_next over x, the next outputs over the history tensors.
        if len(args[4]) >= args[8] - 1:
            x, hist = args[0].clone(), [h.clone() for h in args[4]]
            call = (x,) + args[1:4] + (hist,) + args[5:8]
            out = [x] + hist[:args[8] - 1]
            torch.ops.fastdiff.sampler_step.out(*call, out=out)
            assert_d_row_outputs(out, want, case[2])



@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_several_outputs_selecting_d(gen, dtype):
    # Several d outputs (of six; of four in place, over x, the model output and history
    # tensors), eight history terms, -0 coefficients on the other terms (zero too),
    # vector-block edges and a size split into parallel tasks.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for case in ((8, 6, (0, 2, 5), True, True, True, False), (8, 4, (0, 3), False, False, False, False)):
            for size in (17, 513, 40000):
                args = d_row_case(gen, (3, size), dtype, *case)
                nb = step_n_basis(8)
                for o in case[2]:
                    present = [0, 4, 11] + [j for j, on in ((1, case[5]), (3, case[4])) if on]
                    args[6][:-1, STEP_HEAD + o * nb + torch.tensor(present)] = -0.0
                want = step_ref(*args)
                assert_d_row_outputs(torch.ops.fastdiff.sampler_step(*args), want, case[2])
                if case[1] > 4:
                    continue
                x, m, hist = args[0].clone(), args[2].clone(), [h.clone() for h in args[4]]
                out = [x, m, hist[7], hist[0]]
                torch.ops.fastdiff.sampler_step.out(x, args[1], m, args[3], hist, *args[5:8], out=out)
                assert_d_row_outputs(out, want, case[2])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernel_output_selecting_d(gen, dtype):
    kernel = _ops.triton_fn("sampler_step")
    for case in D_ROW_CASES:
        args = d_row_case(gen, (3, 45), dtype, *case)
        assert_d_row_outputs(kernel(*args), step_ref(*args), case[2])
