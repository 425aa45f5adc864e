"""The sampling API: per-sample timesteps, the seeds contract, classifier-free guidance,
E-TSDM time sharing, the step-by-step Sampler, torch.compile, argument errors, the CLI."""
import json
import math

import numpy as np
import pytest
import torch

import diffusers
import fastdiff
from fastdiff import SAMPLERS, Sampler, TimeSharing, sample
from fastdiff.gaussian import GaussianData
from fastdiff.samplers.registry import OWN_SCHEDULE, default_schedule, family
from fastdiff.schedules import NoiseSchedule

F64 = torch.float64


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear()


def _gaussian(gen, dim=6):
    return GaussianData(torch.randn(dim, generator=gen, dtype=F64) * 0.5, s=0.4)


def _loop(s, model, x_T, **step_kw):
    x = s.init_noise(x_T)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x, **step_kw)
    return x


# -- per-sample timesteps and seeds ----------------------------------------------------------

@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "dpm++3m", "unipc", "dpm++2s", "heun", "euler", "lms", "plms"])
def test_per_sample_timesteps_equal_running_each_sample_alone(name, schedule, gen):
    g = _gaussian(gen)
    model = g.as_model(schedule)
    B, N = 3, 7
    rows = [np.sort(np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
                    .choice(np.arange(1, 1000), N, replace=False))[::-1] for _ in range(B)]
    ts = torch.tensor(np.stack(rows).astype(np.int64))
    x_T = torch.randn(B, 6, generator=gen, dtype=F64)
    batch = Sampler(name, schedule, timesteps=ts)
    assert batch.timesteps.shape[-1] == B
    out = _loop(batch, model, x_T)
    for i in range(B):
        alone = _loop(Sampler(name, schedule, timesteps=ts[i]), model, x_T[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-12, atol=1e-12)
    # and per-sample grids really differ from a shared one
    shared = _loop(Sampler(name, schedule, timesteps=ts[0]), model, x_T)
    assert not torch.allclose(shared[1:], out[1:])


@pytest.mark.parametrize("name", ["ddpm", "euler-ancestral", "dpm++sde-2m", "ddim"])
def test_seeds_make_each_sample_independent_of_the_batch(name, schedule, gen):
    g = _gaussian(gen)
    seeds = [int(v) for v in torch.randint(0, 2 ** 31, (4,), generator=gen)]
    kw = dict(schedule=schedule, sampler=name, steps=8, progress=False, dtype=F64)
    if name == "ddim":
        kw["eta"] = 1.0
    batch = sample(g.as_model(schedule), (4, 6), seeds=seeds, **kw)
    for i in (0, 2):
        alone = sample(g.as_model(schedule), (1, 6), seeds=[seeds[i]], **kw)
        assert torch.equal(batch[i:i + 1], alone), name
    other = sample(g.as_model(schedule), (2, 6), seeds=[seeds[1] + 1, seeds[3]], **kw)
    assert torch.equal(batch[3:4], other[1:2])
    assert not torch.equal(batch[0], batch[1])


def test_generator_list_equals_seeds(schedule, gen):
    g = _gaussian(gen)
    seeds = [3, 5]
    a = sample(g.as_model(schedule), (2, 6), seeds=seeds, sampler="euler-ancestral", steps=5,
               schedule=schedule, progress=False)
    b = sample(g.as_model(schedule), (2, 6), generator=[torch.Generator().manual_seed(s) for s in seeds],
               sampler="euler-ancestral", steps=5, schedule=schedule, progress=False)
    assert torch.equal(a, b)


# -- guidance, conditioning, time sharing ---------------------------------------------------

class CondModel(torch.nn.Module):
    """eps of Gaussian data shifted by a class embedding; records the batch sizes seen."""

    def __init__(self, g, schedule):
        super().__init__()
        self.base, self.calls = g.as_model(schedule), []

    def forward(self, x, t, labels=None):
        self.calls.append(x.shape[0])
        out = self.base(x, t)
        if labels is not None:
            out = out + 0.3 * torch.tanh(labels.to(x.dtype))[:, None] * torch.cos(x)
        return out


@pytest.mark.parametrize("name", ["dpm++2m", "ddim", "euler", "unipc", "heun"])
def test_cfg_equals_the_manual_formula(name, schedule, gen):
    g = _gaussian(gen)
    model = CondModel(g, schedule)
    B, w = 3, 4.5
    cond = torch.randint(1, 10, (B,), generator=gen)
    uncond = torch.zeros(B, dtype=torch.long)
    x_T = torch.randn(B, 6, generator=gen, dtype=F64)
    out = sample(model, x_T=x_T, schedule=schedule, sampler=name, steps=6, guidance_scale=w,
                 cond=cond, uncond=uncond, progress=False)
    s = Sampler(name, schedule, 6)
    assert model.calls == [2 * B] * len(s)  # one batched model call per step
    x = s.init_noise(x_T)
    for t in s.timesteps:
        inp = s.scale_model_input(x, t)
        tt = torch.full((B,), t.item())
        mu, mc = model.base(inp, tt), model(inp, tt, cond)
        mu = model(inp, tt, uncond)
        x = s.step(mu + w * (mc - mu), t, x)
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


def test_dict_conditioning_and_guidance_scale_one(schedule, gen):
    g = _gaussian(gen)
    model = CondModel(g, schedule)
    labels = torch.randint(1, 10, (2,), generator=gen)
    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    a = sample(model, x_T=x_T, schedule=schedule, steps=5, cond={"labels": labels}, progress=False)
    model.calls.clear()
    b = sample(model, x_T=x_T, schedule=schedule, steps=5, cond={"labels": labels},
               uncond={"labels": torch.zeros_like(labels)}, guidance_scale=1.0, progress=False)
    assert torch.equal(a, b) and model.calls == [2] * 5  # w = 1: the conditional model alone


def test_time_sharing_feeds_f_t_and_keeps_the_true_schedule(schedule, gen):
    g = _gaussian(gen)
    base = g.as_model(schedule)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return base(x, t)

    sharing = TimeSharing(100, 5)
    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    out = sample(model, x_T=x_T, schedule=schedule, sampler="dpm++2m", steps=30, time_sharing=sharing,
                 progress=False)
    s = Sampler("dpm++2m", schedule, 30)
    expect = [sharing(t).expand(2) for t in s.timesteps]
    assert all(torch.equal(a, b) for a, b in zip(seen, expect))
    assert any(not torch.equal(a, b.expand(2)) for a, b in zip(seen, s.timesteps))  # some t < 100 moved
    ref = _loop(s, fastdiff.etsdm(base, 100, 5), x_T)  # same thing through the E-TSDM wrapper
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_model_metadata_sets_time_sharing_and_prediction_type(schedule, gen):
    """A model that records its E-TSDM sharing / prediction type (fastdiff's UNet) gets
    them by default; time_sharing=False turns sharing off."""
    g = _gaussian(gen)
    seen = []

    class Net(torch.nn.Module):
        time_sharing, prediction_type = TimeSharing(100, 5), "v_prediction"

        def forward(self, x, t):
            seen.append(t)
            return g.as_model(schedule, "v_prediction")(x, t)

    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    out = sample(Net(), x_T=x_T, schedule=schedule, steps=30, progress=False)
    assert torch.equal(seen[-1], TimeSharing(100, 5)(Sampler("dpm++2m", schedule, 30).timesteps[-1:].expand(2)))
    ref = sample(g.as_model(schedule, "v_prediction"), x_T=x_T, schedule=schedule, steps=30,
                 prediction_type="v_prediction", time_sharing=TimeSharing(100, 5), progress=False)
    assert torch.equal(out, ref)
    seen.clear()
    sample(Net(), x_T=x_T, schedule=schedule, steps=30, progress=False, time_sharing=False)
    assert torch.equal(seen[-1], Sampler("dpm++2m", schedule, 30).timesteps[-1:].expand(2))


@pytest.mark.parametrize("spacing", ["time_uniform", "time_quadratic", "logSNR"])
def test_continuous_schedule_spacings(spacing, gen):
    schedule = NoiseSchedule.vp_linear()
    s = Sampler("dpm++2m", schedule, 10, spacing=spacing, final_sigmas_type="sigma_min")
    fn = {"logSNR": "logSNR_uniform"}.get(spacing, spacing)
    grid_t = getattr(schedule, fn)(10)
    torch.testing.assert_close(s.timesteps, grid_t[:-1].float())
    torch.testing.assert_close(torch.from_numpy(s.grid.alpha[0]), schedule.alpha(grid_t))
    g = _gaussian(gen)
    x = sample(g.as_model(schedule), (3, 6), schedule=schedule, spacing=spacing, steps=10,
               progress=False, dtype=F64)
    assert torch.isfinite(x).all()


# -- the Sampler object -----------------------------------------------------------------------

def _schedule_for(name, vp):
    """The VP test schedule, or the flow / EDM one the sampler runs on."""
    return vp if family(name).flavor not in OWN_SCHEDULE else default_schedule(name)


def _model_for(g, schedule):
    """The closed-form model; a velocity model on a flow schedule (epsilon is undefined at s = 1)."""
    return g.as_model(schedule, "flow_prediction" if schedule.kind == "flow" else "epsilon")


def test_step_api_equals_sample_and_restarts(schedule, gen):
    g = _gaussian(gen)
    model = g.as_model(schedule)
    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    for name in SAMPLERS:
        sch = _schedule_for(name, schedule)
        model = _model_for(g, sch)
        s = Sampler(name, sch, 6, generator=torch.Generator().manual_seed(1), prediction_type=model.prediction_type)
        first = _loop(s, model, x_T)
        s.generator = torch.Generator().manual_seed(1)
        again = _loop(s, model, x_T)  # reusable: restarted after the last step
        ref = sample(model, x_T=x_T, schedule=sch, sampler=name, steps=6, progress=False,
                     generator=torch.Generator().manual_seed(1))
        assert torch.equal(first, again) and torch.equal(first, ref), name


def test_callback_and_progress(schedule, gen, capsys):
    g = _gaussian(gen)
    seen = []
    out = sample(g.as_model(schedule), (2, 6), schedule=schedule, sampler="heun", steps=4,
                 callback=lambda i, t, x: seen.append((i, t, x)), progress=True)
    s = Sampler("heun", schedule, 4)
    assert [i for i, _, _ in seen] == list(range(len(s))) == list(range(7))
    assert torch.equal(torch.stack([t for _, t, _ in seen]), s.timesteps)
    assert seen[-1][2] is out
    # With a callback the loop does not update in place: every state it was shown is its own
    assert len({x.data_ptr() for _, _, x in seen}) == len(seen)
    assert "fastdiff heun" in capsys.readouterr().err  # the tqdm bar


def test_donated_steps_update_in_place_and_equal_fresh_ones(schedule, gen):
    # donate=True: the step writes the new state into the old one's memory (and history
    # into history no later step reads), with results equal to the fresh-tensor loop.
    g = _gaussian(gen)
    model = g.as_model(schedule)
    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    keep = x_T.clone()
    for name in SAMPLERS:
        sch = _schedule_for(name, schedule)
        model = _model_for(g, sch)
        s = Sampler(name, sch, 12, prediction_type=model.prediction_type)
        fresh = _loop(s, model, x_T, generator=torch.Generator().manual_seed(3))
        noise = torch.Generator().manual_seed(3)
        x, ptrs = s.init_noise(x_T), set()
        for t in s.timesteps:
            x = s.step(model(s.scale_model_input(x, t), t), t, x, generator=noise,
                       donate=x is not x_T)
            ptrs.add(x.data_ptr())
        assert torch.equal(x, fresh), name
        # a few buffers, not one per step (the run's own ones are the op's new outputs
        # where first written, recycled memory, so the state may move during warm-up)
        assert len(ptrs) <= 5 < len(s), (name, len(ptrs))
    assert torch.equal(x_T, keep)  # never donated, never written


def test_donated_steps_on_the_triton_kernel(schedule, gen, triton_backend):
    # The in-place loop through the Triton kernel (interpreted) equals the C++ one.
    g = _gaussian(gen)
    x_T = torch.randn(2, 6, generator=gen)
    for name in ("dpm++3m", "euler", "heun"):
        model = g.as_model(schedule)
        got = sample(lambda x, t: model(x.double(), t).float(), x_T=x_T, schedule=schedule,
                     sampler=name, steps=4, progress=False)
        fastdiff.set_backend("auto")
        want = sample(lambda x, t: model(x.double(), t).float(), x_T=x_T, schedule=schedule,
                      sampler=name, steps=4, progress=False)
        fastdiff.set_backend("triton")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_sample_donates_its_states_but_never_x_T(schedule, gen):
    g = _gaussian(gen)
    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    keep = x_T.clone()
    outs = []
    for callback in (None, lambda i, t, x: None):
        outs.append(sample(g.as_model(schedule), x_T=x_T, schedule=schedule, sampler="dpm++3m",
                           steps=7, progress=False, callback=callback))
    assert torch.equal(x_T, keep)
    assert torch.equal(outs[0], outs[1])


def test_sample_with_a_prebuilt_sampler(schedule, gen):
    g = _gaussian(gen)
    model = g.as_model(schedule)
    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    s = Sampler("unipc", schedule, 7)
    want = sample(model, x_T=x_T, schedule=schedule, sampler="unipc", steps=7, progress=False)
    for _ in range(2):  # reusable
        assert torch.equal(sample(model, x_T=x_T, sampler=s, progress=False), want)
    with pytest.raises(ValueError, match="schedule cannot be given with a prebuilt Sampler"):
        sample(model, x_T=x_T, sampler=s, schedule=schedule)
    with pytest.raises(ValueError, match="eta cannot be given"):
        sample(model, x_T=x_T, sampler=s, eta=0.5)
    with pytest.raises(ValueError, match="steps=5 but the prebuilt Sampler has 7"):
        sample(model, x_T=x_T, sampler=s, steps=5)
    with pytest.raises(TypeError, match="sampler must be a name or a fastdiff.Sampler"):
        sample(model, x_T=x_T, sampler=3)


def test_one_fused_call_per_model_call(schedule, gen, monkeypatch):
    g = _gaussian(gen)
    count = []
    real = fastdiff._ops.resolve

    def counting(name, device):
        fn = real(name, device)
        assert name in ("sampler_step", "sampler_step.out")
        return lambda *a, **k: count.append(1) or fn(*a, **k)
    monkeypatch.setattr(fastdiff._ops, "resolve", counting)
    for name in SAMPLERS:
        count.clear()
        calls = []
        sch = _schedule_for(name, schedule)
        model = _model_for(g, sch)
        s = Sampler(name, sch, 6, prediction_type=model.prediction_type)
        sample(lambda x, t: calls.append(1) or model(x, t), (2, 6), sampler=s, progress=False)
        # (+ one that scales x_T and makes the first model input, where the state starts scaled)
        assert len(count) == len(calls) + (s.plan.init_scale is not None), name


def test_euler_model_input_is_folded_into_the_step(schedule, gen):
    s = Sampler("euler", schedule, 5)
    x = s.init_noise(torch.randn(2, 6, generator=gen))
    x = s.step(torch.randn(2, 6, generator=gen), s.timesteps[0], x)
    c_in = 1 / math.sqrt(1 + (s.grid.sigma[0, 1] / s.grid.alpha[0, 1]) ** 2)
    torch.testing.assert_close(s.scale_model_input(x), x * c_in)
    assert s.scale_model_input(x.clone()) is not s.scale_model_input(x)  # cached only for its own output


def test_learned_variance_channels_are_dropped(schedule, gen):
    s1, s2 = Sampler("dpm++2m", schedule, 4), Sampler("dpm++2m", schedule, 4)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    m = torch.randn(2, 3, 4, 4, generator=gen)
    a = s1.step(torch.cat([m, torch.randn_like(m)], 1), None, s1.init_noise(x))
    b = s2.step(m, None, s2.init_noise(x))
    assert torch.equal(a, b)


def test_half_precision_runs_close_to_float32(schedule, gen):
    g = _gaussian(gen)
    x_T = torch.randn(2, 6, generator=gen)

    def model(x, t):
        return g.as_model(schedule)(x.float(), t).to(x.dtype)

    ref = sample(model, x_T=x_T, schedule=schedule, steps=8, progress=False)
    half = sample(model, x_T=x_T.to(torch.bfloat16), schedule=schedule, steps=8, progress=False)
    assert half.dtype == torch.bfloat16
    assert (half.float() - ref).abs().max() < 0.05


def test_step_compiles_fullgraph(schedule, gen):
    """One fused step with its coefficient tensor traces into a single graph."""
    s = Sampler("dpm++2m", schedule, 6)
    x, m, h = (torch.randn(2, 3, 8, 8, generator=gen) for _ in range(3))
    c = s.coeffs(3)
    op = s.plan.calls[3].op

    def step(x, m, h, c):
        return fastdiff.step.fused_step(x, m, c, history=[h], n_out=len(op.outputs))

    eager = step(x, m, h, c)  # also warms fastdiff's kernel lookup outside the trace
    compiled = torch.compile(step, fullgraph=True, backend="eager")(x, m, h, c)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_step_compiles_with_inductor(schedule, gen):
    s = Sampler("unipc", schedule, 6)
    op = s.plan.calls[3].op
    x, m = (torch.randn(2, 3, 8, 8, generator=gen) for _ in range(2))
    h = [torch.randn(2, 3, 8, 8, generator=gen) for _ in op.history]
    c = s.coeffs(3)

    def step(x, m, h, c):
        return fastdiff.step.fused_step(x, m, c, history=h, n_out=len(op.outputs))

    eager = step(x, m, h, c)
    for a, b in zip(eager, torch.compile(step, fullgraph=True)(x, m, h, c)):
        torch.testing.assert_close(a, b)


# -- errors at the boundary -------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors(schedule, gen):
    g = _gaussian(gen)
    model = g.as_model(schedule)
    with pytest.raises(ValueError, match="valid names: .*dpm\\+\\+2m.*unipc"):
        Sampler("dpm--2m", schedule, 10)
    with pytest.raises(ValueError, match="steps must be"):
        Sampler("ddim", schedule, 0)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        Sampler("ddim", schedule, 1001)
    with pytest.raises(TypeError, match="steps must be an int"):
        Sampler("ddim", schedule, 2.5)
    with pytest.raises(TypeError, match="unknown option.*'ordr'.*order"):
        Sampler("dpm++2m", schedule, 10, ordr=3)
    with pytest.raises(ValueError, match="prediction_type"):
        Sampler("ddim", schedule, 10, prediction_type="eps")
    with pytest.raises(ValueError, match="x_T has shape"):
        sample(model, (2, 5), x_T=torch.randn(2, 6), schedule=schedule, progress=False)
    with pytest.raises(TypeError, match="x_T has dtype"):
        sample(model, x_T=torch.randn(2, 6), dtype=F64, schedule=schedule, progress=False)
    with pytest.raises(TypeError, match="floating-point"):
        sample(model, x_T=torch.ones(2, 6, dtype=torch.long), schedule=schedule, progress=False)
    with pytest.raises(ValueError, match="guidance_scale needs uncond"):
        sample(model, (2, 6), schedule=schedule, guidance_scale=5.0, cond=torch.ones(2), progress=False)
    with pytest.raises(ValueError, match="uncond given without guidance_scale"):
        sample(model, (2, 6), schedule=schedule, uncond=torch.ones(2), progress=False)
    with pytest.raises(ValueError, match=r"2 generators \(seeds\) for a batch of 3"):
        sample(model, (3, 6), schedule=schedule, seeds=[1, 2], progress=False)
    with pytest.raises(ValueError, match="strictly decreasing"):
        Sampler("ddim", schedule, timesteps=[10, 500, 900])
    with pytest.raises(ValueError, match=r"must lie in \[0, 999\]"):
        Sampler("ddim", schedule, timesteps=[1200, 500])
    s = Sampler("ddim", schedule, timesteps=torch.tensor([[900, 500], [800, 100]]))
    with pytest.raises(ValueError, match="per-sample timesteps for 2 samples"):
        s.step(torch.randn(3, 6), None, torch.randn(3, 6))
    s = Sampler("ddim", schedule, 4)
    with pytest.raises(ValueError, match="expects model time"):
        s.step(torch.randn(2, 6), 17, torch.randn(2, 6))
    with pytest.raises(ValueError, match="model_out has shape"):
        s.step(torch.randn(2, 5), None, torch.randn(2, 6))
    with pytest.raises(ValueError, match="no guidance_scale"):
        s.step(torch.randn(2, 6), None, torch.randn(2, 6), model_out_cond=torch.randn(2, 6))
    with pytest.raises(ValueError, match="final_sigmas_type='zero'"):
        Sampler("dpm-solver", schedule, 10, final_sigmas_type="zero")
    with pytest.raises(ValueError, match="sde-dpmsolver.*third-order"):
        Sampler("dpm-solver-sde", schedule, 10, order=3)


@pytest.mark.parametrize("cls,config,key", [
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                     "use_karras_sigmas": True}, "use_karras_sigmas"),
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("DDPMScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous"}, "timestep_type"),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
     "final_sigmas_type"),
])
def test_unsupported_diffusers_options_are_refused(cls, config, key):
    sched = getattr(diffusers, cls)(**config)
    with pytest.raises(ValueError, match=f"{cls}: config option ({key})="):
        Sampler.from_diffusers(sched, 10)


def test_unsupported_scheduler_class_is_refused():
    sched = diffusers.RePaintScheduler()
    with pytest.raises(ValueError, match="RePaintScheduler is not supported: inpainting .*Supported: DDIMScheduler"):
        Sampler.from_diffusers(sched, 10)


# -- the CLI ----------------------------------------------------------------------------------

def test_cli_sample_writes_a_plot_and_reports_the_distance(tmp_path, capsys):
    from fastdiff.cli import main
    out = tmp_path / "plot" / "s.png"
    assert main(["sample", "--model", "gaussian-mixture", "--n", "300", "--steps", "8",
                 "--seed", "3", "--out", str(out), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["modes_hit"] == 8 and report["sliced_w1"] < 0.3 and report["sliced_w1_exact_draws"] > 0
    assert [p.name for p in out.parent.iterdir()] == ["s.png"]  # no temp file left behind
    assert main(["sample", "--sampler", "nope", "--out", str(out)]) == 2
    assert "valid names" in capsys.readouterr().err


def test_cli_sample_default_is_the_digits_model(tmp_path, capsys):
    # The main job: no --model samples the shipped E-TSDM digits model and scores it.
    from fastdiff.cli import main
    out = tmp_path / "d.png"
    assert main(["sample", "--n", "40", "--steps", "10", "--out", str(out), "--json",
                 "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == "digits" and report["sampler"] == "dpm++2m"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < report["fd_heldout"] < report["fd_real_train_vs_heldout"] * 3
