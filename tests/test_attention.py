"""fastdiff::sdpa_jvp (attention and its tangent in one blocked pass), the public
scaled_dot_product_attention with its fused forward-AD rule, and its use by the probes."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastdiff
from fastdiff import _ops, attention
from fastdiff.attention import scaled_dot_product_attention, sdpa_jvp
from fastdiff.schedules import NoiseSchedule

op = torch.ops.fastdiff.sdpa_jvp.default

# (batch dims, Lq, Lk, D, Dv): odd lengths, Lq != Lk, batch 1, several heads; lengths
# above the kernel's blocks (32 queries, 64 keys) so the online rescaling is exercised
SHAPES = [((1, 3), 17, 29, 8, 8), ((2, 4), 45, 131, 16, 5), ((1,), 1, 7, 3, 4),
          ((3, 2, 2), 33, 65, 8, 8)]


def _inputs(gen, batch, lq, lk, d, dv, dtype=torch.float32, spread=2.0):
    def r(*shape):  # spread: logits well beyond [-1, 1], so the max changes across blocks
        return (torch.randn(*batch, *shape, generator=gen, dtype=torch.float64) * spread).to(dtype)
    return r(lq, d), r(lk, d), r(lk, dv), r(lq, d), r(lk, d), r(lk, dv)


def _math_jvp(q, k, v, dq, dk, dv, scale=None):
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=scale),
                              (q, k, v), (dq, dk, dv))


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_and_math_backend_jvp(gen, shape):
    args = _inputs(gen, *shape)
    scale = 0.3 + torch.rand((), generator=gen).item()
    out, dout = op(*args, scale)
    ref_out, ref_dout = _ops.sdpa_jvp_ref(*args, scale)
    m_out, m_dout = _math_jvp(*args, scale=scale)
    for got, ref, mth in ((out, ref_out, m_out), (dout, ref_dout, m_dout)):
        assert got.shape == mth.shape and got.dtype == torch.float32
        assert _rel(got, ref) <= 1e-5 and _rel(got, mth) <= 1e-5
    # float64: the same recurrence to float64 rounding
    args64 = [a.double() for a in args]
    m_out, m_dout = _math_jvp(*args64, scale=scale)
    out, dout = op(*args64, scale)
    assert _rel(out, m_out) <= 1e-12 and _rel(dout, m_dout) <= 1e-12


def test_kernel_non_contiguous_and_low_precision(gen):
    # diffusers' layout: [B, L, H, D] viewed as [B, H, L, D]
    q, k, v, dq, dk, dv = (t.transpose(1, 2).contiguous().transpose(1, 2)
                           for t in _inputs(gen, (1, 3), 19, 23, 8, 8))
    assert not q.is_contiguous()
    for got, ref in zip(sdpa_jvp(q, k, v, dq, dk, dv), _math_jvp(q, k, v, dq, dk, dv)):
        assert _rel(got, ref) <= 1e-5
    # stride-0 batch dims (one key/value head shared by every query head, expanded)
    ke, ve = k[:, :1].expand_as(k), v[:, :1].expand_as(v)
    ref = _math_jvp(q, ke.contiguous(), ve.contiguous(), dq, dk, dv)
    for got, ref in zip(sdpa_jvp(q, ke, ve, dq, dk, dv), ref):
        assert _rel(got, ref) <= 1e-5
    for dt in (torch.bfloat16, torch.float16):
        args = [t.to(dt) for t in (q, k, v, dq, dk, dv)]
        ref = _ops.sdpa_jvp_ref(*args, 0.35)
        for got, r in zip(op(*args, 0.35), ref):
            assert got.dtype == dt
            assert _rel(got, r) <= (2e-2 if dt == torch.bfloat16 else 3e-3)


def test_opcheck(gen):
    torch.library.opcheck(op, (*_inputs(gen, (1, 2), 9, 13, 4, 3), 0.5))


def test_bad_input():
    q = torch.randn(1, 2, 5, 4)
    k = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="equal batch dims"):
        sdpa_jvp(q, k[:, :1], k, q, k[:, :1], k)
    with pytest.raises(ValueError, match="shape of k"):
        sdpa_jvp(q, k, k, q, k[..., :3], k)
    with pytest.raises(TypeError, match="dtype"):
        sdpa_jvp(q, k, k, q, k.double(), k)
    with pytest.raises(TypeError, match="floating"):
        sdpa_jvp(q, k, k.long(), q, k, k)
    with pytest.raises(ValueError, match="same batch dims"):  # the op checks too
        op(q, k[:, :1], k, q, k[:, :1], k, 1.0)


def test_public_sdpa_jvp_backward_and_fallback(gen, monkeypatch):
    q, k, v, dq, dk, dv = _inputs(gen, (2, 3), 11, 14, 8, 6)
    calls = []
    real = _ops.call
    monkeypatch.setattr(_ops, "call", lambda name, *a: calls.append(name) or real(name, *a))
    out, tan = torch.func.jvp(scaled_dot_product_attention, (q, k, v), (dq, dk, dv))
    assert calls == ["sdpa_jvp"]
    ref_out, ref_tan = _math_jvp(q, k, v, dq, dk, dv)
    assert _rel(out, ref_out) <= 1e-5 and _rel(tan, ref_tan) <= 1e-5
    # a tangent on q alone (the others are zero)
    _, tq = torch.func.jvp(lambda a: scaled_dot_product_attention(a, k, v), (q,), (dq,))
    _, rq = _math_jvp(q, k, v, dq, torch.zeros_like(k), torch.zeros_like(v))
    assert _rel(tq, rq) <= 1e-5
    # reverse mode works as torch's
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(scaled_dot_product_attention(*ins, scale=0.4), ins, g)
    ref_ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(F.scaled_dot_product_attention(*ref_ins, scale=0.4), ref_ins, g)
    for a, b in zip(grads, ref_grads):
        assert _rel(a, b) <= 1e-5
    # a mask is torch's business: the call goes to torch unchanged
    mask = torch.randn(11, 14, generator=gen)
    calls.clear()
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert calls == []


def test_public_sdpa_forward_ad_jacfwd_and_higher_order(gen):
    """forward_ad duals, vmap(jacfwd), reverse mode through the output of a jvp, a jvp of a
    jvp and a grad of a jvp: each equals torch's math-backend form (or raises)."""
    import torch.autograd.forward_ad as fwAD
    q, k, v, dq, dk, dv = _inputs(gen, (2, 3), 6, 10, 8, 4, spread=1.0)
    ref_out, ref_tan = _math_jvp(q, k, v, dq, dk, dv)
    with fwAD.dual_level():
        o = scaled_dot_product_attention(fwAD.make_dual(q, dq), k, fwAD.make_dual(v, dv))
        o = fwAD.unpack_dual(o.transpose(-1, -2).reshape(2, -1))  # views of the dual, too
    _, r = _math_jvp(q, k, v, dq, torch.zeros_like(k), dv)
    assert _rel(o.tangent, r.transpose(-1, -2).reshape(2, -1)) <= 1e-5

    def jac(f):
        return torch.func.vmap(torch.func.jacfwd(lambda a: f(a, k[0], v[0])))(q[:, :, :2])
    got = jac(scaled_dot_product_attention)
    with sdpa_kernel([SDPBackend.MATH]):
        assert _rel(got, jac(F.scaled_dot_product_attention)) <= 1e-5

    w = torch.randn(8, 8, generator=gen, dtype=torch.float64).float().requires_grad_()
    out, tan = torch.func.jvp(lambda a: scaled_dot_product_attention(a @ w, k, v), (q,), (dq,))
    (gw,) = torch.autograd.grad((out * ref_out).sum(), w)
    ref_w = w.detach().clone().requires_grad_()
    (rw,) = torch.autograd.grad((F.scaled_dot_product_attention(q @ ref_w, k, v) * ref_out).sum(),
                                ref_w)
    assert _rel(gw, rw) <= 1e-5
    with pytest.raises(NotImplementedError, match="through the forward-mode tangent"):
        tan.sum().backward()

    def second(f, outer):  # d/d(outer) of the jvp along dq
        return outer(lambda a: torch.func.jvp(lambda b: f(b, k, v), (a,), (dq,))[1])

    hv = lambda g: torch.func.jvp(g, (q,), (dk[..., :6, :],))[1]  # noqa: E731
    gr = lambda g: torch.func.grad(lambda a: (g(a) * ref_out).sum())(q)  # noqa: E731
    for outer in (hv, gr):
        got = second(scaled_dot_product_attention, outer)
        with sdpa_kernel([SDPBackend.MATH]):
            want = second(F.scaled_dot_product_attention, outer)
        assert _rel(got, want) <= 1e-5


def _op_counts(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {n: names.count(n) for n in set(names)}


def test_primal_is_formed_once(gen):
    """Under torch.func.jvp the output comes from the same sdpa_jvp call as the tangent:
    no torch attention runs besides it."""
    q, k, v, dq, dk, dv = _inputs(gen, (1, 2), 9, 12, 8, 8)
    n = _op_counts(lambda: torch.func.jvp(scaled_dot_product_attention, (q, k, v), (dq, dk, dv)))
    assert n.get("fastdiff::sdpa_jvp") == 1
    assert not [name for name in n if "scaled_dot_product" in name or "softmax" in name]


def _tiny_unet(gen):
    import diffusers
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    m = diffusers.UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    with torch.no_grad():  # zero-initialised output layers would make K exactly 0
        for p in m.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return m


@pytest.mark.parametrize("probe", ["lipschitz_t", "lipschitz_x"])
def test_probe_on_diffusers_unet_uses_fused_rule_and_matches_math_backend(gen, probe, monkeypatch):
    unet = _tiny_unet(gen)
    x0 = torch.randn(2, 2, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    sched = NoiseSchedule.linear(1000)
    ts = torch.tensor([3, 977])
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))

    def run():
        if probe == "lipschitz_t":
            return fastdiff.lipschitz_t(unet, x0, sched, ts, method="jvp", noise=noise,
                                        progress=False).values
        return fastdiff.lipschitz_x(unet, noise, torch.tensor([250.0] * 2), iters=2, method="jvp",
                                    generator=torch.Generator().manual_seed(seed))

    calls = []
    real = _ops.call
    monkeypatch.setattr(_ops, "call", lambda name, *a: calls.append(name) or real(name, *a))
    fused = run()
    n_fused = calls.count("sdpa_jvp")
    assert n_fused > 0  # every attention layer of every probe call went through it
    if probe == "lipschitz_t":  # one model call: each norm and attention primal runs once
        with torch.no_grad():
            fwd = _op_counts(lambda: unet(torch.cat([noise, noise]), torch.tensor([3.0] * 4)))
        jvp = _op_counts(run)
        assert jvp["aten::native_group_norm"] == fwd["aten::native_group_norm"]
        assert jvp["fastdiff::sdpa_jvp"] == fwd["aten::scaled_dot_product_attention"]
        assert "aten::scaled_dot_product_attention" not in jvp
    monkeypatch.setattr(attention, "fused_jvp_applies", lambda *a: False)  # math backend
    calls.clear()
    math = run()
    assert calls.count("sdpa_jvp") == 0
    assert _rel(fused, math) <= 1e-5
    assert bool((math > 0).all())


# ---------------------------------------------------------------------------------------
# the Triton kernel (interpreted on CPU here; compiled in tests/test_device_cuda.py)
# ---------------------------------------------------------------------------------------

# odd lengths (not multiples of the kernel's blocks, and more than one key block), head
# dims 8..64 including non-powers of two, Dv != D, batch 1, one or two batch dims
TRITON_SHAPES = [((1, 2), 17, 45, 8, 8), ((2,), 5, 70, 24, 40), ((1, 1), 33, 9, 64, 3)]


@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_kernel_matches_math_backend_jvp(gen, shape):
    from fastdiff.triton.attention import sdpa_jvp as triton_sdpa_jvp
    # logits of about the same spread for every D (float32 rounding of s grows with it)
    args = _inputs(gen, *shape, spread=2.0 if shape[3] <= 16 else 1.0)
    scale = 0.3 + torch.rand((), generator=gen).item()
    for got, mth in zip(triton_sdpa_jvp(*args, scale), _math_jvp(*args, scale=scale)):
        assert got.shape == mth.shape and got.dtype == torch.float32
        assert _rel(got, mth) <= 1e-5
    args64 = [a.double() for a in args]
    for got, mth in zip(triton_sdpa_jvp(*args64, scale), _math_jvp(*args64, scale=scale)):
        assert got.dtype == torch.float64 and _rel(got, mth) <= 1e-12


def test_triton_kernel_non_contiguous_and_low_precision(gen):
    from fastdiff.triton.attention import sdpa_jvp as triton_sdpa_jvp
    # diffusers' layout ([B, L, H, D] memory viewed as [B, H, L, D]), a column stride != 1
    # on k, and an expanded (stride 0) head dim on v
    q, k, v, dq, dk, dv = (t.transpose(1, 2).contiguous().transpose(1, 2)
                           for t in _inputs(gen, (1, 3), 19, 37, 24, 24))
    k = torch.randn(1, 3, 37, 48, generator=gen)[..., ::2]
    v = v[:, :1].expand_as(v)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    ref = _math_jvp(q, k, v.contiguous(), dq, dk, dv)
    for got, r in zip(triton_sdpa_jvp(q, k, v, dq, dk, dv, 24 ** -0.5), ref):
        assert _rel(got, r) <= 1e-5
    # float16 / bfloat16: products in the inputs' precision, sums in float32
    for dt, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)):
        args = [t.to(dt) for t in (q, k, v, dq, dk, dv)]
        ref = _ops.sdpa_jvp_ref(*args, 0.35)
        for got, r in zip(triton_sdpa_jvp(*args, 0.35), ref):
            assert got.dtype == dt and _rel(got, r) <= tol


def test_triton_through_func_jvp_of_public_sdpa(gen, triton_backend, monkeypatch):
    """torch.func.jvp of fastdiff.attention.scaled_dot_product_attention on the Triton
    backend: one Triton call gives the output and its tangent."""
    q, k, v, dq, dk, dv = _inputs(gen, (2, 2), 13, 21, 16, 8)
    calls = []
    real = _ops.triton_fn
    monkeypatch.setattr(_ops, "triton_fn", lambda name: calls.append(name) or real(name))
    out, tan = torch.func.jvp(scaled_dot_product_attention, (q, k, v), (dq, dk, dv))
    assert calls == ["sdpa_jvp"]
    ref_out, ref_tan = _math_jvp(q, k, v, dq, dk, dv)
    assert _rel(out, ref_out) <= 1e-5 and _rel(tan, ref_tan) <= 1e-5


def test_triton_bad_input(gen):
    from fastdiff.triton.attention import sdpa_jvp as triton_sdpa_jvp
    q = torch.randn(1, 2, 5, 257)
    with pytest.raises(ValueError, match="head dims up to 256"):
        triton_sdpa_jvp(q, q, q, q, q, q, 1.0)
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="same batch dims"):
        triton_sdpa_jvp(q, q[:, :1], q, q, q[:, :1], q, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        triton_sdpa_jvp(q, q, q.double(), q, q, q, 1.0)
    # no keys: NaN, as torch's math backend
    out, dout = triton_sdpa_jvp(q, q[:, :, :0], q[:, :, :0], q, q[:, :, :0], q[:, :, :0], 1.0)
    assert out.shape == q.shape and bool(out.isnan().all() and dout.isnan().all())
