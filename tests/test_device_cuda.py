"""Every op and the samplers on a CUDA device: the CUDA kernels and the Triton kernels
(compiled for real, not interpreted) against the pure-torch references, on fresh random
inputs: all dtypes, odd sizes, batch 1, per-sample coefficient rows, non-contiguous
inputs, the in-place ``.out`` overload with aliasing, more than 2^31 elements (where the
device has the memory), opcheck, the embedding's forward-mode AD, the fused attention
JVP (``sdpa_jvp``, served by its Triton kernel on the device) alone and under
``torch.func.jvp``, the Lipschitz probes on
a small UNet, and whole ``fastdiff.sample`` runs equal to the same runs on the CPU.

On a machine without a GPU every case here is skipped with one reason (the summary line
counts them; tests/test_cuda_emulated.py runs the CUDA kernel sources on the CPU instead).
``make gpu-check`` runs this file on a GPU machine, with TRITON_INTERPRET unset so that the
Triton kernels are compiled by Triton for the device.
"""
import os

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import _ops
from fastdiff._ops import diff_norm_ref, embedding_ref, sdpa_jvp_ref, step_ref
from fastdiff.embedding import embedding_frequencies
from test_step_op import OPCHECK_CASES, TOL, make_case

# FASTDIFF_TEST_DEVICE=cpu rehearses this file on the CPU (the test code itself, with the
# C++ kernels and interpreted Triton standing in); the device tests proper run on "cuda".
DEV = os.environ.get("FASTDIFF_TEST_DEVICE", "cuda")
CUDA = DEV != "cuda" or torch.cuda.is_available()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BACKENDS = ["kernels", "triton"]
TRITON_REAL = os.environ.get("TRITON_INTERPRET") != "1" or DEV != "cuda"


@pytest.fixture(autouse=True)
def _restore_backend():
    old = _ops.get_backend()
    yield
    _ops.set_backend(old)


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        assert TRITON_REAL, "run the CUDA tests without TRITON_INTERPRET=1 (make gpu-check does)"
        assert _ops._triton_available(), "triton is not installed"
    elif DEV == "cuda":
        assert _ops.backends()["cuda_kernels"], "fastdiff._C was built without CUDA kernels"
    _ops.set_backend(request.param)
    return request.param


def cuda(args):
    """The same arguments on the GPU (strides kept: non-contiguous stays non-contiguous)."""
    def mv(a):
        if isinstance(a, torch.Tensor):
            return a.to(DEV)
        if isinstance(a, list):
            return [mv(v) for v in a]
        return a
    return tuple(mv(a) for a in args)


def poisoned_step(args):
    """Run the step once on a NaN x first, so that freed NaN blocks are what the caching
    allocator hands the real call's outputs: an element the kernel skips stays NaN."""
    x = args[0]
    _ops.call("sampler_step", torch.full_like(x, float("nan")), *args[1:])


STEP_CASES = [  # (shape, n_hist, n_out, cond, noise, x_base, clamp, per_sample)
    ((3, 3, 7, 5), 0, 1, False, False, False, False, True),
    ((5, 1001), 2, 2, True, True, False, False, True),
    ((1, 1, 1, 1), 1, 3, False, True, True, True, False),
    ((2, 4, 33), 3, 4, True, False, True, True, True),
    ((4, 257), 6, 5, True, True, True, False, True),
    ((1, 4, 64, 65), 1, 2, False, False, False, True, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0]}-h{c[1]}-o{c[2]}")
@pytest.mark.parametrize("noncontig", [False, True])
def test_step(gen, backend, dtype, case, noncontig):
    shape, n_hist, n_out, cond, noise, x_base, clamp, per_sample = case
    host = make_case(gen, shape, dtype, n_hist=n_hist, n_out=n_out, cond=cond, noise=noise,
                     x_base=x_base, clamp=clamp, per_sample=per_sample, noncontig=noncontig)
    args = cuda(host)
    poisoned_step(args)
    got = _ops.call("sampler_step", *args)
    ref = step_ref(*host)
    assert len(got) == n_out
    for g, r in zip(got, ref):
        assert g.device.type == torch.device(DEV).type and g.dtype == dtype and g.shape == r.shape
        torch.testing.assert_close(g.cpu(), r, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_out_aliasing(gen, backend, dtype):
    """sampler_step.out writing the new state over x and the second output over a history
    tensor, as Sampler.step(donate=True) does, equals the functional op."""
    host = make_case(gen, (3, 4, 9, 11), dtype, n_hist=2, n_out=2, cond=True, noise=True)
    args = list(cuda(host))
    ref = step_ref(*host)
    x, hist = args[0].clone(), [h.clone() for h in args[4]]
    args[0], args[4] = x, hist
    _ops.call("sampler_step.out", *args[:-1], out=[x, hist[1]])
    torch.testing.assert_close(x.cpu(), ref[0], **TOL[dtype])
    torch.testing.assert_close(hist[1].cpu(), ref[1], **TOL[dtype])


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_step_opcheck(gen, case):
    kw = dict(case)
    args = cuda(make_case(gen, kw.pop("shape"), kw.pop("dtype"), **kw))
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args)


def _big(n_bytes):
    if DEV != "cuda":
        pytest.skip("more than 2^31 elements: only on the GPU")
    free, _ = torch.cuda.mem_get_info()
    if free < n_bytes:
        pytest.skip(f"needs {n_bytes / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


def test_step_more_than_2_31_elements(gen, backend):
    """Index math in 64 bits: a [1, 2^31 + 3] fp16 step; the far end checked against the
    reference on slices."""
    S = 2 ** 31 + 3
    _big(5 * S * 2 + (1 << 30))
    x = torch.randn(1, S, device=DEV, dtype=torch.float16)
    m = torch.randn(1, S, device=DEV, dtype=torch.float16)
    coeffs = torch.randn(1, _ops.STEP_HEAD + _ops.step_n_basis(0), dtype=torch.float32, generator=gen)
    coeffs[:, 3:5] = 1.0
    (out,) = _ops.call("sampler_step", x, None, m, None, [], None, coeffs.to(DEV), False, 1)
    for lo, hi in ((0, 4096), (S - 70000, S)):
        (ref,) = step_ref(x[:, lo:hi].cpu(), None, m[:, lo:hi].cpu(), None, [], None, coeffs, False, 1)
        torch.testing.assert_close(out[:, lo:hi].cpu(), ref, **TOL[torch.float16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (2, 4096), (5, 9001), (1, 3, 70, 70), (7, 1)])
def test_diff_norm(gen, backend, dtype, shape):
    a = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(shape, generator=gen).to(dtype).transpose(0, -1).contiguous().transpose(0, -1)
    got = _ops.call("diff_norm", a.to(DEV), b.to(DEV))
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=0)
    torch.testing.assert_close(got.cpu(), diff_norm_ref(a, b), **tol)


def test_diff_norm_opcheck(gen):
    a, b = torch.randn(3, 70, device=DEV), torch.randn(3, 70, device=DEV)
    torch.library.opcheck(torch.ops.fastdiff.diff_norm.default, (a, b))


def test_diff_norm_more_than_2_31_elements(backend):
    S = 2 ** 31 + 5
    _big(2 * S * 2 + (1 << 30))
    a = torch.randn(1, S, device=DEV, dtype=torch.float16)
    b = torch.zeros(1, S, device=DEV, dtype=torch.float16)
    got = _ops.call("diff_norm", a, b).double().item()
    want = sum(float(c.double().pow(2).sum()) for c in a[0].split(1 << 28)) ** 0.5
    assert abs(got - want) <= 1e-5 * want


EMB_T = [torch.int64, torch.int32, torch.uint8, torch.float16, torch.bfloat16, torch.float32,
         torch.float64]


@pytest.mark.parametrize("t_dtype", EMB_T)
@pytest.mark.parametrize("dim,flip", [(1, False), (7, True), (320, False), (1281, True)])
@pytest.mark.parametrize("derivative", [False, True])
def test_embedding(gen, backend, t_dtype, dim, flip, derivative):
    out_dtype = torch.float64 if t_dtype == torch.float64 else torch.float32
    B = 37
    if t_dtype.is_floating_point:
        t = (torch.rand(2 * B, generator=gen, dtype=torch.float64) * 1550 - 50).to(t_dtype)[::2]
    else:
        lo = 0 if t_dtype == torch.uint8 else -50
        t = torch.randint(lo, 255 if t_dtype == torch.uint8 else 1500, (2 * B,), generator=gen).to(t_dtype)[::2]
    freqs = embedding_frequencies(dim, 1.0 if dim // 2 != 1 else 0.0, 10000.0, dtype=out_dtype)
    table = None if t_dtype.is_floating_point else torch.randn(50, dim, generator=gen, dtype=out_dtype)
    host = (t, freqs, table, dim, flip, 1.3, 20.0, 100.0, derivative)
    got = _ops.call("timestep_embedding", *cuda(host))
    ref = embedding_ref(*host)
    tol = dict(rtol=1e-12, atol=1e-12) if out_dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got.cpu(), ref, **tol)


def test_embedding_opcheck(gen):
    t = torch.randint(0, 1000, (9,), device=DEV)
    freqs = embedding_frequencies(33, 0.0, 10000.0, device=DEV)
    for table in (None, torch.randn(50, 33, device=DEV)):
        torch.library.opcheck(torch.ops.fastdiff.timestep_embedding.default,
                              (t, freqs, table, 33, True, 1.3, 20.0, 100.0, False))


def test_embedding_forward_ad(gen, backend):
    """d emb / dt by torch.func.jvp on the device equals the reference derivative."""
    t = (torch.rand(21, generator=gen, dtype=torch.float64) * 900).float().to(DEV)
    v = torch.randn(21, generator=gen).to(DEV)
    fn = lambda tt: fastdiff.timestep_embedding(tt, 64, sharing=fastdiff.TimeSharing(100, 5))  # noqa: E731
    emb, tangent = torch.func.jvp(fn, (t,), (v,))
    freqs = embedding_frequencies(64, 1.0, 10000.0)
    d_ref = embedding_ref(t.cpu(), freqs, None, 64, False, 1.0, 20.0, 100.0, True)
    torch.testing.assert_close(tangent.cpu(), d_ref * v.cpu()[:, None], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(emb.cpu(), fn(t.cpu()), rtol=1e-5, atol=2e-6)


# (batch dims, Lq, Lk, D, Dv): odd lengths across several blocks, head dims 8..128 with
# non-powers of two, Dv != D, batch 1
SDPA_CASES = [((1, 3), 17, 200, 8, 8), ((2, 4), 130, 77, 24, 40), ((1,), 1, 7, 64, 64),
              ((2, 2), 65, 129, 128, 96)]
SDPA_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: "x".join(map(str, c[1:])))
def test_sdpa_jvp(gen, backend, dtype, case):
    """sdpa_jvp on the device ("kernels": no CUDA kernel, so the Triton one serves it)
    against the float64 reference on the CPU; q, dq in diffusers' transposed layout."""
    batch, lq, lk, d, dv = case

    def r(*shape):
        return torch.randn(*batch, *shape, generator=gen, dtype=torch.float64).to(dtype)
    q, dq = (r(lq, d).transpose(-2, -3).contiguous().transpose(-2, -3) if len(batch) > 1
             else r(lq, d) for _ in range(2))
    args = (q, r(lk, d), r(lk, dv), dq, r(lk, d), r(lk, dv))
    scale = 0.3 + torch.rand((), generator=gen).item()
    got = _ops.call("sdpa_jvp", *cuda(args), scale)
    for g, want in zip(got, sdpa_jvp_ref(*(a.double() for a in args), scale)):
        assert g.dtype == dtype and g.shape == want.shape
        err = (g.cpu().double() - want).abs().max() / want.abs().max()
        assert err.item() <= SDPA_TOL[dtype]


def test_sdpa_forward_ad_through_public_function(gen, backend):
    """torch.func.jvp of fastdiff.attention.scaled_dot_product_attention on the device
    equals the math-backend JVP (torch's own rules) on the device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, dq, dk, dv = (torch.randn(2, 3, 45, 32, generator=gen).to(DEV) for _ in range(6))
    out, tan = torch.func.jvp(fastdiff.attention.scaled_dot_product_attention, (q, k, v),
                              (dq, dk, dv))
    with sdpa_kernel([SDPBackend.MATH]):
        ref_out, ref_tan = torch.func.jvp(torch.nn.functional.scaled_dot_product_attention,
                                          (q.double(), k.double(), v.double()),
                                          (dq.double(), dk.double(), dv.double()))
    for g, want in ((out, ref_out), (tan, ref_tan)):
        assert ((g.double() - want).abs().max() / want.abs().max()).item() <= 1e-5


class TableDenoiser(nn.Module):
    """Closed-form eps for x0 ~ N(0, 0.5^2) looked up on the device (no host sync, so a
    CUDA graph can capture it), plus a small conv network term."""

    def __init__(self, schedule, channels=4):
        super().__init__()
        self.register_buffer("ac", schedule.alphas_cumprod.double())
        self.net = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        ac = self.ac[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        eps = s * x / (0.25 * a * a + s * s)
        return eps + 0.05 * torch.tanh(self.net(x))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "unipc", "euler", "euler-ancestral"])
def test_sample_on_cuda_equals_cpu(backend, sampler):
    sched = fastdiff.NoiseSchedule.linear()
    torch.manual_seed(0)
    model = TableDenoiser(sched).double()
    seeds = list(range(5))
    kw = dict(shape=(5, 4, 9, 7), schedule=sched, sampler=sampler, steps=12, seeds=seeds,
              progress=False, dtype=torch.float64)
    cpu = fastdiff.sample(model, device="cpu", **kw)
    gpu = fastdiff.sample(model.to(DEV), device=DEV, **kw)
    # The noise comes from per-seed CPU generators in both runs: equal up to rounding.
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["dpm++2m", "euler-ancestral", "heun"])
def test_step_api_on_cuda_follows_the_compiled_run(gen, backend, sampler):
    # Sampler.step on the device takes the compiled step after its first call (the fused
    # op through the dispatcher, csrc/program.cpp) and gives the CPU run's states.
    sched = fastdiff.NoiseSchedule.linear()
    model = TableDenoiser(sched).double()
    x_T = torch.randn(3, 4, 7, 5, generator=gen, dtype=torch.float64)
    s = fastdiff.Sampler(sampler, sched, 9)
    noises = [torch.randn(3, 4, 7, 5, generator=gen, dtype=torch.float64) for _ in range(len(s))]
    got = {}
    for dev in ("cpu", DEV):
        m = model.to(dev)
        x = s.init_noise(x_T.to(dev))
        with torch.no_grad():
            for k, t in enumerate(s.timesteps):
                x = s.step(m(s.scale_model_input(x, t), s.model_time(3, dev)), t, x, noise=noises[k].to(dev))
                assert k == 0 or s._run.prog is not None, (dev, k)
        got[dev] = x.cpu()
    torch.testing.assert_close(got[DEV], got["cpu"], rtol=1e-9, atol=1e-9)


def test_probes_on_cuda_equal_cpu(gen):
    import diffusers
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval().double()
    sched = fastdiff.NoiseSchedule.linear()
    x0 = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    ts = torch.tensor([1, 10, 100, 500, 999])
    for method in ("fd", "jvp"):
        cpu = fastdiff.lipschitz_t(unet, x0, sched, ts, method=method, noise=noise, progress=False)
        gpu = fastdiff.lipschitz_t(unet.to(DEV), x0.to(DEV), sched, ts, method=method,
                                   noise=noise.to(DEV), progress=False)
        unet.cpu()
        torch.testing.assert_close(gpu.values.cpu(), cpu.values, rtol=1e-6, atol=1e-9)
