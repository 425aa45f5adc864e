"""fastdiff::group_norm_tangent (the forward-mode tangent of group_norm from the primal's
per-group statistics) against torch's own forward-AD rule for group_norm."""
import pytest
import torch
import torch.nn.functional as F

from fastdiff import _ops

op = torch.ops.fastdiff.group_norm_tangent.default

# (shape, groups): spatial maps with odd sizes, tokens [N, C, L], no spatial dims, batch 1
CASES = [((3, 8, 5, 7), 4), ((2, 12, 33), 3), ((4, 6), 2), ((1, 32, 16, 16), 8)]


def _case(gen, shape, groups, dtype, affine=True, offset=0.0):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) + offset
    dx = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.randn(shape[1], generator=gen, dtype=torch.float64) if affine else None
    return x.to(dtype), dx.to(dtype), w


def _torch_jvp(x, dx, groups, w):
    """torch's forward-AD rule in float64 (on contiguous x: it fails on channels-last)."""
    w64 = None if w is None else w.double()
    return torch.func.jvp(lambda a: F.group_norm(a, groups, w64, None, 1e-5),
                          (x.double().contiguous(),), (dx.double(),))[1]


def _stats(x, groups, w):
    N, C = x.shape[:2]
    _, mean, rstd = torch.native_group_norm(x, None if w is None else w.to(x.dtype), None, N, C,
                                            x.numel() // (N * C), groups, 1e-5)
    return mean, rstd


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_forward_ad(gen, case, dtype):
    shape, groups = case
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}
    # With a handful of elements per group the tangent (dx less its group mean and its
    # projection on the normalised x) cancels down to the rounding of the half-precision
    # statistics: against torch's float64 it is off by up to 10% (fp16) / 45% (bf16) of its
    # largest value in 400 draws of (4, 6) with groups of 3, for the kernel and the
    # reference alike. There the kernel is held to the reference in the same precision.
    small = dtype in (torch.float16, torch.bfloat16) and x_per_group(shape, groups) < 32
    for affine in (True, False):
        x, dx, w = _case(gen, shape, groups, dtype, affine)
        mean, rstd = _stats(x, groups, w)
        want = _ops.group_norm_tangent_ref(x, dx, mean, rstd, w, groups).double() if small \
            else _torch_jvp(x, dx, groups, w)
        for fn in (op,) if small else (op, _ops.group_norm_tangent_ref):
            got = fn(x, dx, mean, rstd, w, groups)
            assert got.dtype == dtype and got.shape == x.shape
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err.item() <= tol[dtype], (fn, affine, err.item())


def x_per_group(shape, groups):
    n = 1
    for d in shape[1:]:
        n *= d
    return n // groups


def test_channels_last_strided_and_offset(gen):
    # a channels-last x, a transposed dx, and a mean 400 standard deviations from 0 (the
    # statistics from float64: torch's float32 variance loses ~1% to cancellation there)
    x, dx, w = _case(gen, (2, 8, 6, 6), 4, torch.float32, offset=40.0)
    x = (40 + 0.1 * (x - 40)).to(memory_format=torch.channels_last)
    dx = dx.transpose(2, 3).contiguous().transpose(2, 3)
    mean, rstd = (s.float() for s in _stats(x.double(), 4, w))
    want = _torch_jvp(x, dx, 4, w)
    got = op(x, dx, mean, rstd, w, 4)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 5e-5


def test_opcheck(gen):
    x, dx, w = _case(gen, (2, 6, 3, 5), 3, torch.float32)
    mean, rstd = _stats(x, 3, w)
    torch.library.opcheck(op, (x, dx, mean, rstd, w, 3))


def test_bad_input(gen):
    x, dx, w = _case(gen, (2, 6, 3, 5), 3, torch.float32)
    mean, rstd = _stats(x, 3, w)
    with pytest.raises(ValueError, match="divide the 6 channels"):
        op(x, dx, mean, rstd, w, 4)
    with pytest.raises(ValueError, match="x's shape"):
        op(x, dx[:1], mean, rstd, w, 3)
    with pytest.raises(ValueError, match="N \\* groups"):
        op(x, dx, mean[:1], rstd, w, 3)
    with pytest.raises(TypeError, match="dtype"):
        op(x, dx.double(), mean, rstd, w, 3)
    with pytest.raises(ValueError, match="weight must have 6"):
        op(x, dx, mean, rstd, w[:5], 3)
