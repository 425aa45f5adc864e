"""SingDiffusion's singular step (fastdiff.singular), its predictors and training, and
guidance rescale, against formulas and diffusers' own tables and pipelines."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import singular
from fastdiff.samplers import guidance as fguidance
from fastdiff.schedules import NoiseSchedule
from fastdiff.train import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class FixedPredictor:
    """predict(x1, cond) -> a fixed random tensor per condition (cond: a [B] label tensor
    whose first entry picks the tensor), recording its calls."""

    def __init__(self, shape, gen, n=2):
        self.ys = [torch.randn(shape, generator=gen) for _ in range(n)]
        self.calls = []

    def predict(self, x1, cond):
        self.calls.append((x1, cond))
        return self.ys[0 if cond is None else int(cond[0])]


class Spy(torch.nn.Module):
    """A non-chaotic eps model (a fraction of its input) that records every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, *args):
        self.calls.append((x.clone(), t.clone()))
        return 0.3 * x


def _first_level(sched, steps):
    """(alpha, sigma) of a diffusers scheduler's first model time, from its own tables."""
    s = type(sched).from_config(sched.config)
    s.set_timesteps(steps)
    if hasattr(s, "sigmas") and type(s).__name__ not in ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler"):
        sk = s.sigmas[0].double()
        a = 1 / torch.sqrt(1 + sk ** 2)
        return a.item(), (sk * a).item()
    ac = s.alphas_cumprod[int(s.timesteps[0])].double()
    return ac.sqrt().item(), (1 - ac).sqrt().item()


SCHEDULERS = [
    ("DDIMScheduler", dict(steps_offset=1, clip_sample=False, set_alpha_to_one=False)),
    ("DDIMScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    ("DDPMScheduler", dict(prediction_type="sample", clip_sample=False)),
    ("PNDMScheduler", dict(steps_offset=1, skip_prk_steps=True)),
    ("DPMSolverMultistepScheduler", dict()),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    ("DPMSolverSinglestepScheduler", dict()),
    ("UniPCMultistepScheduler", dict(prediction_type="sample")),
    ("EulerDiscreteScheduler", dict(steps_offset=1)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    ("EulerAncestralDiscreteScheduler", dict(steps_offset=1)),
    ("HeunDiscreteScheduler", dict()),
    ("LMSDiscreteScheduler", dict()),
]


@pytest.mark.parametrize("cls,config", SCHEDULERS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(SCHEDULERS)])
def test_first_model_input_is_the_singular_step(cls, config, gen):
    import diffusers
    # Every family: the model's first input (the VP sample alpha x_state for the Euler
    # family, whose state is x / alpha) equals alpha_t1 y + sigma_t1 x1 from diffusers.
    sched = getattr(diffusers, cls)(**SD, **config)
    x1 = torch.randn(3, 2, 5, 3, generator=gen)
    pred = FixedPredictor(x1.shape, gen)
    spy = Spy()
    out = fastdiff.sample(spy, x_T=x1, scheduler=sched, steps=6, cond=torch.tensor([1, 1, 1]),
                          initial="singdiffusion", initial_predictor=pred, progress=False,
                          seeds=[1, 2, 3])
    a, s = _first_level(sched, 6)
    torch.testing.assert_close(spy.calls[0][0], a * pred.ys[1] + s * x1, rtol=1e-5, atol=1e-6)
    assert pred.calls[0][0] is x1 and torch.isfinite(out).all()
    # Against a plain run from the same noise, only the start differs.
    plain = Spy()
    fastdiff.sample(plain, x_T=x1, scheduler=sched, steps=6, progress=False, seeds=[1, 2, 3])
    assert len(plain.calls) == len(spy.calls)
    assert all(torch.equal(t1, t2) for (_, t1), (_, t2) in zip(plain.calls, spy.calls))


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "unipc", "euler", "heun", "euler-ancestral"])
def test_per_sample_timesteps_each_row_its_own_t1(name, gen):
    sched = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012)
    ts = torch.tensor([[999, 700, 300, 0], [901, 601, 301, 1], [640, 420, 200, 10]])
    x1 = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    s = fastdiff.Sampler(name, sched, timesteps=ts, seeds=[0, 1, 2])
    state = singular.singular_step(s, x1, y)
    ac = torch.from_numpy(np.asarray(sched.alphas_cumprod))[ts[:, 0]].view(3, 1, 1, 1)
    a, sg = ac.sqrt(), (1 - ac).sqrt()
    if s.plan.sigma_space:
        # the sigma-space grid holds diffusers' float32 sigmas: equal to float32 precision
        torch.testing.assert_close(state, y + sg / a * x1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.scale_model_input(state), a * y + sg * x1, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(state, a * y + sg * x1)


@pytest.mark.parametrize("name", ["edm-euler", "edm-dpm++2m", "flow-euler"])
def test_ve_and_flow_states(name, gen):
    # EDM's state is x0 + sigma eps (alpha = 1); a flow grid starts at t = 1 (alpha = 0),
    # where the singular step is the identity on x1.
    flow = name.startswith("flow")
    sched = NoiseSchedule.flow(shift=3.0) if flow else NoiseSchedule.edm()
    s = fastdiff.Sampler(name, sched, 5, **({"prediction_type": "flow_prediction"} if flow else {}))
    x1 = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randn_like(x1)
    state = singular.singular_step(s, x1, y)
    if flow:
        torch.testing.assert_close(state, x1)
    else:
        sigma_max = float(s.grid.sigma[0, 0])
        assert sigma_max == pytest.approx(80.0)
        torch.testing.assert_close(state, y + sigma_max * x1)


def test_inverse_samplers_refuse(gen):
    s = fastdiff.Sampler("ddim-inverse", NoiseSchedule.scaled_linear(1000, 0.00085, 0.012), 5)
    x1 = torch.randn(2, 1, 4, 4, generator=gen)
    with pytest.raises(ValueError, match="inversion"):
        singular.singular_step(s, x1, x1)


def test_singular_step_is_one_fused_pass(monkeypatch, gen):
    calls = []
    real = singular.fused_step
    monkeypatch.setattr(singular, "fused_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = fastdiff.Sampler("ddim", NoiseSchedule.scaled_linear(1000, 0.00085, 0.012), 5)
    x1 = torch.randn(2, 3, 4, 4, generator=gen)
    singular.singular_step(s, x1, torch.randn_like(x1), torch.randn_like(x1), 4.0)
    assert calls == [1]


@pytest.mark.parametrize("w", [0.5, 1.0, 1.5, 7.5])
@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_normalized_guidance(w, name, gen):
    sched = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012)
    x1 = torch.randn(4, 1, 3, 5, generator=gen)
    pred = FixedPredictor(x1.shape, gen)
    spy = Spy()
    fastdiff.sample(spy, x_T=x1, schedule=sched, sampler=name, steps=4, progress=False,
                    cond=torch.ones(4, dtype=torch.long), uncond=torch.zeros(4, dtype=torch.long),
                    guidance_scale=2.0, initial="singdiffusion", initial_predictor=pred,
                    initial_guidance_scale=w)
    y_u, y_c = pred.ys
    y = (y_u + w * (y_c - y_u)) / w if w > 1 else y_c
    torch.testing.assert_close(singular.normalized_guidance(y_u, y_c, w), y)
    s = fastdiff.Sampler(name, sched, 4)
    ac = float(sched.alphas_cumprod[int(s.timesteps[0].round())]) if name == "ddim" else None
    a = np.sqrt(ac) if ac is not None else float(s.grid.alpha[0, 0])
    sg = np.sqrt(1 - a * a)
    x_in = spy.calls[0][0].chunk(2)[0]  # the CFG batch [uncond; cond] of the first call
    torch.testing.assert_close(x_in, a * y + sg * x1, rtol=1e-5, atol=1e-6)
    assert len(pred.calls) == (2 if w > 1 else 1)


@pytest.mark.parametrize("cls,config", [
    ("DDIMScheduler", dict(steps_offset=1, clip_sample=False, set_alpha_to_one=False)),
    ("PNDMScheduler", dict(steps_offset=1, skip_prk_steps=True)),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++")),
    ("UniPCMultistepScheduler", dict()),
    ("EulerDiscreteScheduler", dict(steps_offset=1)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing")),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="linspace")),
])
def test_stable_diffusion_pipeline_latents(cls, config, tiny_sd, gen):
    import diffusers
    pipe = tiny_sd
    pipe.scheduler = getattr(diffusers, cls)(**SD, **config)
    x1 = torch.randn(2, 4, 8, 8, generator=gen)
    emb = torch.randn(2, 5, 12, generator=gen)
    y_u, y_c = torch.randn(2, 2, 4, 8, 8, generator=gen)
    w = 3.0
    lat = singular.diffusers_latents(pipe, x1, y_u, 5, y_cond=y_c, guidance_scale=w)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        pipe(prompt_embeds=emb, latents=lat, num_inference_steps=5, guidance_scale=1.0,
             output_type="latent")
        first = seen[0]
        a, s = _first_level(pipe.scheduler, 5)
        want = a * (y_u + w * (y_c - y_u)) / w + s * x1
        torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
        if "Euler" in cls:
            # The official recipe (latents = scheduler.add_noise(y, x1, t1)) is scaled by
            # init_noise_sigma a second time in sigma space: far from the formula.
            seen.clear()
            ref = type(pipe.scheduler).from_config(pipe.scheduler.config)
            ref.set_timesteps(5)
            y = (y_u + w * (y_c - y_u)) / w
            pipe(prompt_embeds=emb, latents=ref.add_noise(y, x1, ref.timesteps[:1]),
                 num_inference_steps=5, guidance_scale=1.0, output_type="latent")
            assert (seen[0] - want).abs().max() > 0.1
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def tiny_sd():
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                        latent_channels=4, norm_num_groups=4, layers_per_block=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=diffusers.DDIMScheduler(**SD), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_predictor_round_trip(tmp_path, gen):
    import diffusers
    # The official format: a UNet2DConditionModel folder without time_emb_proj, loaded
    # through from_config + load_state_dict (safetensors), not a private loader.
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4)
    singular.make_time_free(unet)
    for p in unet.parameters():  # zero-initialised output layers would hide a bad load
        torch.nn.init.normal_(p, std=0.05, generator=gen)
    unet.save_pretrained(tmp_path / "initial")
    assert not any("time_emb_proj" in k for k in unet.state_dict())
    p = singular.load_initial_predictor(str(tmp_path / "initial"))
    assert isinstance(p, singular.DiffusersInitialPredictor)
    x1, emb = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 12, generator=gen)
    want = unet(x1, 1, encoder_hidden_states=emb).sample
    torch.testing.assert_close(p.predict(x1, emb), want)
    # The time input is really unused.
    torch.testing.assert_close(unet(x1, 999, encoder_hidden_states=emb).sample, want)
    # A folder whose weights do not match its config is refused.
    cfg = json.loads((tmp_path / "initial" / "config.json").read_text())
    cfg["block_out_channels"] = [8, 24]
    (tmp_path / "initial" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, RuntimeError)):
        singular.load_initial_predictor(str(tmp_path / "initial"))


# -- guidance rescale ------------------------------------------------------------------------

def _rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    return rescale_noise_cfg


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "euler", "unipc"])
@pytest.mark.parametrize("batched", [True, False])
def test_guidance_rescale_equals_diffusers(name, batched, gen):
    sched = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012)
    w, phi = 5.0, 0.7
    rescale_noise_cfg = _rescale_noise_cfg()
    a = fastdiff.Sampler(name, sched, 5, guidance_scale=w, guidance_rescale=phi)
    b = fastdiff.Sampler(name, sched, 5, guidance_scale=w)
    x_T = torch.randn(3, 2, 5, 7, generator=gen)
    x, xb = a.init_noise(x_T), b.init_noise(x_T.clone())
    for _ in range(len(a)):
        both = torch.randn(6, 2, 5, 7, generator=gen) * torch.tensor([1.0, 0.3, 2.0] * 2).view(6, 1, 1, 1)
        both = both + 0.5
        if batched:  # halves of one CFG batch: the copy-free moments path
            mu, mc = both.chunk(2)
        else:
            mu, mc = both[:3].clone(), both[3:].clone().transpose(-1, -2).contiguous().transpose(-1, -2)
        cfg = mu + w * (mc - mu)
        x = a.step(mu, None, x, model_out_cond=mc)
        xb = b.step(rescale_noise_cfg(cfg, mc, guidance_rescale=phi), None, xb)
        torch.testing.assert_close(x, xb, rtol=2e-5, atol=2e-5)


def test_guidance_moments_view_and_values(gen):
    out = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64)
    u, c = out.chunk(2)
    assert fguidance._pair(u, c).data_ptr() == out.data_ptr()  # no copy
    S, G = fguidance.guidance_moments(u, c)
    U, C = u.reshape(4, -1), c.reshape(4, -1)
    torch.testing.assert_close(S, torch.stack([U.sum(1), C.sum(1)], 1))
    torch.testing.assert_close(G[:, 0, 1], (U * C).sum(1))
    torch.testing.assert_close(G[:, 1, 1], (C * C).sum(1))


def test_sample_with_guidance_rescale_matches_manual_loop(gen):
    sched = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012)
    model = lambda x, t, c: 0.2 * x + 0.05 * c.view(-1, 1, 1, 1) * x ** 2  # noqa: E731
    x1 = torch.randn(2, 1, 6, 6, generator=gen)
    got = fastdiff.sample(model, x_T=x1, schedule=sched, sampler="ddim", steps=4, guidance_scale=3.0,
                          cond=torch.tensor([1.0, 2.0]), uncond=torch.zeros(2), guidance_rescale=0.5,
                          progress=False)
    rescale_noise_cfg = _rescale_noise_cfg()
    s = fastdiff.Sampler("ddim", sched, 4, guidance_scale=3.0)
    x = s.init_noise(x1)
    for t in s.timesteps:
        tt = t.expand(2)
        u, c = model(x, tt, torch.zeros(2)), model(x, tt, torch.tensor([1.0, 2.0]))
        x = s.step(rescale_noise_cfg(u + 3.0 * (c - u), c, guidance_rescale=0.5), t, x)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


# -- predictors ----------------------------------------------------------------------------------

def test_closed_form_predictors_equal_float64_means(gen):
    x = (torch.rand(203, 2, 3, 5, generator=gen) * 2 - 1) * 1e3 + 7.0  # large offset: float64 sums matter
    y = torch.randint(0, 4, (203,), generator=gen)
    y[:4] = torch.arange(4)
    dm = singular.DataMean(x, batch_size=17)
    torch.testing.assert_close(dm.mean, x.double().mean(0), rtol=0, atol=1e-12)
    cm = singular.ClassMeans(torch.utils.data.TensorDataset(x, y), batch_size=19)
    for k in range(4):
        torch.testing.assert_close(cm.means[k], x[y == k].double().mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(cm.mean, dm.mean, rtol=0, atol=1e-12)
    # The same from an iterable of (images, labels) batches, e.g. a DataLoader.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    torch.testing.assert_close(singular.ClassMeans(loader).means, cm.means, rtol=0, atol=0)
    x1 = torch.randn(3, 2, 3, 5, generator=gen)
    labels = torch.tensor([2, 4, 0])  # 4 = the null class: the data mean
    got = cm.predict(x1, labels)
    assert got.dtype == x1.dtype and got.shape == x1.shape
    torch.testing.assert_close(got, torch.stack([cm.means[2], cm.mean, cm.means[0]]).float())
    torch.testing.assert_close(dm.predict(x1), dm.mean.float().expand_as(x1))


def test_initial_predictor_conditions(gen):
    x1 = torch.randn(3, 2, 8, 8, generator=gen)
    small = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=())
    lab = singular.InitialPredictor(2, num_classes=5, **small)
    assert lab.predict(x1, torch.tensor([0, 4, 5])).shape == x1.shape
    assert not any("time" in k for k in lab.state_dict())
    vec = singular.InitialPredictor(2, cond_channels=6, **small)
    assert vec.predict(x1, torch.randn(3, 6, generator=gen)).shape == x1.shape
    img = singular.InitialPredictor(2, cond_channels=3, **small)
    assert img.predict(x1, torch.randn(3, 3, 4, 4, generator=gen)).shape == x1.shape
    with pytest.raises(ValueError, match="cond must be"):
        vec.predict(x1, torch.randn(3, 5))
    with pytest.raises(ValueError, match="not both"):
        singular.InitialPredictor(2, num_classes=3, cond_channels=2)


def _fit_kw(out):
    return dict(steps=6, batch_size=8, ckpt_every=2, progress=False, seed=3, out_dir=out,
                warmup=2, p_uncond=0.3)


def _fit_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    return x, torch.randn(20, 4, generator=g)  # embedding-vector conditions


def _fit_model():
    torch.manual_seed(0)
    return singular.InitialPredictor(1, cond_channels=4, channels=8, num_res_blocks=1,
                                     attention_levels=(), mid_attention=False)


_KILLED = r"""
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from tests.test_singular import _fit_data, _fit_kw, _fit_model
from fastdiff import singular
real, calls = singular.initial_loss, [0]
def initial_loss(*args):  # the same name: it is part of the resume check
    calls[0] += 1
    if calls[0] == 5:  # in step 5, after the step-4 checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
singular.initial_loss = initial_loss
torch.set_num_threads(1)
singular.fit_initial_predictor(_fit_model(), _fit_data(), **_fit_kw({out!r}))
"""


@pytest.mark.slow  # a fresh interpreter (torch import) for the killed run
def test_fit_initial_predictor_resumes_exactly_after_kill(tmp_path):
    straight = _fit_model()
    ema_a = singular.fit_initial_predictor(straight, _fit_data(), **_fit_kw(str(tmp_path / "a")))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _KILLED.format(root=root, out=str(tmp_path / "b"))],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))["step"] == 4
    resumed = _fit_model()
    ema_b = singular.fit_initial_predictor(resumed, _fit_data(), **_fit_kw(str(tmp_path / "b")))
    for (k, v1), v2 in zip(ema_a.state_dict().items(), ema_b.state_dict().values()):
        assert torch.equal(v1, v2), k
    la = [json.loads(s)["loss"] for s in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(s)["loss"] for s in open(tmp_path / "b" / "log.jsonl")]
    assert la == lb and len(la) == 6
    # The saved predictor loads back with its config.
    p = singular.load_initial_predictor(str(tmp_path / "b"))
    x1, c = torch.randn(2, 1, 8, 8), torch.randn(2, 4)
    torch.testing.assert_close(p.predict(x1, c), ema_b.predict(x1, c))


def test_fit_initial_predictor_learns_the_class_means():
    # The MSE optimum is E[x0 | c] whatever x1 is: a short fit lands near ClassMeans.
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([-0.8, 0.0, 0.8]).view(3, 1, 1, 1) + 0.1 * torch.randn(3, 1, 4, 4, generator=g)
    y = torch.arange(3).repeat(32)
    x = means[y] + 0.05 * torch.randn(96, 1, 4, 4, generator=g)
    torch.manual_seed(0)
    p = singular.InitialPredictor(1, num_classes=3, channels=8, num_res_blocks=1, attention_levels=(),
                                  mid_attention=False)
    ema = singular.fit_initial_predictor(p, (x, y), steps=80, batch_size=16, lr=5e-3, warmup=10,
                                         ema_decay=0.9, progress=False, p_uncond=0.1)
    cm = singular.ClassMeans((x, y))
    x1 = torch.randn(6, 1, 4, 4, generator=g)
    lab = torch.tensor([0, 1, 2, 0, 1, 2])
    err = (ema.predict(x1, lab) - cm.predict(x1, lab)).abs().mean()
    spread = (cm.means - cm.mean).abs().mean()
    assert err < 0.15 * spread, (err, spread)


# -- bad input -------------------------------------------------------------------------------------

def test_bad_input(gen):
    import diffusers
    sched = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012)
    model = Spy()
    x1 = torch.randn(2, 1, 4, 4, generator=gen)
    with pytest.raises(ValueError, match="needs initial_predictor"):
        fastdiff.sample(model, x_T=x1, schedule=sched, initial="singdiffusion", progress=False)
    with pytest.raises(ValueError, match="initial must be one of"):
        fastdiff.sample(model, x_T=x1, schedule=sched, initial="zero-snr", progress=False)
    with pytest.raises(ValueError, match='need initial="singdiffusion"'):
        fastdiff.sample(model, x_T=x1, schedule=sched, initial_predictor=FixedPredictor((2, 1, 4, 4), gen),
                        progress=False)
    wrong = FixedPredictor((2, 1, 4, 5), gen)
    with pytest.raises(ValueError, match=r"expected the sample's shape \(2, 1, 4, 4\)"):
        fastdiff.sample(model, x_T=x1, schedule=sched, initial="singdiffusion", initial_predictor=wrong,
                        progress=False)
    with pytest.raises(ValueError, match="data's images have shape"):
        fastdiff.sample(model, x_T=x1, schedule=sched, initial="singdiffusion",
                        initial_predictor=singular.DataMean(torch.randn(5, 1, 3, 3)), progress=False)
    with pytest.raises(TypeError, match="predict"):
        fastdiff.sample(model, x_T=x1, schedule=sched, initial="singdiffusion", initial_predictor=object(),
                        progress=False)
    with pytest.raises(ValueError, match="needs uncond"):
        fastdiff.sample(model, x_T=x1, schedule=sched, initial="singdiffusion", progress=False,
                        initial_predictor=FixedPredictor(x1.shape, gen), initial_guidance_scale=3.0)
    assert model.calls == []  # all refused before the first model call
    with pytest.raises(ValueError, match="guidance_rescale"):
        fastdiff.Sampler("ddim", sched, 4, guidance_scale=2.0, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="needs guidance_scale"):
        fastdiff.Sampler("ddim", sched, 4, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="not supported; supported"):
        singular.diffusers_latents(diffusers.LCMScheduler(), x1, x1, 4)
    with pytest.raises(ValueError, match="flow-matching"):
        singular.diffusers_latents(diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True,
                                                                         prediction_type="flow_prediction"),
                                   x1, x1, 4)
    with pytest.raises(ValueError, match="y must be a tensor of x1's shape"):
        singular.diffusers_latents(diffusers.DDIMScheduler(), x1, x1[:1], 4)
    with pytest.raises(ValueError, match="labels"):
        singular.ClassMeans(torch.randn(4, 1, 2, 2))
    with pytest.raises(ValueError, match="empty"):
        singular.DataMean(torch.randn(0, 1, 2, 2))
