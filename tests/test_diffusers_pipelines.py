"""FusedScheduler inside diffusers' own pipelines: the same latents as the scheduler it
replaces, for txt2img, img2img, inpainting and SDXL, on tiny random components built
from configs (offline; prompt_embeds= so no tokenizer or text encoder is needed)."""
import inspect
import json
import subprocess
import sys

import pytest
import torch
from diffusers import (AutoencoderKL, CosineDPMSolverMultistepScheduler, DDIMScheduler, DDPMScheduler,
                       DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSDEScheduler,
                       DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, IPNDMScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LMSDiscreteScheduler,
                       PNDMScheduler, SASolverScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel,
                       UniPCMultistepScheduler)

import fastdiff
from fastdiff import FusedScheduler

# Stable Diffusion 1.x's scheduler config, as its scheduler_config.json has it (clip_sample
# is a hidden key there: PNDMScheduler does not take it).
SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}

# (diffusers class, config overrides): every family, swapped in by from_config as users do.
CASES = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpm++2s": (DPMSolverSinglestepScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-trailing": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2-ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "sa-solver": (SASolverScheduler, {}),
    "dpm++sde": (DPMSolverSDEScheduler, {"noise_sampler_seed": 3}),  # unseeded, diffusers' own is random
    "ipndm": (IPNDMScheduler, {}),
    "cosine-dpm": (CosineDPMSolverMultistepScheduler, {}),
}
# Mid-schedule starts (img2img, inpainting), as MID_SCHEDULE lists them; PNDM refuses
# (test_pndm_mid_schedule_refused), the classes not listed there too.
MID = ["ddim", "dpm++2m", "dpm++2m-karras", "dpm++2s", "unipc", "euler", "euler-trailing", "euler-ancestral",
       "heun", "lms", "ddpm"]
STEPS = 8


def _unet(**kw):
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                **kw)


def _vae():
    # One block: no downsampling, so 8x8 images have 8x8 latents.
    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, sample_size=8)


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator()
    seed = g.seed()
    print(f"generator seed: {seed}")
    torch.manual_seed(seed)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    comps = dict(unet=_unet(), vae=_vae(), text_encoder=None, tokenizer=None,
                 scheduler=PNDMScheduler.from_config(SD_CONFIG), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    data = dict(emb=torch.randn(2, 5, 16, generator=g), neg=torch.randn(1, 5, 16, generator=g),
                latents=torch.randn(2, 4, 8, 8, generator=g),
                image=torch.rand(2, 3, 8, 8, generator=g) * 2 - 1,
                mask=(torch.rand(2, 1, 8, 8, generator=g) > 0.5).float(), seed=seed)
    yield comps, data
    torch.set_num_threads(n)


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _close(ref, out, scale):
    """max |diff| <= 1e-4 of the latents' scale (float32 rounding, amplified by CFG 7.5
    through a random UNet, stays far below)."""
    err = float((ref - out).abs().max())
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} > 1e-4 x scale {scale:.3g}"


def _swap(pipe, case):
    cls, kw = CASES[case]
    pipe.scheduler = cls.from_config(SD_CONFIG, **kw)


def _call(pipe, data, **kw):
    return pipe(prompt_embeds=data["emb"], negative_prompt_embeds=data["neg"].expand(2, -1, -1),
                num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
                generator=torch.Generator().manual_seed(data["seed"]), **kw).images


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_equals_original_scheduler(parts, case):
    comps, data = parts
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    _swap(pipe, case)
    ref = _call(pipe, data, latents=data["latents"].clone())
    calls = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, *a, **k: calls.append(t) or forward(x, t, *a, **k)
    fastdiff.fuse(pipe)
    assert isinstance(pipe.scheduler, FusedScheduler)
    out = _call(pipe, data, latents=data["latents"].clone())
    pipe.unet.forward = forward
    original = CASES[case][0].from_config(SD_CONFIG, **CASES[case][1])
    original.set_timesteps(STEPS)
    # the same UNet calls at the same times (KDPM2's interpolated times to float32 rounding)
    torch.testing.assert_close(torch.stack([torch.as_tensor(t) for t in calls]).float(),
                               original.timesteps.float(), rtol=1e-6, atol=1e-4)
    _close(ref, out, max(float(ref.abs().max()), float(data["latents"].abs().max() * original.init_noise_sigma)))


@pytest.mark.parametrize("case", MID)
def test_img2img_equals_original_scheduler(parts, case):
    comps, data = parts
    pipe = StableDiffusionImg2ImgPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    _swap(pipe, case)
    ref = _call(pipe, data, image=data["image"], strength=0.6)
    fastdiff.fuse(pipe)
    out = _call(pipe, data, image=data["image"], strength=0.6)
    _close(ref, out, float(ref.abs().max()))


@pytest.mark.parametrize("case", ["ddim", "dpm++2m", "unipc", "euler", "euler-ancestral", "heun", "lms"])
def test_inpaint_equals_original_scheduler(parts, case):
    comps, data = parts
    pipe = StableDiffusionInpaintPipeline(**comps)  # 4-channel UNet: add_noise at every step
    pipe.set_progress_bar_config(disable=True)
    _swap(pipe, case)
    kw = dict(image=data["image"], mask_image=data["mask"], strength=0.6, height=8, width=8)
    ref = _call(pipe, data, **kw)
    fastdiff.fuse(pipe)
    out = _call(pipe, data, **kw)
    _close(ref, out, float(ref.abs().max()))


def test_pndm_mid_schedule_refused(parts):
    comps, data = parts
    pipe = fastdiff.fuse(StableDiffusionImg2ImgPipeline(**comps))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="PNDMScheduler cannot start mid-schedule.*sampler='ddim'"):
        _call(pipe, data, image=data["image"], strength=0.6)


@pytest.mark.parametrize("case", ["dpm++2m-karras", "euler-ancestral"])
def test_sdxl_equals_original_scheduler(parts, case):
    comps, data = parts
    g = torch.Generator().manual_seed(data["seed"])
    torch.manual_seed(data["seed"])
    unet = _unet(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 16)
    pipe = StableDiffusionXLPipeline(vae=comps["vae"], text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=comps["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    _swap(pipe, case)
    kw = dict(pooled_prompt_embeds=torch.randn(2, 16, generator=g),
              negative_pooled_prompt_embeds=torch.randn(2, 16, generator=g), height=8, width=8)
    ref = _call(pipe, data, latents=data["latents"].clone(), **kw)
    fastdiff.fuse(pipe)
    out = _call(pipe, data, latents=data["latents"].clone(), **kw)
    _close(ref, out, max(float(ref.abs().max()), float(data["latents"].abs().max()) * 15))


def test_per_sample_generators(parts):
    comps, data = parts
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    _swap(pipe, "euler-ancestral")
    gens = lambda: [torch.Generator().manual_seed(data["seed"] + i) for i in range(2)]  # noqa: E731
    kw = dict(prompt_embeds=data["emb"], negative_prompt_embeds=data["neg"].expand(2, -1, -1),
              num_inference_steps=4, output_type="latent")
    ref = pipe(latents=data["latents"].clone(), generator=gens(), **kw).images
    fastdiff.fuse(pipe)
    out = pipe(latents=data["latents"].clone(), generator=gens(), **kw).images
    _close(ref, out, float(ref.abs().max()))
    # sample 1 alone with its own generator is the same as in the batch
    one = pipe(latents=data["latents"][1:].clone(), generator=gens()[1:], prompt_embeds=data["emb"][1:],
               negative_prompt_embeds=data["neg"], num_inference_steps=4, output_type="latent").images
    _close(out[1:], one, float(ref.abs().max()))


def test_pipeline_save_and_reload(parts, tmp_path):
    comps, data = parts
    pipe = fastdiff.fuse(StableDiffusionPipeline(**comps), sampler="DPM++ 2M Karras")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.scheduler_class == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.use_karras_sigmas is True
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "model_index.json").read_text())
    # diffusers finds the loader through the names (SchedulerMixin) of this module
    assert saved["scheduler"] == ["fastdiff.integrations.diffusers", "FusedScheduler"]
    again = StableDiffusionPipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None,
                                                    safety_checker=None, feature_extractor=None)
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.scheduler, FusedScheduler)
    assert _public(again.scheduler.config) == _public(pipe.scheduler.config)
    a = _call(pipe, data, latents=data["latents"].clone())
    b = _call(again, data, latents=data["latents"].clone())
    assert torch.equal(a, b)
    alone = FusedScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert _public(alone.config) == _public(pipe.scheduler.config)


# -- the scheduler protocol on its own -------------------------------------------------------

def test_protocol_and_round_trips(tmp_path):
    src = PNDMScheduler.from_config(SD_CONFIG)
    fused = FusedScheduler.from_config(src.config, sampler="dpmpp_2m")
    assert fused.config.num_train_timesteps == 1000
    assert fused.order == DPMSolverMultistepScheduler.order
    ref = DPMSolverMultistepScheduler.from_config(src.config)
    for s in (fused, ref):
        s.set_timesteps(num_inference_steps=7, device="cpu")
    assert torch.equal(fused.timesteps, ref.timesteps) and fused.num_inference_steps == 7
    assert torch.allclose(fused.sigmas, ref.sigmas.float(), rtol=1e-6)
    assert fused.step_index is None and fused.begin_index is None
    # back to diffusers, and save / load of the scheduler alone
    back = DPMSolverMultistepScheduler.from_config(fused.config)
    assert {k: back.config[k] for k in _public(ref.config)} == _public(ref.config)
    fused.save_pretrained(tmp_path)
    again = FusedScheduler.from_pretrained(tmp_path)
    assert _public(again.config) == _public(fused.config)
    assert _public(FusedScheduler.from_scheduler(fused).config) == _public(fused.config)
    # a diffusers scheduler built in code has no _class_name in its config
    with pytest.raises(ValueError, match="from_scheduler"):
        FusedScheduler.from_config(dict(DDIMScheduler().config))
    with pytest.raises(ValueError, match="custom sigmas"):
        fused.set_timesteps(sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="DDIMScheduler does not take custom timesteps"):
        FusedScheduler.from_scheduler(DDIMScheduler()).set_timesteps(timesteps=[900, 500])


@pytest.mark.parametrize("cls, kw", [(EulerDiscreteScheduler, {}), (DDIMScheduler, {"clip_sample": True}),
                                     (DDPMScheduler, {"thresholding": True, "sample_max_value": 2.0})])
def test_step_outputs_match_diffusers(gen, cls, kw):
    src = cls.from_config(SD_CONFIG, **kw)
    fused = FusedScheduler.from_scheduler(src)
    src.set_timesteps(6)
    fused.set_timesteps(6)
    assert fused.init_noise_sigma == pytest.approx(float(src.init_noise_sigma), rel=1e-6)
    x = torch.randn(3, 4, 5, 7, generator=gen) * float(src.init_noise_sigma)
    y = x.clone()
    for t in src.timesteps:
        m = torch.randn(3, 4, 5, 7, generator=gen) * 2
        torch.testing.assert_close(fused.scale_model_input(y, t), src.scale_model_input(x, t))
        seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
        r = src.step(m, t, x, generator=torch.Generator().manual_seed(seed))
        f = fused.step(m, t, y, generator=torch.Generator().manual_seed(seed), return_dict=False)
        prev, x0 = f  # tuple form: prev_sample first
        torch.testing.assert_close(prev, r.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, r.pred_original_sample, rtol=1e-5, atol=1e-5)
        if hasattr(src, "step_index"):
            assert fused.step_index == src.step_index
        x, y = r.prev_sample, prev


def test_add_noise_matches_diffusers(gen):
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    for cls, kw in (CASES["ddim"], CASES["dpm++2m-karras"], CASES["heun"]):
        src = cls.from_config(SD_CONFIG, **kw)
        fused = FusedScheduler.from_scheduler(src)
        for s in (src, fused):
            s.set_timesteps(8)
        t = src.timesteps[4:5].repeat(2)
        torch.testing.assert_close(fused.add_noise(x0, noise, t), src.add_noise(x0, noise, t))
        if not hasattr(src, "set_begin_index"):
            continue  # DDIM's add_noise reads the timestep itself
        for s in (src, fused):
            s.set_begin_index(4)
        torch.testing.assert_close(fused.add_noise(x0, noise, t), src.add_noise(x0, noise, t))


def test_hidden_config_keys_are_ignored():
    # The swap idiom keeps PNDM's keys as hidden entries of the DDIM config.
    ddim = DDIMScheduler.from_config(PNDMScheduler.from_config(SD_CONFIG).config)
    assert ddim.config.skip_prk_steps is True and ddim.config.set_alpha_to_one is False
    s = fastdiff.Sampler.from_diffusers(ddim, 10)
    assert s.name == "ddim"
    model = lambda x, t: 0.1 * x  # noqa: E731
    x = fastdiff.sample(model, (1, 4), scheduler=ddim, steps=5, progress=False, seeds=[0])
    assert torch.isfinite(x).all()


def test_unhonourable_config_value_names_it():
    bad = EulerDiscreteScheduler.from_config(SD_CONFIG, interpolation_type="log_linear")
    with pytest.raises(ValueError, match="interpolation_type='log_linear' is not supported"):
        fastdiff.Sampler.from_diffusers(bad, 10)
    with pytest.raises(ValueError, match="interpolation_type='log_linear' is not supported"):
        FusedScheduler.from_scheduler(bad)
    with pytest.raises(ValueError, match="variance_type='learned'"):
        FusedScheduler.from_config(SD_CONFIG, sampler="ddpm", variance_type="learned")
    with pytest.raises(ValueError, match="unknown sampler 'dpm 7m'.*'Euler a' -> euler-ancestral"):
        FusedScheduler.from_config(SD_CONFIG, sampler="dpm 7m")
    from diffusers import LCMScheduler
    with pytest.raises(ValueError, match="does not reproduce LCMScheduler in pipelines"):
        FusedScheduler.from_scheduler(LCMScheduler())


def test_import_fastdiff_does_not_import_diffusers():
    code = "import sys, fastdiff; assert 'diffusers' not in sys.modules, 'import fastdiff imported diffusers'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert fastdiff.FusedScheduler is fastdiff.integrations.diffusers.FusedScheduler
    assert fastdiff.fuse is fastdiff.integrations.diffusers.fuse


@pytest.mark.parametrize("cls", [DDPMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler,
                                 HeunDiscreteScheduler])
def test_custom_timesteps_match_diffusers(gen, cls):
    src = cls.from_config(SD_CONFIG)
    fused = FusedScheduler.from_scheduler(src)
    ts = [999, 850, 700, 500, 300, 120, 40]
    src.set_timesteps(timesteps=ts)
    fused.set_timesteps(timesteps=ts)
    assert torch.equal(fused.timesteps.float(), src.timesteps.float())
    x = torch.randn(2, 4, 3, 5, generator=gen) * float(src.init_noise_sigma)
    y = x.clone()
    takes_generator = "generator" in inspect.signature(src.step).parameters
    for t in src.timesteps:
        m = torch.randn(2, 4, 3, 5, generator=gen)
        seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
        kw = {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}
        x = src.step(m, t, x, **kw).prev_sample
        y = fused.step(m, t, y, generator=torch.Generator().manual_seed(seed)).prev_sample
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
