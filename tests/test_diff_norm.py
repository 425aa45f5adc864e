"""fastdiff::diff_norm (per-row ||a - b||_2): the C++ CPU kernel and the Triton kernel
(interpreted on CPU) against torch.linalg.vector_norm, accuracy on long rows, opcheck and
argument errors."""
import pytest
import torch

from fastdiff import _ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(3, 3, 7, 5), (1, 1, 1, 1), (5, 1001), (2, 3, 4100), (7,)]

# Kernel tests fail loudly (never skip) when the compiled extension is missing.
needs_kernel = pytest.mark.usefixtures("compiled_kernels")


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def oracle(a, b):
    """torch.linalg.vector_norm of the difference, in float64 (then the op's dtype)."""
    d = (a.double() - b.double()).reshape(a.shape[0], -1)
    return torch.linalg.vector_norm(d, dim=1).to(acc_dtype(a.dtype))


def pair(gen, shape, dtype, noncontig):
    if noncontig and len(shape) >= 2:
        a = torch.randn(shape[:-2] + (shape[-1], shape[-2]), generator=gen).to(dtype)
        a = a.transpose(-1, -2)
        b = torch.randn(shape[0] * 2, *shape[1:], generator=gen).to(dtype)[::2]
        return a, b
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def tol(dtype):
    # Differences of half-type inputs are exact in float32, so every dtype but float64 is
    # held to float32 summation accuracy.
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("noncontig", [False, True])
def test_cpu_kernel_matches_vector_norm(gen, dtype, shape, noncontig):
    a, b = pair(gen, shape, dtype, noncontig)
    out = torch.ops.fastdiff.diff_norm(a, b)
    assert out.shape == (shape[0],) and out.dtype == acc_dtype(dtype)
    torch.testing.assert_close(out, oracle(a, b), **tol(dtype))
    torch.testing.assert_close(out, _ops.diff_norm_ref(a, b), **tol(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_kernel_bitwise_equals_float32_kernel(gen, dtype):
    # Half inputs widen exactly and then sum like float32 inputs (same lanes, same order),
    # however the kernel converts them: the same bits as on the widened copies. Rows of
    # odd lengths around the lane count, the conversion pieces and the 4096-element blocks.
    for shape in [(1, 1), (3, 31), (2, 32), (2, 513), (1, 4097), (1, 4096 + 33),
                  (2, 3, 77, 79)]:
        a, b = pair(gen, shape, dtype, noncontig=len(shape) > 2)
        out = torch.ops.fastdiff.diff_norm(a, b)
        want = torch.ops.fastdiff.diff_norm(a.float(), b.float())
        assert torch.equal(out.view(torch.int32), want.view(torch.int32)), shape


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_kernel_special_values_bitwise(gen, dtype):
    # Rows with subnormal, huge (bfloat16: squares beyond float32's range), Inf and NaN
    # values among normal ones: the half kernel's bits are the float32 kernel's on the
    # widened copies (a NaN row is NaN in both).
    n = 4096 + 77
    a, b = torch.randn(6, n, generator=gen), torch.randn(6, n, generator=gen)
    tiny = torch.finfo(dtype).tiny
    a[1] *= tiny
    b[1] *= tiny / 3                                  # subnormal differences
    a[2, ::97] = torch.finfo(dtype).max / 2
    a[3, 5], b[3, 700] = float("inf"), float("-inf")
    a[4, 33], b[4, 4100] = float("nan"), float("nan")
    b[5, ::50] = float("nan")
    a, b = a.to(dtype), b.to(dtype)
    out = torch.ops.fastdiff.diff_norm(a, b)
    want = torch.ops.fastdiff.diff_norm(a.float(), b.float())
    assert bool(torch.isinf(out[3])) and torch.isnan(out[4:]).all()
    assert bool(torch.isinf(out[2])) == (dtype == torch.bfloat16)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(out[:4].view(torch.int32), want[:4].view(torch.int32))
    torch.testing.assert_close(out[:2], oracle(a, b)[:2], **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_triton_kernel_matches_vector_norm(gen, dtype, shape):
    a, b = pair(gen, shape, dtype, noncontig=True)
    out = _ops.triton_fn("diff_norm")(a, b)
    assert out.shape == (shape[0],) and out.dtype == acc_dtype(dtype)
    torch.testing.assert_close(out, oracle(a, b), **tol(dtype))


@needs_kernel
def test_long_row_accuracy(gen):
    # 2^23 + 5 elements in one row (thousands of blocks, split across threads): float32
    # accumulation in one running sum would lose ~1e-4 relative here; the blocked scheme
    # stays at float32 rounding level. Also identical norms for identical rows, whatever
    # the split between threads.
    n = (1 << 23) + 5
    a = torch.randn(1, n, generator=gen)
    b = torch.randn(1, n, generator=gen)
    out = torch.ops.fastdiff.diff_norm(torch.cat([a, a]), torch.cat([b, b]))
    torch.testing.assert_close(out, oracle(a, b).expand(2), rtol=1e-6, atol=0)
    assert out[0] == out[1]


@needs_kernel
def test_opcheck(gen):
    for shape, dtype in [((2, 3, 4), torch.float32), ((1, 9), torch.float64),
                         ((3, 5), torch.bfloat16), ((4, 2, 2), torch.float16)]:
        a, b = pair(gen, shape, dtype, noncontig=False)
        torch.library.opcheck(torch.ops.fastdiff.diff_norm.default, (a, b))
    a = a.clone().requires_grad_()
    torch.library.opcheck(torch.ops.fastdiff.diff_norm.default, (a, b),
                          test_utils="test_autograd_registration")
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.ops.fastdiff.diff_norm(a, b).sum().backward()


@needs_kernel
@pytest.mark.parametrize("a,b,message", [
    (torch.zeros(2, 3), torch.zeros(2, 4), "shape"),
    (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), "dtype"),
    (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32), "float32"),
    (torch.zeros(()), torch.zeros(()), "shape"),
])
def test_bad_arguments(a, b, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastdiff.diff_norm(a, b)
    with pytest.raises((ValueError, TypeError), match=message):
        _ops.triton_fn("diff_norm")(a, b)
