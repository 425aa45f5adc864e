"""The Sampler runtime: a state edited between steps (inpainting), autograd through the
step and the loop, views returned by the model, concurrent runs on one Sampler, the
h = 0 limit of DPM-Solver, pickling and to_dict / from_dict, memory layouts."""
import contextlib
import copy
import json
import pickle
import threading
import warnings

import pytest
import torch

import diffusers
import fastdiff
from fastdiff import SAMPLERS, Sampler, sample
from fastdiff._ops import STEP_HEAD, step_n_basis
from fastdiff.schedules import NoiseSchedule, TimeSharing
from fastdiff.step import fused_step

from test_samplers import ATOL, Denoiser  # the closed-form-plus-nonlinearity model

F64 = torch.float64
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear()


def _gauss_model(schedule, gen, dim=6):
    from fastdiff.gaussian import GaussianData
    return GaussianData(torch.randn(dim, generator=gen, dtype=F64) * 0.5, s=0.4).as_model(schedule)


# -- a state edited between steps ---------------------------------------------------------------

EDITED = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
          "LMSDiscreteScheduler"]


def _inpaint(mask, known):
    """An inpainting-style edit, in place: keep the known region."""
    return lambda x: x.mul_(1 - mask).add_(mask * known)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
@pytest.mark.parametrize("cls", EDITED)
def test_state_edited_in_place_between_steps_matches_diffusers(cls, mode, gen):
    # diffusers scales whatever state it is given; the Sampler's folded next model input
    # belongs to the state it produced and must not be used once that state was edited.
    sched = getattr(diffusers, cls)()
    steps = 6
    sched.set_timesteps(steps)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    s = Sampler.from_diffusers(sched, steps, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    model = Denoiser(sched.alphas_cumprod)
    x_T = torch.randn(2, 3, 5, 5, generator=gen)
    mask = (torch.rand(1, 1, 5, 5, generator=gen) > 0.5).float()
    edit = _inpaint(mask, torch.randn(1, 3, 5, 5, generator=gen))
    ctx = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad,
           "inference": torch.inference_mode}[mode]
    worst = 0.0
    with ctx(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x_ref = x_T * sched.init_noise_sigma
        x = s.init_noise(x_T)
        for t in sched.timesteps:
            inp_ref = sched.scale_model_input(x_ref, t)
            inp = s.scale_model_input(x, t)
            worst = max(worst, (inp - inp_ref).abs().max().item())
            out = model(inp_ref, t)
            kw = {"generator": g} if "Ancestral" in cls else {}
            x_ref = edit(sched.step(out, t, x_ref, **kw).prev_sample)
            x = edit(s.step(out, t, x))
            worst = max(worst, (x - x_ref).abs().max().item())
    assert worst <= ATOL, f"{cls}: max abs diff {worst:.3g}"


@pytest.mark.parametrize("name", ["euler", "euler-ancestral", "heun", "lms"])
def test_sample_callback_that_edits_x_in_place(name, schedule, gen):
    # fastdiff.sample with an editing callback equals the step API with a new tensor per
    # edit (which never used the folded input), under inference mode too. The model mixes
    # the dimensions, so that the edited ones matter to the kept ones.
    base = _gauss_model(schedule, gen)

    def model(x, t):
        return base(x, t) + 0.2 * torch.tanh(x.flip(-1))

    x_T = torch.randn(3, 6, generator=gen, dtype=F64)
    mask = (torch.rand(1, 6, generator=gen) > 0.5).double()
    known = torch.randn(1, 6, generator=gen, dtype=F64)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    s = Sampler(name, schedule, 5, generator=torch.Generator().manual_seed(seed))
    x = s.init_noise(x_T)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x)
        x = x * (1 - mask) + mask * known  # a new tensor
    for ctx in (contextlib.nullcontext, torch.inference_mode):
        with ctx():
            got = sample(model, x_T=x_T, schedule=schedule, sampler=name, steps=5, progress=False,
                         generator=torch.Generator().manual_seed(seed),
                         callback=lambda i, t, y: _inpaint(mask, known)(y))
        torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


# -- autograd ------------------------------------------------------------------------------------

def _step_args(gen, B=2, shape=(3, 4), n_hist=1, n_out=2):
    def t():
        return torch.randn(B, *shape, generator=gen, dtype=F64, requires_grad=True)
    c = torch.randn(B, STEP_HEAD + n_out * step_n_basis(n_hist), generator=gen, dtype=F64)
    c[:, 3] = torch.rand(B, generator=gen, dtype=F64) + 0.5  # clamp bound: some clip, some not
    c[:, 4] = torch.rand(B, generator=gen, dtype=F64) + 0.5
    return t(), t(), t(), t(), [t() for _ in range(n_hist)], t(), c.requires_grad_()


def _fused(x, xb, m, mc, h, z, c):
    return tuple(fused_step(x, m, c, x_base=xb, model_out_cond=mc, history=[h], noise=z,
                            clamp=True, n_out=2))


def test_fused_step_gradients_match_finite_differences(gen):
    args = _step_args(gen, shape=(2, 3))
    args = args[:4] + (args[4][0],) + args[5:]
    assert all(o.requires_grad for o in _fused(*args))
    assert torch.autograd.gradcheck(_fused, args)
    small = _step_args(gen, B=1, shape=(2,))
    assert torch.autograd.gradgradcheck(_fused, small[:4] + (small[4][0],) + small[5:])


def test_fused_step_gradients_on_the_triton_kernel(gen, triton_backend):
    args = _step_args(gen)
    args = args[:4] + (args[4][0],) + args[5:]
    w = [torch.randn(o.shape, generator=gen, dtype=F64) for o in _fused(*args)]

    def grads():
        outs = _fused(*args)
        assert all(o.requires_grad for o in outs)
        return torch.autograd.grad(outs, args, w)

    got = grads()
    fastdiff.set_backend("reference")  # differentiated by autograd itself
    for a, b in zip(got, grads()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_step_out_with_grad_raises_and_works_without(gen):
    x, _, m, _, _, _, c = _step_args(gen, n_hist=0, n_out=1)
    c = c.detach()
    o = torch.empty_like(x)
    with pytest.raises(ValueError, match="out= does not support autograd"):
        fused_step(x, m, c, out=[o])
    with torch.no_grad():
        fused_step(x, m, c, out=[o])
    torch.testing.assert_close(o, fused_step(x.detach(), m.detach(), c)[0])


@pytest.mark.parametrize("name,opts", [("euler", {}), ("dpm++2m", {}), ("heun", {}),
                                       ("dpm++sde-2m", {}), ("ddim", {"thresholding": True})])
@pytest.mark.parametrize("backend", ["kernels", "triton"])
def test_sample_gradients_equal_the_pure_torch_reference(name, opts, backend, schedule, gen,
                                                         triton_backend):
    # The loop on the compiled (or Triton) step against the same loop on the pure-torch
    # reference ops, which autograd differentiates natively: d loss / d x_T and d loss /
    # d (model parameters).
    net = torch.nn.Linear(6, 6).double()
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    x_T0 = torch.randn(2, 6, generator=gen, dtype=F64)
    base = _gauss_model(schedule, gen)

    def grads(be):
        fastdiff.set_backend(be)
        net.zero_grad()
        x_T = x_T0.clone().requires_grad_()
        x = sample(lambda x, t: base(x, t) + 0.1 * torch.tanh(net(x)), x_T=x_T, schedule=schedule,
                   sampler=name, steps=4, progress=False, seeds=[seed, seed + 1], **opts)
        assert x.requires_grad
        (x.sin().sum() + (x_T ** 2).sum()).backward()
        return x.detach(), x_T.grad, net.weight.grad.clone()

    want = grads("reference")
    got = grads(backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got[1], 2 * x_T0)  # not only the second term


# -- crashes on valid input --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dpm++2m", "euler", "heun", "unipc", "dpm++2s"])
def test_model_returning_a_view_of_its_input(name, schedule, gen):
    # A transposed view of the (donated) model input is a legal model output; the loop
    # must not write its results into memory that output still reads.
    x_T = torch.randn(2, 3, 5, 5, generator=gen)
    got = sample(lambda x, t: x.transpose(-1, -2), x_T=x_T, schedule=schedule, sampler=name,
                 steps=5, progress=False)
    want = sample(lambda x, t: x.transpose(-1, -2).contiguous(), x_T=x_T, schedule=schedule,
                  sampler=name, steps=5, progress=False)
    assert torch.equal(got, want)
    got = sample(lambda x, t: x, x_T=x_T, schedule=schedule, sampler=name, steps=5, progress=False)
    want = sample(lambda x, t: x.clone(), x_T=x_T, schedule=schedule, sampler=name, steps=5,
                  progress=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(2, 6), (2, 4, 256, 256)])
def test_one_sampler_in_two_threads(schedule, gen, shape):
    # fastdiff.sample runs keep their own state; the step API has one run per thread. The
    # large shape's steps release the GIL in the compiled step, so both threads step at once.
    model = _gauss_model(schedule, gen) if len(shape) == 2 else (lambda x, t: 0.5 * torch.tanh(x.flip(-1)))
    s = Sampler("dpm++3m", schedule, 12)
    x_Ts = [torch.randn(*shape, generator=gen, dtype=F64 if len(shape) == 2 else torch.float32)
            for _ in range(2)]
    want = [sample(model, x_T=x_T, sampler=s, progress=False) for x_T in x_Ts]
    results, errors = {}, []
    start = threading.Barrier(2)

    def work(j):
        try:
            start.wait()
            for r in range(6):
                if r % 2:
                    x = s.init_noise(x_Ts[j])
                    for t in s.timesteps:
                        x = s.step(model(s.scale_model_input(x, t), t), t, x)
                else:
                    x = sample(model, x_T=x_Ts[j], sampler=s, progress=False)
                results.setdefault(j, []).append(x)
        except Exception as e:  # reported below with the thread's index
            errors.append((j, repr(e)))

    threads = [threading.Thread(target=work, args=(j,)) for j in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for j in range(2):
        assert len(results[j]) == 6
        for x in results[j]:
            assert torch.equal(x, want[j])


@pytest.mark.parametrize("config", [
    {"algorithm_type": "sde-dpmsolver++"},
    {"algorithm_type": "dpmsolver++"},
    {"algorithm_type": "sde-dpmsolver"},
    {"algorithm_type": "dpmsolver"},
])
def test_dpm_solver_karras_sigma_min_takes_the_h0_limit(config, gen):
    # Karras sigmas ending at sigma_min repeat the last level: h = 0 in the last step.
    # diffusers runs it (the step is the identity there); so must the fused sampler.
    sched = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                                  **config)
    steps = 20
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    model = Denoiser(sched.alphas_cumprod)
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = copy.deepcopy(sched)
        ref.set_timesteps(steps)
        assert ref.sigmas[-1] == ref.sigmas[-2]  # the repeated level this is about
        g = torch.Generator().manual_seed(seed)
        x_ref = x_T * ref.init_noise_sigma
        for t in ref.timesteps:
            x_ref = ref.step(model(ref.scale_model_input(x_ref, t), t), t, x_ref, generator=g).prev_sample
        s = Sampler.from_diffusers(sched, steps, generator=torch.Generator().manual_seed(seed))
        x = s.init_noise(x_T)
        for t in s.timesteps:
            x = s.step(model(s.scale_model_input(x, t), t), t, x)
    assert torch.isfinite(x_ref).all()
    assert (x - x_ref).abs().max().item() <= ATOL


# -- pickling, to_dict / from_dict ----------------------------------------------------------------

SAVED = [
    ("euler", dict(steps=7, karras=True)),
    ("dpm++sde-2m", dict(steps=6, seeds=[3, 4], thresholding=True, prediction_type="v_prediction",
                         guidance_scale=None)),
    ("ddim", dict(timesteps=[[900, 500, 20], [700, 300, 10]], eta=0.5, seeds=[1, 2])),
    ("unipc", dict(steps=5, schedule=NoiseSchedule.vp_linear(), spacing="logSNR")),
    ("dpm++2m", dict(steps=8, time_sharing=TimeSharing(100, 5), clip_sample=True,
                     schedule=NoiseSchedule.scaled_linear())),
]


def _run(s, model, x_T):
    x = s.init_noise(x_T)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), s.model_time(x.shape[0])), t, x)
    return x


def _toy(x, t):
    return 0.3 * torch.sin(x) + 0.01 * t.to(x.dtype).view(-1, *[1] * (x.dim() - 1))


@pytest.mark.parametrize("name,kw", SAVED, ids=[n for n, _ in SAVED])
def test_to_dict_from_dict_and_pickle_round_trips(name, kw, gen):
    s = Sampler(name, **kw)
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))  # strict JSON
    rebuilt = Sampler.from_dict(d)
    copied = pickle.loads(pickle.dumps(s))
    assert rebuilt == s and copied == copied and rebuilt.to_dict() == s.to_dict()
    x_T = torch.randn(2, 6, generator=gen)
    want = _run(s, _toy, x_T)
    for other in (rebuilt, copied):
        assert torch.equal(other.timesteps, s.timesteps)
        assert all(torch.equal(other.coeffs(k), s.coeffs(k)) for k in range(len(s)))
        assert torch.equal(_run(other, _toy, x_T), want)


def test_pickle_keeps_the_generator_state_and_to_dict_refuses_a_generator(gen):
    s = Sampler("euler-ancestral", steps=4, generator=torch.Generator().manual_seed(5))
    x_T = torch.randn(1, 6, generator=gen)
    _run(s, _toy, x_T)  # advances the generator
    copied = pickle.loads(pickle.dumps(s))
    assert torch.equal(_run(copied, _toy, x_T), _run(s, _toy, x_T))
    with pytest.raises(ValueError, match="torch.Generator.*seeds"):
        s.to_dict()
    assert Sampler("ddim", steps=4) != Sampler("ddim", steps=5)
    assert Sampler("ddim", steps=4, seeds=[1]) != Sampler("ddim", steps=4, seeds=[2])


@pytest.mark.parametrize("name", ["dpm++2m", "unipc", "dpm++2m-sde", "heun"])
@pytest.mark.parametrize("donate", [False, True])
def test_copies_made_mid_run(name, donate, gen):
    # copy.deepcopy and pickle carry the run in progress (step index, history), from the
    # compiled step's slots too; the copy's history is its own (the original, stepping
    # on with donated states, does not change it); copy.copy starts a new run.
    s = Sampler(name, steps=6, seeds=[3, 4])
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    outs = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(len(s))]

    def steps(sampler, x, k0, k1):
        for k in range(k0, k1):
            x = sampler.step(outs[k], sampler.timesteps[k], x, donate=donate)
        return x

    x = steps(s, s.init_noise(x_T), 0, 3)
    assert s._run.prog is not None or name == "dpm++2m-sde"
    copies = [copy.deepcopy(s), pickle.loads(pickle.dumps(s))]
    x_copies = [x.clone() for _ in copies]
    want = steps(s, x, 3, len(s))  # the original run, on to its end
    for c, xc in zip(copies, x_copies):
        assert c.step_index == 3
        assert torch.equal(steps(c, xc, 3, len(s)), want)
    fresh = copy.copy(s)
    assert fresh.step_index == 0



@pytest.mark.parametrize("name", ["dpm++sde", "cosine-dpm"])
def test_copies_made_mid_run_keep_the_brownian_paths(name, gen):
    # The Brownian-tree samplers' run holds torchsde trees, which neither pickle nor
    # deep-copy as they are: a copy regrows them and goes on drawing the same noise.
    s = Sampler(name, steps=5, seeds=[3, 4])
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    outs = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(len(s))]

    def steps(sampler, x, k0, k1):
        for k in range(k0, k1):
            x = sampler.step(outs[k] + 0.1 * torch.tanh(x), sampler.timesteps[k], x)
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's tolerance warnings at the ends
        for k in (1, 3, len(s)):
            x = steps(s, s.init_noise(x_T), 0, k)
            copies = [copy.deepcopy(s), pickle.loads(pickle.dumps(s)), copy.deepcopy(copy.deepcopy(s))]
            x_copies = [x.clone() for _ in copies]
            want = steps(s, x, k, len(s))
            for c, xc in zip(copies, x_copies):
                assert c.step_index == k
                assert torch.equal(steps(c, xc, k, len(s)), want)


def test_a_copy_made_mid_run_continues_in_another_thread(gen):
    # The copy's run goes to the first thread that uses the copy, not only to the thread
    # that made it (a server may copy a scheduler and step it in a worker).
    s = Sampler("dpm++2m", steps=6)
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    outs = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(len(s))]
    x = s.init_noise(x_T)
    for k in range(2):
        x = s.step(outs[k], s.timesteps[k], x)
    c = copy.deepcopy(s)
    got = {}

    def worker():
        got["k"], y = c.step_index, x.clone()
        for k in range(2, len(c)):
            y = c.step(outs[k], c.timesteps[k], y)
        got["x"] = y

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    for k in range(2, len(s)):
        x = s.step(outs[k], s.timesteps[k], x)
    assert got["k"] == 2 and torch.equal(got["x"], x)
    assert c.step_index == 0  # this thread's run of the copy is a new one


# -- memory layout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dpm++2m", "euler", "heun", "dpm++2s", "unipc", "ddpm"])
def test_channels_last_in_channels_last_out(name, schedule, gen):
    x_T = torch.randn(2, 3, 5, 4, generator=gen)
    cl = x_T.to(memory_format=torch.channels_last)

    def model(x, t):
        return 0.3 * torch.sin(x)  # keeps its input's layout

    kw = dict(schedule=schedule, sampler=name, steps=5, progress=False, seeds=[1, 2])
    want = sample(model, x_T=x_T, **kw)
    got = sample(model, x_T=cl, **kw)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    s = Sampler(name, schedule, 5, seeds=[1, 2])
    x = s.init_noise(cl)
    for t in s.timesteps:
        inp = s.scale_model_input(x, t)
        assert inp.is_contiguous(memory_format=torch.channels_last)
        x = s.step(model(inp, t), t, x)
        assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    o = fused_step(cl, cl.sin(), s.coeffs(0)[:, :STEP_HEAD + step_n_basis(0)].contiguous())[0]
    assert o.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dpm++2m", "euler", "heun", "ddim"])
def test_half_precision_batch_one_odd_shape_per_sample_times(name, dtype, schedule, gen):
    # batch 1, an odd shape, per-sample timesteps for a batch of 3, in half precision:
    # each agrees with the float32 run to the half type's precision.
    for x_T, kw in [(torch.randn(1, 1, 3, 7, generator=gen), dict(steps=6)),
                    (torch.randn(3, 5, generator=gen),
                     dict(timesteps=torch.tensor([[900, 400, 50], [800, 300, 5], [999, 600, 100]])))]:
        ref = _run(Sampler(name, schedule, **kw), _toy, x_T)
        half = _run(Sampler(name, schedule, **kw), lambda x, t: _toy(x.float(), t).to(dtype),
                    x_T.to(dtype))
        assert half.dtype == dtype and half.shape == ref.shape
        tol = 2e-2 if dtype == torch.float16 else 8e-2
        assert (half.float() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
