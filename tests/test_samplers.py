"""Fused samplers against diffusers' schedulers: same model, same noise, same timesteps.

Two models:
  * a small random-weight ``diffusers.UNet2DModel`` added (x 0.1) to the exact noise
    prediction of Gaussian data, so trajectories stay O(1) like a trained denoiser's and an
    absolute tolerance of 1e-4 (fp32) is meaningful;
  * a cheap closed-form-plus-nonlinearity model for the full matrix of configurations
    (prediction types x spacings x Karras x clipping / thresholding).
"""
import copy
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import diffusers
from fastdiff.samplers import SAMPLERS, Sampler, sample
from fastdiff.samplers.registry import OWN_SCHEDULE, family
from fastdiff.schedules import NoiseSchedule

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

ATOL = 1e-4


class Denoiser(nn.Module):
    """The exact prediction for x0 ~ N(0, 0.5^2) on ``ac`` (alphas_cumprod), as epsilon /
    v / sample prediction, plus a nonlinear term (and, given ``net``, 0.1 x a UNet's
    output). Finite at alpha = 0 (zero terminal SNR) for v and sample prediction."""

    def __init__(self, ac, prediction_type="epsilon", net=None):
        super().__init__()
        self.ac = np.asarray(ac, dtype=np.float64)
        self.prediction_type, self.net = prediction_type, net

    def forward(self, x, t):
        t = torch.as_tensor(t).reshape(-1)
        ac = np.interp(t.double().numpy(), np.arange(len(self.ac)), self.ac)
        ac = torch.from_numpy(ac).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        a, s = ac.sqrt(), (1 - ac).sqrt()
        v = 0.25 * a * a + s * s
        eps, x0 = s * x / v, 0.25 * a * x / v  # exact: a x0 + s eps = x
        pred = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[self.prediction_type]
        pred = pred + 0.05 * torch.sin(3 * x)
        if self.net is not None:
            pred = pred + 0.1 * self.net(x, t.expand(x.shape[0])).sample
        return pred


@pytest.fixture(scope="module")
def unet():
    seed = random.SystemRandom().randrange(2 ** 31)  # fresh weights each run
    print(f"UNet weight seed: {seed}")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, add_attention=False, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def diffusers_loop(sched, steps, model, x_T, generator=None, **step_kw):
    """The standard diffusers pipeline loop."""
    sched = copy.deepcopy(sched)
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        kw = dict(step_kw)
        if generator is not None:
            kw["generator"] = generator
        x = sched.step(out, t, x, **kw).prev_sample
    return x, sched.timesteps


def fastdiff_loop(sched, steps, model, x_T, generator=None, **opts):
    """The same loop through the step-by-step Sampler API."""
    s = Sampler.from_diffusers(sched, steps, generator=generator, **opts)
    x = s.init_noise(x_T)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x)
    return x, s.timesteps


def lockstep(sched, steps, model, x_T, seed=None, **step_kw):
    """diffusers' loop and the Sampler side by side with ONE model call per step (on
    diffusers' input; the Sampler's own model input is checked to match it), so an
    expensive model runs once. Returns the max abs difference of states over all steps."""
    sched = copy.deepcopy(sched)
    sched.set_timesteps(steps)
    s = Sampler.from_diffusers(sched, steps, generator=None if seed is None else
                               torch.Generator().manual_seed(seed), **step_kw)
    assert torch.equal(s.timesteps.double(), sched.timesteps.double()), \
        f"timesteps differ: {s.timesteps} vs {sched.timesteps}"
    g = None if seed is None else torch.Generator().manual_seed(seed)
    x_ref = x_T * sched.init_noise_sigma
    x = s.init_noise(x_T)
    worst = (x - x_ref).abs().max().item()
    for t in sched.timesteps:
        inp_ref = sched.scale_model_input(x_ref, t)
        inp = s.scale_model_input(x, t)
        worst = max(worst, (inp - inp_ref).abs().max().item())
        out = model(inp_ref, t)
        kw = dict(step_kw, generator=g) if g is not None else dict(step_kw)
        x_ref = sched.step(out, t, x_ref, **kw).prev_sample
        x = s.step(out, t, x)
        worst = max(worst, (x - x_ref).abs().max().item())
    assert torch.isfinite(x_ref).all()
    return worst


def _run_both(cls, config, steps, model_fn, x_T, stochastic=None, **step_kw):
    """Whole loops of both; tolerance ATOL relative to the sample scale (at 5 steps some
    configurations end far from the data, where fp32 rounding in diffusers itself grows)."""
    sched = getattr(diffusers, cls)(**config)
    model = model_fn(sched)
    g1 = g2 = None
    if stochastic is not None:
        g1, g2 = torch.Generator().manual_seed(stochastic), torch.Generator().manual_seed(stochastic)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_t = diffusers_loop(sched, steps, model, x_T, g1, **step_kw)
        out, out_t = fastdiff_loop(sched, steps, model, x_T, g2, **step_kw)
    assert torch.equal(out_t.double(), ref_t.double()), f"timesteps differ: {out_t} vs {ref_t}"
    assert torch.isfinite(ref).all()
    err, scale = (out - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert err <= ATOL * scale, f"{cls} {config}: max abs diff {err:.3g} (ref scale {scale:.3g})"


# -- the UNet ----------------------------------------------------------------------------

UNET_CASES = [
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True,
                                     "prediction_type": "v_prediction"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("DPMSolverSinglestepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "solver_type": "heun"}),
    ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "timestep_spacing": "leading", "steps_offset": 1}),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("HeunDiscreteScheduler", {}),
    ("PNDMScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1}),
    ("LMSDiscreteScheduler", {}),
]


@pytest.mark.parametrize("cls,config", UNET_CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(UNET_CASES)])
def test_unet_parity(cls, config, unet, gen):
    x_T = torch.randn(2, 3, 8, 8, generator=gen)
    sched = getattr(diffusers, cls)(**config)
    model = Denoiser(sched.alphas_cumprod, config.get("prediction_type", "epsilon"), unet)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err = lockstep(sched, 6, model, x_T)
    assert err <= ATOL, f"{cls} {config}: max abs diff {err:.3g}"


STOCHASTIC = [
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", {"variance_type": "fixed_small_log", "timestep_spacing": "trailing"}, {}),
    ("DDPMScheduler", {"variance_type": "fixed_large", "prediction_type": "v_prediction"}, {}),
    ("DDIMScheduler", {}, {"eta": 1.0}),
    ("DDIMScheduler", {"timestep_spacing": "linspace"}, {"eta": 0.5, "use_clipped_model_output": True}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading", "prediction_type": "v_prediction"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                     "use_karras_sigmas": True}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
]
UNET_STOCHASTIC = (0, 3, 5, 7)  # DDPM, DDIM eta=1, Euler ancestral, SDE-DPM-Solver++ 2M


@pytest.mark.parametrize("case", range(len(STOCHASTIC)),
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(STOCHASTIC)])
def test_stochastic_parity_same_noise(case, unet, gen):
    """Same generator -> same noise stream -> same samples (noise drawn in the same order).
    The main four run on the UNet (one model call per step), all on the cheap model."""
    cls, config, step_kw = STOCHASTIC[case]
    x_T = torch.randn(2, 3, 8, 8, generator=gen)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    pred = config.get("prediction_type", "epsilon")
    _run_both(cls, config, 8, lambda s: Denoiser(s.alphas_cumprod, pred), x_T, stochastic=seed, **step_kw)
    if case in UNET_STOCHASTIC:
        sched = getattr(diffusers, cls)(**config)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            err = lockstep(sched, 6, Denoiser(sched.alphas_cumprod, pred, unet), x_T, seed=seed, **step_kw)
        assert err <= ATOL, f"{cls} {config} on the UNet: max abs diff {err:.3g}"


def test_sample_with_raw_unet_matches_diffusers(unet, gen):
    """``sample()`` takes a diffusers UNet directly (``.sample`` of its output)."""
    sched = diffusers.DPMSolverMultistepScheduler(prediction_type="v_prediction")
    x_T = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref, _ = diffusers_loop(sched, 3, lambda x, t: unet(x, t).sample, x_T)
        out = sample(unet, x_T=x_T, scheduler=sched, steps=3, progress=False)
    assert (out - ref).abs().max() <= ATOL


# -- the configuration matrix on the cheap model ------------------------------------------

PREDS = {  # what each diffusers scheduler accepts
    "DDIMScheduler": ("epsilon", "v_prediction", "sample"),
    "DDPMScheduler": ("epsilon", "v_prediction", "sample"),
    "PNDMScheduler": ("epsilon", "v_prediction"),
    "DPMSolverMultistepScheduler": ("epsilon", "v_prediction", "sample"),
    "DPMSolverSinglestepScheduler": ("epsilon", "v_prediction", "sample"),
    "UniPCMultistepScheduler": ("epsilon", "v_prediction", "sample"),
    "EulerDiscreteScheduler": ("epsilon", "v_prediction", "sample"),
    "HeunDiscreteScheduler": ("epsilon", "v_prediction", "sample"),
    "LMSDiscreteScheduler": ("epsilon", "v_prediction", "sample"),
}
DETERMINISTIC = {
    "DDIMScheduler": {"clip_sample": False},
    "PNDMScheduler": {},
    "DPMSolverMultistepScheduler": {},
    "DPMSolverSinglestepScheduler": {},
    "UniPCMultistepScheduler": {},
    "EulerDiscreteScheduler": {},
    "HeunDiscreteScheduler": {},
    "LMSDiscreteScheduler": {},
}
SPACINGS = [{"timestep_spacing": "leading", "steps_offset": 1}, {"timestep_spacing": "linspace"},
            {"timestep_spacing": "trailing"}]
MATRIX = [(cls, {**base, "prediction_type": p, **sp})
          for cls, base in DETERMINISTIC.items() for p in PREDS[cls]
          for sp in (SPACINGS if cls != "DPMSolverSinglestepScheduler" else [{}])]  # always linspace
MATRIX += [(cls, {"use_karras_sigmas": True, "prediction_type": p})
           for cls in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                       "EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler")
           for p in ("epsilon", "v_prediction")]
MATRIX += [
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 1.3}),
    ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": 0.8, "set_alpha_to_one": False}),
    ("DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                       "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                       "prediction_type": "v_prediction", "clip_sample": False}),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.2}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "thresholding": True,
                                     "final_sigmas_type": "sigma_min", "sample_max_value": 1.2}),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun", "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True, "lower_order_final": False}),
    ("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2", "solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"lambda_min_clipped": -3.0, "beta_schedule": "squaredcos_cap_v2"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 3,
                                     "final_sigmas_type": "sigma_min", "solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                     "beta_end": 0.012, "rescale_betas_zero_snr": True,
                                     "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 3,
                                      "final_sigmas_type": "sigma_min"}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 2, "lower_order_final": True}),
    ("UniPCMultistepScheduler", {"thresholding": True, "sample_max_value": 1.2}),
    ("UniPCMultistepScheduler", {"solver_order": 1}),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 1, "algorithm_type": "dpmsolver",
                                      "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"disable_corrector": [0, 3], "solver_order": 3}),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min",
                                 "lower_order_final": False}),
    ("EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min"}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 20.0,
                                "timestep_spacing": "trailing"}),
    ("HeunDiscreteScheduler", {"clip_sample": True, "clip_sample_range": 0.9, "prediction_type": "sample"}),
    ("PNDMScheduler", {"set_alpha_to_one": True, "timestep_spacing": "trailing"}),
]


@pytest.mark.parametrize("steps", [5, 12])
@pytest.mark.parametrize("cls,config", MATRIX, ids=[f"{c}-{i}" for i, (c, _) in enumerate(MATRIX)])
def test_config_matrix_parity(cls, config, steps, gen):
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    pred = config.get("prediction_type", "epsilon")
    _run_both(cls, config, steps, lambda s: Denoiser(s.alphas_cumprod, pred), x_T)


def test_every_sampler_name_runs(gen):
    """Every name in SAMPLERS builds and produces finite samples on the cheap model."""
    schedule = NoiseSchedule.linear()
    model = Denoiser(schedule.alphas_cumprod.numpy())
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    for name in SAMPLERS:
        if family(name).flavor in OWN_SCHEDULE:
            continue  # flow-matching / EDM samplers: tests/test_samplers_flow_edm.py
        out = sample(model, x_T=x_T, schedule=schedule, sampler=name, steps=6, progress=False,
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == x_T.shape and torch.isfinite(out).all(), name
