"""FusedScheduler inside diffusers' own pipelines: the same latents as the scheduler it
replaces, for txt2img, img2img, inpainting, SDXL, latent consistency, SD3 and Flux, on
tiny random components built from configs (offline; prompt_embeds= so no tokenizer or
text encoder is needed)."""
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, CosineDPMSolverMultistepScheduler, DDIMScheduler, DDPMScheduler,
                       DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSDEScheduler,
                       DPMSolverSinglestepScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler,
                       EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, HeunDiscreteScheduler, IPNDMScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LatentConsistencyModelImg2ImgPipeline,
                       LatentConsistencyModelPipeline, LCMScheduler, LMSDiscreteScheduler,
                       PNDMScheduler, SASolverScheduler, SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline,
                       StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       TCDScheduler, UNet2DConditionModel, UniPCMultistepScheduler)

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
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
    # EDM (variance exploding, preconditioned: the UNet sees c_in x at c_noise = log(sigma) / 4)
    "edm-euler": (EDMEulerScheduler, {"sigma_data": 0.5}),
    "edm-euler-v-exponential": (EDMEulerScheduler, {"sigma_data": 0.5, "prediction_type": "v_prediction",
                                                    "sigma_schedule": "exponential"}),
    "edm-dpm++2m": (EDMDPMSolverMultistepScheduler, {"sigma_data": 0.5}),
    "edm-dpm++3m-v-exponential": (EDMDPMSolverMultistepScheduler, {"sigma_data": 0.5, "solver_order": 3,
                                                                   "prediction_type": "v_prediction",
                                                                   "sigma_schedule": "exponential"}),
    "edm-dpm++sde-2m": (EDMDPMSolverMultistepScheduler, {"sigma_data": 0.5, "algorithm_type": "sde-dpmsolver++"}),
}
# Mid-schedule starts (img2img, inpainting), as MID_SCHEDULE lists them: every class but
# IPNDM, which diffusers gives no add_noise (test_ipndm_begin_index_matches_diffusers).
MID = [c for c in CASES if c != "ipndm"]
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


@pytest.mark.parametrize("case", ["ddim", "dpm++2m", "unipc", "euler", "euler-ancestral", "heun", "lms", "pndm",
                                  "kdpm2-ancestral", "sa-solver", "lcm", "tcd", "edm-dpm++2m"])
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


@pytest.mark.parametrize("case", ["lcm", "tcd"])
def test_consistency_eta_and_outputs_equal_original(parts, case):
    """LCM / TCD in the Stable Diffusion pipeline with the pipeline's eta (TCD's gamma),
    noise drawn from the pipeline's generator in step(), as diffusers draws it."""
    comps, data = parts
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    _swap(pipe, case)
    ref = _call(pipe, data, latents=data["latents"].clone(), eta=0.6)
    fastdiff.fuse(pipe)
    out = _call(pipe, data, latents=data["latents"].clone(), eta=0.6)
    _close(ref, out, max(float(ref.abs().max()), float(data["latents"].abs().max())))


def test_lcm_lora_swap_by_sampler_name(parts):
    """The LCM-LoRA idiom, LCMScheduler.from_config(pipe.scheduler.config), by fastdiff name."""
    comps, data = parts
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    for name, cls in (("lcm", LCMScheduler), ("tcd", TCDScheduler)):
        pipe.scheduler = cls.from_config(SD_CONFIG)
        ref = _call(pipe, data, latents=data["latents"].clone(), eta=0.3)
        pipe.scheduler = PNDMScheduler.from_config(SD_CONFIG)
        fastdiff.fuse(pipe, sampler=name)
        assert pipe.scheduler.config.scheduler_class == cls.__name__
        out = _call(pipe, data, latents=data["latents"].clone(), eta=0.3)
        _close(ref, out, max(float(ref.abs().max()), 1.0))


def test_edm_swap_by_sampler_name(parts):
    """fuse(pipe, sampler=...) between the EDM classes reads the EDM config as the other
    class's from_config would (sigma_max, sigma_data, sigma_schedule carried over)."""
    comps, data = parts
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    edm = dict(sigma_min=0.01, sigma_max=30.0, sigma_data=0.5, sigma_schedule="exponential")
    for name, cls, start in (("edm-euler", EDMEulerScheduler, EDMDPMSolverMultistepScheduler),
                             ("EDM DPM++ 2M", EDMDPMSolverMultistepScheduler, EDMEulerScheduler)):
        pipe.scheduler = cls.from_config(start(**edm).config)
        ref = _call(pipe, data, latents=data["latents"].clone())
        pipe.scheduler = start(**edm)
        fastdiff.fuse(pipe, sampler=name)
        assert pipe.scheduler.config.scheduler_class == cls.__name__ and pipe.scheduler.config.sigma_max == 30.0
        out = _call(pipe, data, latents=data["latents"].clone())
        _close(ref, out, float(ref.abs().max()))


def test_pndm_mid_schedule_refusals(parts):
    comps, data = parts
    pipe = StableDiffusionImg2ImgPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = PNDMScheduler.from_config(SD_CONFIG, skip_prk_steps=False)
    fastdiff.fuse(pipe)
    with pytest.raises(ValueError, match="PNDMScheduler with Runge-Kutta warm-up.*cannot start mid-schedule"):
        _call(pipe, data, image=data["image"], strength=0.6)
    fused = FusedScheduler.from_config(SD_CONFIG)
    fused.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="PNDMScheduler cannot start at begin_index=1"):
        fused.set_begin_index(1)


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


# -- latent consistency models -----------------------------------------------------------------

def test_latent_consistency_pipelines_equal_original(parts):
    """LatentConsistencyModelPipeline (original_inference_steps, the guidance embedding, its
    output the last step's `denoised`) and its img2img pipeline (set_timesteps(strength=))."""
    comps, data = parts
    torch.manual_seed(data["seed"])
    kw = dict(unet=_unet(time_cond_proj_dim=8), vae=comps["vae"], text_encoder=None, tokenizer=None,
              scheduler=LCMScheduler.from_config(SD_CONFIG), safety_checker=None, feature_extractor=None,
              requires_safety_checker=False)
    for cls, extra in ((LatentConsistencyModelPipeline, dict(latents=data["latents"], original_inference_steps=30)),
                       (LatentConsistencyModelImg2ImgPipeline, dict(image=data["image"], strength=0.6))):
        pipe = cls(**kw)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe(prompt_embeds=data["emb"], num_inference_steps=4, guidance_scale=6.0,  # noqa: E731
                           output_type="latent", generator=torch.Generator().manual_seed(data["seed"]),
                           **{k: v.clone() if torch.is_tensor(v) else v for k, v in extra.items()}).images
        ref = run()
        fastdiff.fuse(pipe)
        out = run()
        pipe.scheduler = LCMScheduler.from_config(SD_CONFIG)
        _close(ref, out, max(float(ref.abs().max()), 1.0))


# -- flow matching: Stable Diffusion 3 and Flux ---------------------------------------------

# (diffusers class, config): the flow-matching schedulers SD3 / Flux pipelines run, and the
# DPM-Solver / UniPC flow grids.
FLOW_CASES = {
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {"shift": 3.0}),
    "flow-euler-dynamic": (FlowMatchEulerDiscreteScheduler, {"use_dynamic_shifting": True, "base_image_seq_len": 16,
                                                             "max_image_seq_len": 256}),
    "flow-euler-karras": (FlowMatchEulerDiscreteScheduler, {"shift": 3.0, "use_karras_sigmas": True}),
    "flow-euler-terminal": (FlowMatchEulerDiscreteScheduler, {"shift": 2.0, "shift_terminal": 0.1}),
    "flow-euler-stochastic": (FlowMatchEulerDiscreteScheduler, {"shift": 3.0, "stochastic_sampling": True}),
    "flow-heun": (FlowMatchHeunDiscreteScheduler, {"shift": 3.0}),
    "unipc-flow": (UniPCMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                             "flow_shift": 3.0}),
    "dpm++2m-flow": (DPMSolverMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                   "flow_shift": 3.0}),
}


@pytest.fixture(scope="module")
def sd3(parts):
    comps, data = parts
    g = torch.Generator().manual_seed(data["seed"])
    torch.manual_seed(data["seed"])
    # 16 latent channels: SD3's inpainting pipeline insists on them
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8, shift_factor=0.1, scaling_factor=1.3)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, out_channels=16,
                                        pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    emb = dict(prompt_embeds=torch.randn(2, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(2, 16, generator=g),
               negative_prompt_embeds=torch.randn(2, 5, 16, generator=g),
               negative_pooled_prompt_embeds=torch.randn(2, 16, generator=g))
    return pipe.components, emb, torch.randn(2, 16, 8, 8, generator=g)


def _flow_pipe(cls, components, case):
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    sched, cfg = FLOW_CASES[case]
    pipe.scheduler = sched.from_config(cfg)
    return pipe


def _sd3_run(pipe, emb, seed, **kw):
    torch.manual_seed(seed)  # SD3's step() gets no generator: stochastic sampling draws from torch's
    return pipe(**emb, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent", height=8, width=8,
                generator=torch.Generator().manual_seed(seed), **kw).images


@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_sd3_equals_original_scheduler(parts, sd3, case):
    """StableDiffusion3Pipeline: timesteps in 0..1000 float units, mu computed by the
    pipeline for dynamic shifting, the same latents."""
    _, data = parts
    components, emb, latents = sd3
    pipe = _flow_pipe(StableDiffusion3Pipeline, components, case)
    calls = {}
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls[run].append(k["timestep"][0]) or forward(*a, **k)
    run, calls["ref"] = "ref", []
    ref = _sd3_run(pipe, emb, data["seed"], latents=latents.clone())
    fastdiff.fuse(pipe)
    assert isinstance(pipe.scheduler, FusedScheduler)
    run, calls["fused"] = "fused", []
    out = _sd3_run(pipe, emb, data["seed"], latents=latents.clone())
    pipe.transformer.forward = forward
    assert pipe.scheduler.order == FLOW_CASES[case][0].order
    # the same transformer calls at the same float times (float32 rounding)
    torch.testing.assert_close(torch.stack(calls["fused"]), torch.stack(calls["ref"]), rtol=1e-6, atol=1e-4)
    _close(ref, out, max(float(ref.abs().max()), float(latents.abs().max())))


@pytest.mark.parametrize("case", ["flow-euler", "flow-euler-dynamic", "flow-euler-stochastic", "flow-heun"])
def test_sd3_img2img_and_inpaint_equal_original_scheduler(parts, sd3, case):
    """Mid-schedule starts (strength 0.6): scale_noise at the begin index, the remaining
    steps as the replaced class takes them (inpainting: scale_noise at every step)."""
    _, data = parts
    components, emb, _ = sd3
    for cls, kw in ((StableDiffusion3Img2ImgPipeline, {}),
                    (StableDiffusion3InpaintPipeline, {"mask_image": data["mask"]})):
        pipe = _flow_pipe(cls, components, case)
        ref = _sd3_run(pipe, emb, data["seed"], image=data["image"], strength=0.6, **kw)
        fastdiff.fuse(pipe)
        out = _sd3_run(pipe, emb, data["seed"], image=data["image"], strength=0.6, **kw)
        _close(ref, out, float(ref.abs().max()))


@pytest.mark.parametrize("case", ["flow-euler-dynamic", "flow-euler", "unipc-flow"])
def test_flux_equals_original_scheduler(parts, case):
    """FluxPipeline: set_timesteps(sigmas=linspace(1, 1/N, N), mu=calculate_shift(...)) (UniPC
    with flow sigmas: mu alone), packed latents."""
    _, data = parts
    torch.manual_seed(data["seed"])
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=8, shift_factor=0.1, scaling_factor=1.3)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    sched, cfg = FLOW_CASES[case]
    cfg = {**cfg, "use_dynamic_shifting": True, "base_image_seq_len": 4, "max_image_seq_len": 64} \
        if case == "unipc-flow" else cfg
    pipe = FluxPipeline(scheduler=sched.from_config(cfg), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(data["seed"])
    kw = dict(prompt_embeds=torch.randn(2, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(2, 16, generator=g),
              num_inference_steps=STEPS, output_type="latent", height=16, width=16)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(data["seed"])).images
    fastdiff.fuse(pipe)
    out = pipe(**kw, generator=torch.Generator().manual_seed(data["seed"])).images
    _close(ref, out, float(ref.abs().max()))


# (config, set_timesteps kwargs, stochastic): FlowMatchEulerDiscreteScheduler driven directly
FLOW_LOCKSTEP = [
    ({"use_dynamic_shifting": True}, {"sigmas": "flux", "mu": 0.9}, False),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear", "use_karras_sigmas": True},
     {"sigmas": "flux", "mu": 2.5}, False),
    ({"shift": 3.0}, {"timesteps": [990.0, 800.5, 620.0, 410.25, 230.0, 60.0]}, False),
    ({"shift": 3.0}, {"timesteps": [990.0, 700.0, 420.0, 150.0], "sigmas": [0.95, 0.7, 0.4, 0.12]}, False),
    ({"shift": 2.0, "invert_sigmas": True}, {"num_inference_steps": 7}, False),
    ({"shift": 3.0, "stochastic_sampling": True}, {"num_inference_steps": 7}, True),
    ({"shift": 3.0}, {"num_inference_steps": 7, "mu": 1.3}, False),  # mu without dynamic shifting: ignored
]


@pytest.mark.parametrize("case", range(len(FLOW_LOCKSTEP)))
def test_flow_match_lockstep_with_diffusers(gen, case):
    """Every set_timesteps argument FlowMatchEulerDiscreteScheduler takes (custom sigmas and
    mu as Flux passes them, custom timesteps, inversion, stochastic sampling), then a
    mid-schedule start with scale_noise: timesteps, sigmas, scale_noise and every step equal."""
    config, set_kw, noisy = FLOW_LOCKSTEP[case]
    set_kw = dict(set_kw)
    if set_kw.get("sigmas") == "flux":
        set_kw["sigmas"] = np.linspace(1.0, 1 / 7, 7)
    src = FlowMatchEulerDiscreteScheduler(**config)
    fused = FusedScheduler.from_scheduler(src)
    for begin in (None, 3):
        for sch in (src, fused):
            sch.set_timesteps(**set_kw)
        # (the shift in float64 here, float32 there: an ulp apart)
        torch.testing.assert_close(fused.timesteps, src.timesteps, rtol=1e-6, atol=0)
        torch.testing.assert_close(fused.sigmas, src.sigmas, rtol=1e-6, atol=1e-7)
        x0, noise = torch.randn(2, 4, 3, 5, generator=gen), torch.randn(2, 4, 3, 5, generator=gen)
        ts = src.timesteps
        if begin is not None:
            for sch in (src, fused):
                sch.set_begin_index(begin)
            ts = ts[begin:]
        x = src.scale_noise(x0, ts[:1].repeat(2), noise)
        y = fused.scale_noise(x0, ts[:1].repeat(2), noise)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
        for t in ts:
            m = torch.randn(2, 4, 3, 5, generator=gen)
            seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
            x = src.step(m, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
            y = fused.step(m, t, y, generator=torch.Generator().manual_seed(seed)).prev_sample
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
            assert fused.step_index == src.step_index
    assert noisy == fused.sampler.stochastic


def test_flow_heun_lockstep_with_diffusers(gen):
    src = FlowMatchHeunDiscreteScheduler(shift=3.0)
    fused = FusedScheduler.from_scheduler(src)
    for sch in (src, fused):
        sch.set_timesteps(6)
        sch.set_begin_index(4)  # a step's first call, as img2img pipelines begin (t_start * order)
    torch.testing.assert_close(fused.timesteps, src.timesteps, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused.sigmas, src.sigmas, rtol=1e-6, atol=1e-7)
    x0, noise = torch.randn(2, 4, 3, 5, generator=gen), torch.randn(2, 4, 3, 5, generator=gen)
    x = src.scale_noise(x0, src.timesteps[4:5].repeat(2), noise)
    y = fused.scale_noise(x0, src.timesteps[4:5].repeat(2), noise)
    for t in src.timesteps[4:]:
        m = torch.randn(2, 4, 3, 5, generator=gen)
        x, y = src.step(m, t, x).prev_sample, fused.step(m, t, y).prev_sample
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_ipndm_begin_index_matches_diffusers(gen):
    """IPNDM after set_begin_index (a fresh 4-step Adams-Bashforth warm-up from there, as
    diffusers' IPNDMScheduler); diffusers gives it no add_noise, so neither does FusedScheduler."""
    src = IPNDMScheduler()
    fused = FusedScheduler.from_scheduler(src)
    for sch in (src, fused):
        sch.set_timesteps(9)
        sch.set_begin_index(3)
    x = torch.randn(2, 4, 3, 5, generator=gen)
    y = x.clone()
    for t in src.timesteps[3:]:
        m = torch.randn(2, 4, 3, 5, generator=gen)
        x, y = src.step(m, t, x).prev_sample, fused.step(m, t, y).prev_sample
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    with pytest.raises(AttributeError, match="IPNDMScheduler has no add_noise"):
        fused.add_noise(x, x, src.timesteps[3:4])


@pytest.mark.parametrize("cls, set_kw, eta", [
    (LCMScheduler, {"num_inference_steps": 5, "original_inference_steps": 30}, None),
    (LCMScheduler, {"num_inference_steps": 4, "strength": 0.6}, None),
    (LCMScheduler, {"timesteps": [999, 759, 499, 259, 19]}, None),
    (TCDScheduler, {"num_inference_steps": 5, "strength": 0.7}, 0.4),
    (TCDScheduler, {"num_inference_steps": 6}, 0.0),
])
def test_consistency_lockstep_with_diffusers(gen, cls, set_kw, eta):
    """LCM / TCD set_timesteps arguments (original_inference_steps, img2img strength, custom
    timesteps), a begin index, and both outputs of every step: prev_sample and LCM's
    `denoised` / TCD's `pred_noised_sample` (the second element of the tuple form)."""
    src = cls.from_config(SD_CONFIG, prediction_type="v_prediction")
    fused = FusedScheduler.from_scheduler(src)
    field = {LCMScheduler: "denoised", TCDScheduler: "pred_noised_sample"}[cls]
    step_kw = {} if eta is None else {"eta": eta}
    for begin in (None, 2):
        for sch in (src, fused):
            sch.set_timesteps(**set_kw)
            if begin is not None:
                sch.set_begin_index(begin)
        assert torch.equal(fused.timesteps, src.timesteps)
        x = torch.randn(2, 4, 3, 5, generator=gen)
        y = x.clone()
        for t in src.timesteps[begin or 0:]:
            m = torch.randn(2, 4, 3, 5, generator=gen)
            seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
            r = src.step(m, t, x, generator=torch.Generator().manual_seed(seed), **step_kw)
            f = fused.step(m, t, y, generator=torch.Generator().manual_seed(seed), **step_kw)
            prev, second = fused_tuple = f
            assert fused_tuple[1] is second
            tol = dict(rtol=1e-5, atol=1e-5 * float(r.prev_sample.abs().max()))
            torch.testing.assert_close(prev, r.prev_sample, **tol)
            torch.testing.assert_close(second, getattr(r, field), **tol)
            torch.testing.assert_close(getattr(f, field), getattr(r, field), **tol)
            x, y = r.prev_sample, prev


@pytest.mark.parametrize("cls, config", [
    (EDMEulerScheduler, {}),
    (EDMEulerScheduler, {"prediction_type": "v_prediction", "sigma_schedule": "exponential",
                         "final_sigmas_type": "sigma_min"}),
    (EDMDPMSolverMultistepScheduler, {"solver_type": "heun"}),
    (EDMDPMSolverMultistepScheduler, {"solver_order": 3, "prediction_type": "v_prediction",
                                      "sigma_schedule": "exponential"}),
    (CosineDPMSolverMultistepScheduler, {}),
])
def test_edm_lockstep_with_diffusers(gen, cls, config):
    """The EDM protocol driven directly, full runs and from a begin index: timesteps
    (c_noise = log(sigma) / 4), sigmas, init_noise_sigma, add_noise, scale_model_input
    (c_in(sigma)), every step and its data estimate, against diffusers' own
    precondition_outputs (c_skip x + c_out F; cosine DPM-Solver preconditions the same way)."""
    src = cls(sigma_data=0.5, **config)
    fused = FusedScheduler.from_scheduler(src)
    for begin in (None, 3):
        for sch in (src, fused):
            sch.set_timesteps(7)
        # (EDM DPM-Solver's Karras sigmas are computed in float32 there, float64 here: a few ulp)
        torch.testing.assert_close(fused.timesteps, src.timesteps, rtol=1e-6, atol=0)
        torch.testing.assert_close(fused.sigmas, src.sigmas, rtol=1e-6, atol=0)
        assert fused.init_noise_sigma == pytest.approx(float(src.init_noise_sigma), rel=1e-6)
        x0, noise = torch.randn(2, 4, 3, 5, generator=gen), torch.randn(2, 4, 3, 5, generator=gen)
        start = begin or 0
        if begin is not None:
            for sch in (src, fused):
                sch.set_begin_index(begin)
        ts = src.timesteps[start:]
        # each its own timesteps, as a pipeline passes them
        x = src.add_noise(x0, noise, ts[:1].repeat(2))
        y = fused.add_noise(x0, noise, fused.timesteps[start:start + 1].repeat(2))
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6 * float(x.abs().max()))
        for i, t in enumerate(ts, start):
            m = torch.randn(2, 4, 3, 5, generator=gen)
            tol = dict(rtol=1e-5, atol=1e-5 * float(x.abs().max()))
            torch.testing.assert_close(fused.scale_model_input(y, t), src.scale_model_input(x, t), **tol)
            ref_x0 = src.precondition_outputs(x, m, src.sigmas[i])
            seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
            r = src.step(m, t, x, generator=torch.Generator().manual_seed(seed))
            f = fused.step(m, t, y, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(f.prev_sample, r.prev_sample, **tol)
            torch.testing.assert_close(f.pred_original_sample, ref_x0, **tol)
            if getattr(r, "pred_original_sample", None) is not None:  # EDMEuler returns it
                torch.testing.assert_close(f.pred_original_sample, r.pred_original_sample, **tol)
            assert fused.step_index == src.step_index
            x, y = r.prev_sample, f.prev_sample


@pytest.mark.parametrize("cls, config", [
    (EDMDPMSolverMultistepScheduler, {"solver_order": 3}),
    (DPMSolverMultistepScheduler, {"solver_order": 3}),
    (DPMSolverMultistepScheduler, {"final_sigmas_type": "sigma_min"}),
    (DEISMultistepScheduler, {"solver_order": 3}),
])
def test_restart_of_a_long_run_keeps_its_final_orders(gen, cls, config):
    """20 steps started at 8 (img2img at strength 0.6): diffusers lowers the last orders
    (lower_order_final) only in runs under 15 steps, counted over the whole run, so the
    12-step restart keeps the full run's final orders."""
    src = cls(**config)
    fused = FusedScheduler.from_scheduler(src)
    for sch in (src, fused):
        sch.set_timesteps(20)
        sch.set_begin_index(8)
    x = torch.randn(2, 4, 3, 5, generator=gen) * 3
    y = x.clone()
    for t in src.timesteps[8:]:
        m = torch.randn(2, 4, 3, 5, generator=gen)
        x, y = src.step(m, t, x).prev_sample, fused.step(m, t, y).prev_sample
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_step_arguments_of_the_class_at_their_default(gen):
    """A step() argument of the replaced class is accepted at its default (the same step
    as diffusers'); another value is refused naming it, per_token_timesteps with why."""
    src = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fused = FusedScheduler.from_scheduler(src)
    for sch in (src, fused):
        sch.set_timesteps(5)
    x = torch.randn(2, 6, 4, generator=gen)
    m = torch.randn(2, 6, 4, generator=gen)
    t = src.timesteps[0]
    ref = src.step(m, t, x, per_token_timesteps=None, s_churn=0.0, s_tmax=float("inf")).prev_sample
    out = fused.step(m, t, x, per_token_timesteps=None, s_churn=0.0, s_tmax=float("inf")).prev_sample
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    per_token = src.timesteps[1] * (0.5 + torch.rand(2, 6, generator=gen))
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler.step\\(per_token_timesteps=...\\) is not "
                                         "reproduced: .*step size per token"):
        fused.step(m, src.timesteps[1], out, per_token_timesteps=per_token)
    ddim_src = DDIMScheduler.from_config(SD_CONFIG)
    ddim = FusedScheduler.from_scheduler(ddim_src)
    for sch in (ddim_src, ddim):
        sch.set_timesteps(5)
    t = ddim_src.timesteps[0]  # DDIMPipeline passes use_clipped_model_output=None: diffusers' False
    torch.testing.assert_close(ddim.step(m, t, x, use_clipped_model_output=None).prev_sample,
                               ddim_src.step(m, t, x, use_clipped_model_output=None).prev_sample)
    edm = FusedScheduler.from_scheduler(EDMEulerScheduler())
    edm.set_timesteps(4)
    with pytest.raises(TypeError, match="unsupported argument.*'per_token_timesteps'"):
        edm.step(m, edm.timesteps[0], x, per_token_timesteps=None)  # EDMEuler's step does not take it


def test_refusals_name_the_class_and_why():
    from diffusers import CMStochasticIterativeScheduler, DDIMInverseScheduler
    for cls, why in ((CMStochasticIterativeScheduler, "not verified"),
                     (DDIMInverseScheduler, "inversion"), (diffusers_cls("RePaintScheduler"), "resampling jumps")):
        with pytest.raises(ValueError, match=f"does not reproduce {cls.__name__} in pipelines: .*{why}"):
            FusedScheduler.from_scheduler(cls())
    dpm = FusedScheduler.from_config(SD_CONFIG, sampler="dpm++2m", use_flow_sigmas=True,
                                     prediction_type="flow_prediction", use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler.set_timesteps\\(mu=...\\) is not reproduced"):
        dpm.set_timesteps(8, mu=0.7)
    with pytest.raises(ValueError, match="custom sigmas for EulerDiscreteScheduler"):
        FusedScheduler.from_config(SD_CONFIG, sampler="euler").set_timesteps(sigmas=[10.0, 5.0, 1.0])
    with pytest.raises(ValueError, match="TCDScheduler.set_timesteps\\(original_inference_steps=...\\)"):
        FusedScheduler.from_scheduler(TCDScheduler()).set_timesteps(4, original_inference_steps=40)
    with pytest.raises(TypeError, match="unexpected argument.*'strength'"):
        FusedScheduler.from_scheduler(DDIMScheduler()).set_timesteps(4, strength=0.5)
    with pytest.raises(AttributeError, match="FlowMatchEulerDiscreteScheduler has no add_noise.*scale_noise"):
        fused = FusedScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler())
        fused.set_timesteps(4)
        fused.add_noise(torch.ones(1, 2), torch.ones(1, 2), fused.timesteps[:1])
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler.set_shift is not reproduced"):
        FusedScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler()).set_shift(2.0)
    with pytest.raises(ValueError, match="use_dynamic_shifting=True needs"):
        FusedScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)).set_timesteps(4)


def diffusers_cls(name):
    import diffusers
    return getattr(diffusers, name)


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


@pytest.mark.parametrize("cls, kw", [
    (UniPCMultistepScheduler, {}), (UniPCMultistepScheduler, {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    (UniPCMultistepScheduler, {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    (UniPCMultistepScheduler, {"disable_corrector": [2]}),
    (SASolverScheduler, {}), (SASolverScheduler, {"predictor_order": 3, "corrector_order": 3}),
])
def test_states_edited_between_steps_follow_diffusers(cls, kw):
    """UniPC's and SA-Solver's correctors start from the sample diffusers stored: a state the
    caller edits between steps (a callback, a blend outside a mask that changes per step)
    enters only through the new model output. FusedScheduler does the same, for edits that
    replace the state and edits in place."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    W = 0.1 * torch.randn(4, 4, generator=g)
    x_T = torch.randn(2, 4, 6, 5, generator=g)
    edits = {k: (0.8 + 0.4 * torch.rand(2, 4, 6, 5, generator=g), 0.3 * torch.randn(2, 4, 6, 5, generator=g))
             for k in (1, 3, 4)}

    def model(x):  # a closed-form-like denoiser plus a small mixing term: not chaotic
        return 0.4 * x + torch.einsum("ij,bjhw->bihw", W, x)

    ref = cls.from_config(SD_CONFIG, **kw)
    out = {}
    for name, sched in (("diffusers", ref), ("fused", FusedScheduler.from_config(ref.config))):
        for in_place in (False, True):
            sched.set_timesteps(8)
            x = x_T * sched.init_noise_sigma
            noisy = "generator" in inspect.signature(cls.step).parameters
            step_kw = {"generator": torch.Generator().manual_seed(5)} if noisy else {}
            for k, t in enumerate(sched.timesteps):
                x = sched.step(model(sched.scale_model_input(x, t)), t, x, return_dict=False, **step_kw)[0]
                if k in edits:
                    a, b = edits[k]
                    x = x.mul_(a).add_(b) if in_place else x * a + b
            out[name, in_place] = x
    for in_place in (False, True):
        want = out["diffusers", in_place]
        err = float((out["fused", in_place] - want).abs().max())
        assert err <= 1e-5 * float(want.abs().max()), (in_place, err)


COPY_CASES = [(DPMSolverMultistepScheduler, {}), (UniPCMultistepScheduler, {}),
              (EulerAncestralDiscreteScheduler, {}), (DDIMScheduler, {})]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("case", range(len(COPY_CASES)), ids=lambda i: COPY_CASES[i][0].__name__)
def test_a_copy_made_mid_run_continues_the_run(gen, case, how):
    """A FusedScheduler copied in the middle of a run (copy.deepcopy, pickle) continues
    that run, history and step index included, as a copy of diffusers' scheduler does;
    the original goes on unaffected (the copy has its own history tensors)."""
    import copy
    import pickle
    cls, kw = COPY_CASES[case]
    src = cls(**kw)
    noisy = cls is EulerAncestralDiscreteScheduler
    fused = FusedScheduler.from_scheduler(src)
    for sch in (src, fused):
        sch.set_timesteps(8)
    x = torch.randn(2, 4, 3, 5, generator=gen) * src.init_noise_sigma
    y = x.clone()
    ms = [torch.randn(2, 4, 3, 5, generator=gen) for _ in src.timesteps]
    seeds = [int(s) for s in torch.randint(0, 2 ** 31, (len(ms),), generator=gen)]

    def run(sch, x, k0, k1):
        for k in range(k0, k1):
            t = sch.timesteps[k]
            kw = {"generator": torch.Generator().manual_seed(seeds[k])} if noisy else {}
            x = sch.step(ms[k], t, x, **kw).prev_sample
        return x

    x, y = run(src, x, 0, 3), run(fused, y, 0, 3)
    if how == "deepcopy":
        src_c, fused_c = copy.deepcopy(src), copy.deepcopy(fused)
    else:
        src_c, fused_c = pickle.loads(pickle.dumps(src)), pickle.loads(pickle.dumps(fused))
    assert fused_c.step_index == 3 and getattr(src_c, "step_index", 3) == 3
    xc, yc = run(src_c, x.clone(), 3, 8), run(fused_c, y.clone(), 3, 8)
    x, y = run(src, x, 3, 8), run(fused, y, 3, 8)
    scale = float(x.abs().max())
    torch.testing.assert_close(yc, xc, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * scale)


CHURN_CASES = [(EulerDiscreteScheduler, {}, {"s_churn": 3.0, "s_tmin": 0.2, "s_tmax": 8.0, "s_noise": 1.01}),
               (EulerDiscreteScheduler, {"prediction_type": "v_prediction"}, {"s_churn": 1.0}),
               (EDMEulerScheduler, {}, {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}),
               (FlowMatchHeunDiscreteScheduler, {"shift": 3.0},
                {"s_churn": 4.0, "s_tmin": 0.3, "s_tmax": 0.95, "s_noise": 1.02}),
               (FlowMatchEulerDiscreteScheduler, {"shift": 3.0}, {"s_churn": 4.0, "s_noise": 1.02})]


def _churn_lockstep(src, fused, steps, churn, gen):
    """diffusers' scheduler and FusedScheduler stepped side by side with the same model
    outputs, noise seeds and step() arguments: [(diffusers' state, fused state)] per step,
    and the last model output."""
    for sch in (src, fused):
        sch.set_timesteps(steps)
    x = torch.randn(2, 4, 3, 5, generator=gen) * getattr(src, "init_noise_sigma", 1.0)
    y, states = x.clone(), []
    for t in src.timesteps:
        m = torch.randn(2, 4, 3, 5, generator=gen)
        seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
        x = src.step(m, t, x, generator=torch.Generator().manual_seed(seed), **churn).prev_sample
        y = fused.step(m, t, y, generator=torch.Generator().manual_seed(seed), **churn).prev_sample
        states.append((x, y))
    return states, m


@pytest.mark.parametrize("case", range(len(CHURN_CASES)), ids=lambda i: CHURN_CASES[i][0].__name__)
def test_churn_step_arguments_follow_diffusers(gen, case):
    """EDM's churn passed to step(), as a pipeline's loop would pass it every step: the
    fused run is built with it and equals diffusers' steps drawing the same noise
    (FlowMatchEulerDiscreteScheduler takes and ignores it: so does FusedScheduler); a run
    without it afterwards is the plain one again; a change mid-run is refused."""
    cls, config, churn = CHURN_CASES[case]
    src = cls(**config)
    fused = FusedScheduler.from_scheduler(src)
    for kw in (churn, {}):
        states, m = _churn_lockstep(src, fused, 6, kw, gen)
        for x, y in states:
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    assert fused.sampler.stochastic is False
    if cls is not FlowMatchEulerDiscreteScheduler:
        fused.set_timesteps(6)
        fused.step(m, fused.timesteps[0], y)
        with pytest.raises(ValueError, match="s_churn/s_tmin/s_tmax/s_noise changed in the middle of a run"):
            fused.step(m, fused.timesteps[1], y, **churn)


@pytest.mark.parametrize("cls, config", [(EulerDiscreteScheduler, {"use_karras_sigmas": True}),
                                         (EulerDiscreteScheduler, {"use_exponential_sigmas": True}),
                                         (EulerDiscreteScheduler, {"prediction_type": "v_prediction"})],
                         ids=["karras", "exponential", "v_prediction"])
def test_churn_bounds_at_the_schedules_levels_follow_diffusers(gen, cls, config):
    """s_tmin / s_tmax set to one of the run's noise levels (as read from diffusers'
    sigmas) include that level, as diffusers' float32 comparison does; one-element
    tensors are taken as their values."""
    src = cls(**config)
    src.set_timesteps(5)
    levels = [float(v) for v in src.sigmas[:5]]
    for j in (1, 3):
        for churn in ({"s_churn": 2.0, "s_tmin": levels[j], "s_tmax": levels[j]},
                      {"s_churn": torch.tensor(2.0), "s_tmin": levels[j]},
                      {"s_churn": 2, "s_tmax": levels[j], "s_noise": np.float32(1.01)}):
            src = cls(**config)
            (x, y), = _churn_lockstep(src, FusedScheduler.from_scheduler(src), 5, churn, gen)[0][-1:]
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_churn_with_a_non_finite_noise_scale_is_refused(gen):
    fused = FusedScheduler.from_scheduler(EulerDiscreteScheduler())
    fused.set_timesteps(4)
    x = torch.randn(1, 4, 3, 3, generator=gen)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="s_noise must be a finite number"):
            fused.step(torch.randn_like(x), fused.timesteps[0], x, s_churn=1.0, s_noise=bad)
