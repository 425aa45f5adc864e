"""The fused timestep embedding against diffusers' ``get_timestep_embedding`` (the oracle),
the pure-torch reference, the Triton kernel (interpreted on CPU), and under autograd,
torch.func and torch.compile."""

import warnings

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

import fastdiff
from fastdiff import TimeSharing, _ops
from fastdiff.embedding import embedding_frequencies
from fastdiff.triton.embedding import timestep_embedding as triton_embedding

op = torch.ops.fastdiff.timestep_embedding

INT_DTYPES = (torch.int64, torch.int32)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DIMS = (1, 2, 7, 320, 1281)
# (flip_sin_to_cos, downscale_freq_shift, scale, max_period)
OPTIONS = ((False, 1.0, 1.0, 10000.0), (True, 0.0, 1.0, 10000.0), (True, 1.0, 2.5, 10000.0),
           (False, 0.0, 0.7, 100.0))
SHARINGS = (None, TimeSharing(100, 5), TimeSharing(1000, 8), TimeSharing.continuous(0.1, 5))


def random_t(dtype, B, sharing, gen):
    """[B] timesteps drawn fresh, as a strided (non-contiguous) view. Integer t covers
    negatives and t >= 1000 (outside the cached table); float t lies in [0, 1] for
    continuous sharing and in [-50, 1500) otherwise."""
    n = 2 * B
    if not dtype.is_floating_point:
        t = torch.randint(-50, 1500, (n,), generator=gen).to(dtype)
    elif sharing is not None and not sharing.discrete:
        t = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    else:
        t = (torch.rand(n, generator=gen, dtype=torch.float64) * 1550 - 50).to(dtype)
    return t[::2]


def cases():
    """(dtype, dim, sharing) for the correctness matrix; continuous sharing only with
    float t, and shift 1 only where dim // 2 != 1 (diffusers divides by dim // 2 - shift)."""
    for dtype in INT_DTYPES + FLOAT_DTYPES:
        for dim in DIMS:
            for sharing in SHARINGS:
                if sharing is not None and not sharing.discrete and not dtype.is_floating_point:
                    continue
                yield dtype, dim, sharing


def options_for(dim):
    return [o for o in OPTIONS if dim // 2 != o[1]]


def diffusers_of(t, sharing, dim, flip, shift, scale, max_period):
    """diffusers' embedding of f(t), computed on f(t) in t's own dtype, as a UNet sees it."""
    ft = t if sharing is None else sharing(t)
    return get_timestep_embedding(ft, dim, flip, shift, scale, max_period), ft


def fp32_tolerance(t, scale):
    """diffusers evaluates sin/cos of float32 arguments: t, t * freq and scale * (t * freq)
    each round once (relative 2^-24, freq <= 1), which a float64 result does not."""
    return 1e-6 + 3 * abs(scale) * t.double().abs().max().item() * 2.0 ** -24


def check_against_diffusers(fn, gen, dtype, dim, sharing, B=37):
    for flip, shift, scale, mp in options_for(dim):
        for b in (1, B):
            t = random_t(dtype, b, sharing, gen)
            out = fn(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
                     max_period=mp, sharing=sharing)
            want, ft = diffusers_of(t, sharing, dim, flip, shift, scale, mp)
            assert out.shape == (b, dim)
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            tol = fp32_tolerance(ft, scale) if dtype == torch.float64 else 1e-6
            err = (out.double() - want.double()).abs().max().item()
            assert err <= tol, (flip, shift, scale, mp, b, err)


# ---------------------------------------------------------------------------------------
# CPU kernel: opcheck, diffusers, reference
# ---------------------------------------------------------------------------------------

def _op_args(gen, t_dtype=torch.int64, dim=33, table=False, derivative=False, share=(0.0, 0.0),
             flip=True, out_dtype=torch.float32):
    t = random_t(t_dtype, 9, None, gen)
    freqs = embedding_frequencies(dim, 0.0, 10000.0, dtype=out_dtype)
    tab = torch.randn(50, dim, generator=gen, dtype=out_dtype) if table else None
    return (t, freqs, tab, dim, flip, 1.3, share[0], share[1], derivative)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(table=True),
    dict(t_dtype=torch.int32, table=True, share=(20.0, 100.0), flip=False),
    dict(t_dtype=torch.float32, derivative=True),
    dict(t_dtype=torch.float32, derivative=True, share=(20.0, 100.0)),
    dict(t_dtype=torch.float64, out_dtype=torch.float64, share=(0.02, 0.1)),
    dict(t_dtype=torch.float16, dim=8, table=True),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_opcheck(gen, kw):
    torch.library.opcheck(op, _op_args(gen, **kw))


@pytest.mark.parametrize("dtype,dim,sharing", list(cases()))
def test_cpu_matches_diffusers(gen, dtype, dim, sharing):
    check_against_diffusers(fastdiff.timestep_embedding, gen, dtype, dim, sharing)


@pytest.mark.parametrize("dtype", INT_DTYPES + FLOAT_DTYPES)
@pytest.mark.parametrize("derivative", [False, True])
def test_cpu_matches_reference(gen, dtype, derivative):
    """The raw op, with a random (not self-computed) table so that the row gather is
    visible, against the reference; derivative mode included."""
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for dim in (2, 7, 320):
        for width, end in ((0.0, 0.0), (20.0, 100.0), (125.0, 1000.0)):
            t = random_t(dtype, 41, None, gen)
            args = _op_args(gen, dim=dim, table=True, derivative=derivative, share=(width, end),
                            out_dtype=out_dtype)
            args = (t,) + args[1:]
            torch.testing.assert_close(op(*args), _ops.embedding_ref(*args), atol=1e-6, rtol=0)


def test_table_is_the_computed_embedding(gen):
    """Integer t inside the cached table and outside it give the same function of t."""
    t_in = torch.randint(0, 1000, (64,), generator=gen)
    for t in (t_in, t_in + 1000, -t_in - 1):
        want = get_timestep_embedding(t, 320, True, 0)
        got = fastdiff.timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert (got - want).abs().max().item() <= 1e-6


def test_module_matches_diffusers_timesteps(gen):
    from diffusers.models.embeddings import Timesteps
    t = torch.rand(16, generator=gen) * 1000
    ours = fastdiff.SinusoidalEmbedding(320, True, 0.0)
    assert (ours(t) - Timesteps(320, True, 0.0)(t)).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU)
# ---------------------------------------------------------------------------------------

TRITON_DIMS = (1, 2, 7, 320)


@pytest.mark.parametrize("dtype", INT_DTYPES + FLOAT_DTYPES)
def test_triton_matches_diffusers(gen, triton_backend, dtype):
    for dim in TRITON_DIMS:
        for sharing in SHARINGS:
            if sharing is not None and not sharing.discrete and not dtype.is_floating_point:
                continue
            check_against_diffusers(fastdiff.timestep_embedding, gen, dtype, dim, sharing, B=19)


@pytest.mark.parametrize("dtype", INT_DTYPES + FLOAT_DTYPES + (torch.int16, torch.uint8))
def test_triton_matches_reference(gen, dtype):
    """Raw Triton kernel vs reference, derivative mode and random table included."""
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for dim in TRITON_DIMS:
        for width, end in ((0.0, 0.0), (20.0, 100.0), (0.02, 0.1)):
            for derivative in (False, True):
                t = random_t(dtype, 23, None, gen)
                if dtype == torch.uint8:
                    t = t.abs().clamp(max=255).to(dtype)
                if end < 1 and dtype.is_floating_point:
                    t = (t.double() / 1000).to(dtype)
                args = _op_args(gen, dim=dim, table=True, derivative=derivative,
                                share=(width, end), out_dtype=out_dtype)
                args = (t,) + args[1:]
                torch.testing.assert_close(triton_embedding(*args), _ops.embedding_ref(*args),
                                           atol=1e-6, rtol=0)
                torch.testing.assert_close(triton_embedding(*args), op(*args), atol=1e-6, rtol=0)


def test_triton_large_batch_spans_blocks(gen):
    """More rows and columns than one interpreter block, so that block edges are exercised."""
    t = torch.rand(300, generator=gen) * 1000
    freqs = embedding_frequencies(2049, 0.0)
    args = (t, freqs, None, 2049, True, 1.0, 20.0, 100.0, False)
    torch.testing.assert_close(triton_embedding(*args), op(*args), atol=1e-6, rtol=0)


def test_triton_errors(gen):
    t = torch.randint(0, 1000, (4,), generator=gen)
    freqs = embedding_frequencies(8)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        triton_embedding(t[None], freqs, None, 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(TypeError, match="integer or floating"):
        triton_embedding(t > 3, freqs, None, 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="freqs must have shape"):
        triton_embedding(t, freqs[:3], None, 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(TypeError, match="float32 or float64"):
        triton_embedding(t, freqs.half(), None, 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="table must have shape"):
        triton_embedding(t, freqs, torch.zeros(10, 7), 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="share_width"):
        triton_embedding(t, freqs, None, 8, False, 1.0, 0.0, 100.0, False)


# ---------------------------------------------------------------------------------------
# Derivatives: autograd, forward AD, vmap
# ---------------------------------------------------------------------------------------

def emb64(t, sharing=None, dim=13):
    return fastdiff.timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0.0,
                                       scale=1.7, sharing=sharing)


def test_gradcheck_unshared(gen):
    t = (torch.rand(5, generator=gen, dtype=torch.float64) * 1000).requires_grad_()
    assert torch.autograd.gradcheck(emb64, (t,))


def test_gradcheck_above_shared_range(gen):
    sharing = TimeSharing(100, 5)
    t = (100.5 + torch.rand(5, generator=gen, dtype=torch.float64) * 800).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: emb64(t, sharing), (t,))


def test_gradient_zero_inside_shared_intervals(gen):
    sharing = TimeSharing(100, 5)
    t = (torch.rand(8, generator=gen, dtype=torch.float64) * 99.9).requires_grad_()
    w = torch.randn(8, 13, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((emb64(t, sharing) * w).sum(), t)
    assert torch.equal(g, torch.zeros_like(g))
    # float32 t too: the gradient comes back in t's dtype
    t32 = t.detach().float().requires_grad_()
    (g32,) = torch.autograd.grad(fastdiff.timestep_embedding(t32, 16, sharing=sharing).sum(), t32)
    assert g32.dtype == torch.float32 and torch.equal(g32, torch.zeros_like(g32))


def central_difference(f, t, v, h=1e-5):
    """Along v, per element of t, dividing by the steps as represented (t ~ 1e3 keeps a
    step h v to ~2e-13). h = 1e-5 balances the rounding of sin(t f) at t f ~ 1e3 (~1e-13 / h)
    against the truncation (~h^2 |v|^3 / 6): ~1e-8, a tenth of the tests' tolerance in
    1000 draws (h = 1e-6 with 2 h as the step reached 1.7x the tolerance)."""
    tp, tm = t + h * v, t - h * v
    diff = f(tp) - f(tm)
    scale = torch.where(v == 0, torch.zeros_like(v), v / torch.where(v == 0, torch.ones_like(v), tp - tm))
    return diff * scale.reshape((-1,) + (1,) * (diff.dim() - 1))


@pytest.mark.parametrize("sharing", [None, TimeSharing(100, 5)])
def test_jvp_equals_finite_difference(gen, sharing):
    # Above t_tilde and away from it, so that t +- h stays in one piece of f.
    t = 100.5 + torch.rand(6, generator=gen, dtype=torch.float64) * 800
    v = torch.randn(6, generator=gen, dtype=torch.float64)
    f = lambda t: emb64(t, sharing)  # noqa: E731
    _, tangent = torch.func.jvp(f, (t,), (v,))
    torch.testing.assert_close(tangent, central_difference(f, t, v), atol=1e-7, rtol=1e-7)


def test_forward_ad_dual_level_equals_func_jvp(gen):
    """torch.autograd.forward_ad duals (not functorch-wrapped) get the same tangent."""
    import torch.autograd.forward_ad as fwAD
    t = 100.5 + torch.rand(6, generator=gen, dtype=torch.float64) * 800
    v = torch.randn(6, generator=gen, dtype=torch.float64)
    f = lambda t: emb64(t, None)  # noqa: E731
    _, want = torch.func.jvp(f, (t,), (v,))
    with fwAD.dual_level():
        got = fwAD.unpack_dual(f(fwAD.make_dual(t, v))).tangent
    assert got is not None
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_jvp_zero_inside_shared_intervals(gen):
    t = torch.rand(6, generator=gen, dtype=torch.float64) * 99.9
    v = torch.randn(6, generator=gen, dtype=torch.float64)
    value, tangent = torch.func.jvp(lambda t: emb64(t, TimeSharing(100, 5)), (t,), (v,))
    assert torch.equal(tangent, torch.zeros_like(tangent))
    torch.testing.assert_close(value, emb64(TimeSharing(100, 5)(t)), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_vmap_equals_loop(gen, dtype):
    sharing = TimeSharing(100, 5)
    t = random_t(dtype, 5 * 7, None, gen).reshape(5, 7)
    f = lambda t: fastdiff.timestep_embedding(t, 31, flip_sin_to_cos=True, sharing=sharing)  # noqa: E731
    batched = torch.func.vmap(f)(t)
    assert batched.shape == (5, 7, 31)
    assert torch.equal(batched, torch.stack([f(row) for row in t]))


def test_jacfwd_matches_jacrev_and_finite_difference(gen):
    t = 100.5 + torch.rand(4, generator=gen, dtype=torch.float64) * 800
    jf = torch.func.jacfwd(emb64)(t)
    assert jf.shape == (4, 13, 4)
    torch.testing.assert_close(jf, torch.func.jacrev(emb64)(t), atol=1e-12, rtol=1e-12)
    for j in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[j] = 1
        torch.testing.assert_close(jf[..., j], central_difference(emb64, t, e), atol=1e-7, rtol=1e-7)


def test_vmap_of_jacfwd_uses_the_fused_rule(gen):
    """Per-sample Jacobians (what a probe written with vmap(jacfwd) does): the jvp rule's
    derivative pass is batched by its own vmap rule, with no per-row fallback warning."""
    sharing = TimeSharing(100, 5)
    t = (torch.rand(6, 1, generator=gen, dtype=torch.float64) * 300)
    f = lambda t: fastdiff.timestep_embedding(t, 13, sharing=sharing)  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        jac = torch.func.vmap(torch.func.jacfwd(f))(t)
    freqs = embedding_frequencies(13, 1.0, dtype=torch.float64)
    want = _ops.embedding_ref(t.reshape(-1), freqs, None, 13, False, 1.0, 20.0, 100.0, True)
    torch.testing.assert_close(jac.reshape(6, 13), want, atol=1e-12, rtol=1e-12)
    assert (jac.reshape(6, 13)[t.reshape(-1) < 100] == 0).all()


def test_derivative_mode_matches_reference_derivative(gen):
    """The op's derivative mode against autograd of the reference's value mode."""
    t = (torch.rand(9, generator=gen, dtype=torch.float64) * 1000).requires_grad_()
    freqs = embedding_frequencies(12, 1.0, dtype=torch.float64)
    args = (freqs, None, 12, False, 1.3, 20.0, 100.0)
    want = torch.func.jacfwd(lambda t: _ops.embedding_ref(t, *args, False))(t.detach())
    got = op(t.detach(), *args, True)
    torch.testing.assert_close(got, torch.einsum("bdb->bd", want), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------
# torch.compile (one compile: it costs ~17 s on CPU)
# ---------------------------------------------------------------------------------------

def test_compile_fullgraph(gen):
    sharing = TimeSharing(100, 5)

    def f(t):
        return fastdiff.timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0,
                                           sharing=sharing) * 2.0

    t = torch.rand(16, generator=gen) * 1000
    torch._dynamo.reset()
    _ops._kernel_cache.clear()  # trace the cold path too (the cache may hold the answer)
    got = torch.compile(f, fullgraph=True)(t)
    want = 2.0 * get_timestep_embedding(sharing(t), 320, True, 0)
    # As eager: the frequencies must be diffusers' (eager torch.exp) values; inductor's
    # exp is up to 1 ulp off, which would move sin/cos by up to |t| * 2^-23 ~ 1e-4.
    assert (got - want).abs().max().item() <= 2e-6


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_public_errors(gen):
    t = torch.randint(0, 1000, (4,), generator=gen)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        fastdiff.timestep_embedding(torch.rand(4, 2), 8)
    with pytest.raises(TypeError, match="integer or floating"):
        fastdiff.timestep_embedding(t > 500, 8)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        fastdiff.timestep_embedding(t, 0)
    with pytest.raises(TypeError, match="sharing must be a fastdiff.TimeSharing"):
        fastdiff.timestep_embedding(t, 8, sharing=(100, 5))
    with pytest.raises(ValueError, match="n <= t_tilde"):
        TimeSharing(100, 200)
    with pytest.raises(ValueError, match="divisible"):
        TimeSharing(100, 3)
    with pytest.raises(ValueError, match="must differ from downscale_freq_shift"):
        fastdiff.timestep_embedding(t, 2, downscale_freq_shift=1)


def test_raw_op_checks(gen):
    t = torch.randint(0, 1000, (4,), generator=gen)
    freqs = embedding_frequencies(8)
    with pytest.raises(RuntimeError, match="freqs must have shape"):
        op(t, freqs[:3], None, 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="freqs must be float32 or float64"):
        op(t, freqs.half(), None, 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="table must have shape"):
        op(t, freqs, torch.zeros(10, 7), 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="table dtype"):
        op(t, freqs, torch.zeros(10, 8, dtype=torch.float64), 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"t must have shape \[B\]"):
        op(t[None], freqs, None, 8, False, 1.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="share_width must be > 0"):
        op(t, freqs, None, 8, False, 1.0, 0.0, 100.0, False)


# ---------------------------------------------------------------------------------------
# Regressions: two reference bugs found against the kernels (dim == 1 derivative; the
# derivative slope of half t compared in half precision).
# ---------------------------------------------------------------------------------------

def test_reference_derivative_dim1(gen):
    args = _op_args(gen, t_dtype=torch.float32, dim=1, derivative=True)
    torch.testing.assert_close(_ops.embedding_ref(*args), op(*args))


def test_reference_half_slope_at_boundary():
    # half(0.1) == 0.0999755859375 < float32(0.1): shared (f(t) = 0.08), so the slope is 0.
    t = torch.tensor([0.0999755859375], dtype=torch.float16)
    args = (t, embedding_frequencies(4), None, 4, False, 1.0, 0.02, 0.1, True)
    assert torch.equal(op(*args), torch.zeros(1, 4))
    torch.testing.assert_close(_ops.embedding_ref(*args), op(*args))
