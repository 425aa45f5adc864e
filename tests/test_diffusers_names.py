"""diffusers' names in fastdiff's own API: sampler aliases, num_inference_steps /
use_karras_sigmas / timestep_spacing, callback_on_step_end, a batch-1 uncond."""
import re

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import fastdiff
from fastdiff import NoiseSchedule, Sampler, sample
from fastdiff.samplers.registry import ALIASES, FAMILIES, resolve

SCHED = NoiseSchedule.scaled_linear()


def _same(a: Sampler, b: Sampler):
    assert a.name == b.name and torch.equal(a.timesteps, b.timesteps)
    assert all(torch.equal(a.coeffs(k), b.coeffs(k)) for k in range(len(a)))


@pytest.mark.parametrize("alias, name, karras", [
    ("DPM++ 2M", "dpm++2m", False), ("dpmpp_2m", "dpm++2m", False), ("DPM++ 2M Karras", "dpm++2m", True),
    ("k_euler", "euler", False), ("Euler a", "euler-ancestral", False), ("euler_ancestral", "euler-ancestral", False),
    ("k_lms", "lms", False), ("LMS Karras", "lms", True), ("uni_pc", "unipc", False), ("DDIM", "ddim", False),
    ("DPM++ 2M SDE Karras", "dpm++sde-2m", True), ("dpmpp_3m", "dpm++3m", False)])
def test_aliases_build_the_same_sampler(alias, name, karras):
    assert resolve(alias) == (name, {"karras": True} if karras else {})
    _same(Sampler(alias, SCHED, 8), Sampler(name, SCHED, 8, karras=karras))


def test_alias_table_targets_exist_and_unknown_names_print_it():
    assert set(ALIASES.values()) <= set(FAMILIES)
    with pytest.raises(ValueError, match=re.escape("unknown sampler 'DPM++ 2S a'; valid names: ddpm") +
                       ".*dpm\\+\\+2m.*'k_euler' -> euler"):
        Sampler("DPM++ 2S a", SCHED, 8)
    with pytest.raises(ValueError, match="implies karras=True"):
        Sampler("DPM++ 2M Karras", SCHED, 8, karras=False)


def test_diffusers_argument_names():
    _same(Sampler("unipc", SCHED, num_inference_steps=7, use_karras_sigmas=True),
          Sampler("unipc", SCHED, 7, karras=True))
    _same(Sampler("euler", SCHED, 9, timestep_spacing="trailing"), Sampler("euler", SCHED, 9, spacing="trailing"))
    assert Sampler("ddim", SCHED).steps == 20
    src = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    _same(Sampler.from_diffusers(src, num_inference_steps=6, use_karras_sigmas=True),
          Sampler.from_diffusers(src, 6, karras=True))
    with pytest.raises(ValueError, match="either steps= or num_inference_steps="):
        Sampler("ddim", SCHED, 5, num_inference_steps=5)
    with pytest.raises(ValueError, match="either karras= or use_karras_sigmas="):
        Sampler("ddim", SCHED, 5, karras=True, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="either steps= or num_inference_steps="):
        sample(lambda x, t: x, (1, 3), schedule=SCHED, steps=4, num_inference_steps=4, progress=False)


def _model(x, t, c=None):
    out = 0.3 * x + 0.1 * torch.sin(x)
    return out if c is None else out + 0.05 * c.view(c.shape[0], *([1] * (x.dim() - 1)))


def test_sample_takes_num_inference_steps_and_callback_on_step_end(gen):
    x_T = torch.randn(3, 2, 4, generator=gen)
    ref = sample(_model, x_T=x_T.clone(), schedule=SCHED, sampler="dpm++2m", steps=6, progress=False)
    out = sample(_model, x_T=x_T.clone(), schedule=SCHED, sampler="DPM++ 2M", num_inference_steps=6,
                 progress=False)
    assert torch.equal(ref, out)
    seen = []

    def on_end(pipe, i, t, kw):
        seen.append((pipe, i, int(t)))
        return {"latents": kw["latents"] * 0.5} if i == 2 else {}
    out = sample(_model, x_T=x_T.clone(), schedule=SCHED, sampler="dpm++2m", steps=6, progress=False,
                 callback_on_step_end=on_end)
    s = Sampler("dpm++2m", SCHED, 6)
    x = s.init_noise(x_T.clone())
    for i, t in enumerate(s.timesteps):
        x = s.step(_model(s.scale_model_input(x), s.model_time(3)), t, x)
        x = x * 0.5 if i == 2 else x
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    assert seen == [(None, i, int(t)) for i, t in enumerate(s.timesteps)]
    with pytest.raises(ValueError, match="either callback or callback_on_step_end"):
        sample(_model, (1, 2), schedule=SCHED, callback=print, callback_on_step_end=on_end, progress=False)


def test_batch_one_uncond_broadcasts(gen):
    x_T = torch.randn(4, 3, generator=gen)
    cond, uncond = torch.randn(4, generator=gen), torch.randn(1, generator=gen)
    kw = dict(x_T=x_T, schedule=SCHED, sampler="ddim", steps=5, guidance_scale=4.0, cond=cond, progress=False)
    one = sample(_model, uncond=uncond, **kw)
    full = sample(_model, uncond=uncond.expand(4), **kw)
    assert torch.equal(one, full)
    dict_one = sample(_model, **{**kw, "cond": {"c": cond}}, uncond={"c": uncond})
    assert torch.equal(dict_one, full)
    with pytest.raises(ValueError, match="shapes"):
        sample(_model, uncond=torch.randn(2, generator=gen), **kw)


def test_fuse_applies_time_sharing():
    from diffusers import DDIMScheduler, UNet2DModel

    class Pipe:  # the two attributes fuse uses
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                           norm_num_groups=4, layers_per_block=1,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
        scheduler = DDIMScheduler()
    pipe = fastdiff.fuse(Pipe(), time_sharing=fastdiff.TimeSharing(100, 5))
    assert isinstance(pipe.scheduler, fastdiff.FusedScheduler)
    assert isinstance(pipe.unet.time_proj, fastdiff.SinusoidalEmbedding)
    assert pipe.unet.time_proj.sharing == fastdiff.TimeSharing(100, 5)
