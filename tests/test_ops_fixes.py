"""Regressions of the op layer: large embedding arguments, unsigned timesteps, meta
tensors, the Triton backend under torch.compile, E-TSDM at t = +-inf, the bounded
embedding table cache and a lazy ``import fastdiff``."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

import fastdiff
from fastdiff import TimeSharing, _ops, embedding
from fastdiff.embedding import embedding_frequencies
from fastdiff.step import fused_step

op = torch.ops.fastdiff.timestep_embedding


def reference(t, dim, **kw):
    """fastdiff.timestep_embedding on the pure-torch reference backend."""
    old = _ops.get_backend()
    _ops.set_backend("reference")
    try:
        return fastdiff.timestep_embedding(t, dim, **kw)
    finally:
        _ops.set_backend(old)


def assert_close_nan(got, want, atol):
    """|got - want| <= atol, NaN exactly where want is NaN."""
    torch.testing.assert_close(got, want, atol=atol, rtol=0, equal_nan=True)


def large_t(gen, dtype, n=24):
    """|t| log-uniform in [1e6, 1e38] (float) or [1e6, 2^63) (int64), random signs,
    plus the extremes of the dtype."""
    if dtype == torch.int64:
        mag = 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 12.9 + 6)
        t = (mag * torch.randint(0, 2, (n,), generator=gen).mul(2).sub(1)).long()
        return torch.cat([t, torch.tensor([4545672449, 2 ** 63 - 1, -2 ** 63])])
    top = 38 if dtype == torch.float32 else 300
    mag = 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * (top - 6) + 6)
    t = (mag * torch.randint(0, 2, (n,), generator=gen).mul(2).sub(1)).to(dtype)
    return torch.cat([t, torch.tensor([1e16, 1e20, 1e30, torch.finfo(dtype).max], dtype=dtype)])


# ---------------------------------------------------------------------------------------
# Item 2: large arguments t * freq
# ---------------------------------------------------------------------------------------

def test_issue_reproducer_matches_diffusers():
    t = torch.tensor([4545672449])
    got = fastdiff.timestep_embedding(t, 2, downscale_freq_shift=0)
    want = get_timestep_embedding(t, 2, downscale_freq_shift=0)
    assert (got - want).abs().max().item() <= 1.2e-7


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64])
@pytest.mark.parametrize("dim,scale,flip", [(2, 1.0, False), (7, 1.0, True), (320, 2.5, True)])
def test_large_arguments_match_reference(gen, dtype, dim, scale, flip):
    t = large_t(gen, dtype)
    kw = dict(downscale_freq_shift=0, scale=scale, flip_sin_to_cos=flip)
    got = fastdiff.timestep_embedding(t, dim, **kw)
    want = reference(t, dim, **kw)
    # NaN only where scale * t * freq overflows to inf, as in the reference.
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isfinite(got[0]).all() and got.nan_to_num().abs().max() <= 1
    # Both are within an ulp of the true sin/cos of the float argument.
    assert_close_nan(got, want, 3e-7 if got.dtype == torch.float32 else 1e-15)


def test_large_arguments_in_derivative_mode(gen):
    t = large_t(gen, torch.float32)
    freqs = embedding_frequencies(64, 0.0)
    args = (freqs, None, 64, True, 1.5, 0.0, 0.0, True)
    got, want = op(t, *args), _ops.embedding_ref(t, *args)
    # d emb / dt = cos(a) * scale * freq: the error scales with scale * freq <= 1.5.
    assert_close_nan(got, want, 1.5 * 3e-7)
    # Forward AD goes through the same derivative kernel.
    def emb(x):
        return fastdiff.timestep_embedding(x, 64, flip_sin_to_cos=True, downscale_freq_shift=0,
                                           scale=1.5)

    _, jvp = torch.func.jvp(emb, (t,), (torch.ones_like(t),))
    assert_close_nan(jvp, want, 1.5 * 3e-7)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_t_as_reference(value):
    t = torch.tensor([value, 3.0])
    got = fastdiff.timestep_embedding(t, 8)
    torch.testing.assert_close(got, reference(t, 8), equal_nan=True, atol=2e-7, rtol=0)


def test_int64_extremes_with_sharing():
    # 2^63 - 1 must not pass through a double -> int64 conversion (it overflows).
    t = torch.tensor([2 ** 63 - 1, 2 ** 53 + 1, 2 ** 60 + 2 ** 36 + 1, 57])
    s = TimeSharing(100, 5)
    got = fastdiff.timestep_embedding(t, 6, sharing=s)
    want = get_timestep_embedding(s(t), 6)
    assert (got - want).abs().max().item() <= 2.4e-7


def test_triton_large_arguments(gen, triton_backend):
    t = large_t(gen, torch.float32, n=8)
    got = fastdiff.timestep_embedding(t, 16)
    _ops.set_backend("auto")
    want = reference(t, 16)
    assert (got - want).abs().max().item() <= 3e-7


# ---------------------------------------------------------------------------------------
# Unsigned timesteps
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("sharing", [None, TimeSharing(100, 5)])
def test_unsigned_t(gen, dtype, sharing):
    hi = {torch.uint8: 255, torch.uint16: 65535}.get(dtype, 2 ** 31)
    t = torch.randint(0, hi, (70,), generator=gen).to(dtype)  # 70 x 128: table rows
    t[:5] = torch.tensor([0, 19, 20, 99, 999 if hi > 999 else 200]).to(dtype)
    if dtype == torch.uint64:
        t[-1] = torch.tensor(2 ** 64 - 1, dtype=torch.uint64)  # above INT64_MAX: not a row
    got = fastdiff.timestep_embedding(t, 128, sharing=sharing)
    want = reference(t, 128, sharing=sharing)
    assert (got - want).abs().max().item() <= 3e-7
    small = fastdiff.timestep_embedding(t[:3], 128, sharing=sharing)  # computed, no table
    assert (small - want[:3]).abs().max().item() <= 3e-7


def test_triton_unsigned_t(gen, triton_backend):
    t = torch.randint(0, 2000, (9,), generator=gen).to(torch.uint32)
    got = fastdiff.timestep_embedding(t, 12)
    _ops.set_backend("auto")
    assert (got - reference(t, 12)).abs().max().item() <= 3e-7


# ---------------------------------------------------------------------------------------
# Meta tensors
# ---------------------------------------------------------------------------------------

def test_meta_tensors():
    t = torch.empty(5, device="meta")
    e = fastdiff.timestep_embedding(t, 33, sharing=TimeSharing(100, 5))
    assert e.device.type == "meta" and e.shape == (5, 33) and e.dtype == torch.float32
    ti = torch.empty(100, dtype=torch.int64, device="meta")  # table path
    assert fastdiff.timestep_embedding(ti, 8).shape == (100, 8)
    x = torch.empty(2, 3, device="meta")
    coeffs = torch.empty(1, _ops.STEP_HEAD + 2 * _ops.step_n_basis(0), device="meta")
    outs = fused_step(x, torch.empty_like(x), coeffs, n_out=2)
    assert [o.shape for o in outs] == [(2, 3), (2, 3)] and outs[0].device.type == "meta"
    n = _ops.call("diff_norm", x, torch.empty_like(x))
    assert n.shape == (2,) and n.device.type == "meta"
    assert _ops.has_kernel("timestep_embedding", "meta")
    assert not _ops.has_kernel("timestep_embedding", "not_a_device")


# ---------------------------------------------------------------------------------------
# Triton backend under torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------

def test_triton_compiles_fullgraph(gen, triton_backend):
    sharing = TimeSharing(100, 5)

    def f(t, x, m, c):
        e = fastdiff.timestep_embedding(t, 16, sharing=sharing)
        outs = fused_step(x, m, c, n_out=1)
        return e * 2, outs[0] + 1

    t = torch.rand(5, generator=gen) * 1000
    x, m = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    c = torch.randn(2, _ops.STEP_HEAD + _ops.step_n_basis(0), generator=gen)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(t, x, m, c)
    _ops.set_backend("reference")
    want = f(t, x, m, c)
    _ops.set_backend("triton")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Item 7: E-TSDM at t = +-inf
# ---------------------------------------------------------------------------------------

def test_etsdm_infinite_t_like_time_sharing(gen):
    seen = []

    def model(x, t):
        seen.append(t)
        return x

    wrapped = fastdiff.etsdm(model, 100, 5)
    t = torch.tensor([math.inf, -math.inf, math.nan, 57.5, 150.0])
    wrapped(torch.randn(5, generator=gen), t)
    torch.testing.assert_close(seen[-1], wrapped.time_sharing(t), equal_nan=True)
    # f's derivative stays 0 inside the shared range and 1 elsewhere.
    tg = torch.tensor([57.5, 150.0, math.inf], requires_grad=True)
    wrapped(torch.zeros(3), tg)
    seen[-1].sum().backward()
    assert tg.grad.tolist() == [0.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------
# The integer-t table: skipped for small batches, cache bounded by bytes
# ---------------------------------------------------------------------------------------

def test_small_batch_builds_no_table(gen):
    embedding._tables.clear()
    embedding._tables_bytes = 0
    t = torch.randint(0, 1000, (1,), generator=gen)
    got = fastdiff.timestep_embedding(t, 300_000)
    assert not embedding._tables  # a 1000 x 300000 table would be 1.2 GB
    assert (got - reference(t, 300_000)).abs().max().item() <= 3e-7
    # Below TABLE_MIN_ELEMENTS output elements the rows are computed, from it on copied.
    B = embedding.TABLE_MIN_ELEMENTS // 320
    fastdiff.timestep_embedding(t.repeat(B - 1), 320)
    assert not embedding._tables
    big = torch.randint(0, 1000, (B + 1,), generator=gen)
    got = fastdiff.timestep_embedding(big, 320)
    assert len(embedding._tables) == 1 and embedding._tables_bytes == 1000 * 320 * 4
    assert (got - reference(big, 320)).abs().max().item() <= 3e-7
    embedding._tables.clear()
    embedding._tables_bytes = 0


def test_table_cache_bounded_by_bytes(gen, monkeypatch):
    monkeypatch.setattr(embedding, "TABLE_CACHE_BYTES", 3 * 1000 * 64 * 4)  # three dim-64 tables
    embedding._tables.clear()
    embedding._tables_bytes = 0
    t = torch.randint(0, 1000, (embedding.TABLE_MIN_ELEMENTS // 64,), generator=gen)
    for k in range(6):
        got = fastdiff.timestep_embedding(t, 64, scale=1.0 + k)
        assert (got - reference(t, 64, scale=1.0 + k)).abs().max().item() <= 3e-7
        assert embedding._tables_bytes <= embedding.TABLE_CACHE_BYTES
    assert len(embedding._tables) == 3
    assert embedding._tables_bytes == sum(v.numel() * 4 for v in embedding._tables.values())
    # Least recently used goes first: scale 4 (used again) survives two new tables.
    fastdiff.timestep_embedding(t, 64, scale=4.0)
    fastdiff.timestep_embedding(t, 64, scale=10.0)
    fastdiff.timestep_embedding(t, 64, scale=11.0)
    assert [k[3] for k in embedding._tables] == [4.0, 10.0, 11.0]
    # A table larger than the whole budget is never built; the rows are computed.
    big = fastdiff.timestep_embedding(t, 4096)
    assert all(k[0] != 4096 for k in embedding._tables)
    assert (big - reference(t, 4096)).abs().max().item() <= 3e-7
    embedding._tables.clear()
    embedding._tables_bytes = 0


# ---------------------------------------------------------------------------------------
# numpy integers where ints are accepted; the compile marker; lazy import
# ---------------------------------------------------------------------------------------

def test_numpy_integers_accepted(gen):
    t = torch.randint(0, 1000, (3,), generator=gen)
    torch.testing.assert_close(fastdiff.timestep_embedding(t, np.int64(8)),
                               fastdiff.timestep_embedding(t, 8))
    s = TimeSharing(np.int32(100), np.int64(5))
    assert s == TimeSharing(100, 5) and s.discrete and type(s.n) is int
    assert TimeSharing(np.float64(0.1), 5) == TimeSharing.continuous(0.1, 5)
    assert fastdiff.SinusoidalEmbedding(np.int16(6)).num_channels == 6


def test_constant_result_marker_matches_torch():
    def f():
        return 1

    def g():
        return 1

    torch.compiler.assume_constant_result(f)
    _ops.constant_result(g)
    assert f.__dict__ == g.__dict__ == {"_dynamo_marked_constant": True}


def test_import_does_not_import_dynamo():
    code = "import sys, fastdiff; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_triton_step_backward_like_kernels(gen, triton_backend):
    # Through the dispatcher the Triton op keeps autograd's view of its inputs: fused_step
    # gives the same gradients on the Triton backend as on the reference, never silently
    # none (fused_step is differentiable on every backend).
    x = torch.randn(2, 3, generator=gen, requires_grad=True)
    m = torch.randn(2, 3, generator=gen, requires_grad=True)
    c = torch.randn(2, _ops.STEP_HEAD + _ops.step_n_basis(0), generator=gen)
    out = fused_step(x, m, c)[0]
    assert out.requires_grad
    w = torch.randn(2, 3, generator=gen)
    gx, gm = torch.autograd.grad((out * w).sum(), (x, m))
    _ops.set_backend("reference")
    rx, rm = torch.autograd.grad((fused_step(x, m, c)[0] * w).sum(), (x, m))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gm, rm)
