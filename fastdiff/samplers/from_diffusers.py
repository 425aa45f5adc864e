"""Map a diffusers scheduler's config to the equivalent fused sampler.

Every config key is either honoured (mapped to a Sampler argument), part of the noise
schedule (read by ``NoiseSchedule.from_diffusers``), or, when set to something this
package cannot reproduce exactly, refused with a ValueError naming the key and value.
Keys this module does not know are refused unless they hold the scheduler's default.
"""
from __future__ import annotations

import inspect
import math

from ..schedules import NoiseSchedule

__all__ = ["sampler_args", "SUPPORTED", "DIFFUSERS_CLASSES", "DIFFUSERS_OPTIONS"]

_SCHEDULE_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr"}
_THRESHOLD_KEYS = {"thresholding", "dynamic_thresholding_ratio", "sample_max_value"}
# Options whose only supported value is the default (diffusers' alternatives to Karras
# sigmas, flow matching, dynamic shifting).
_MUST_BE = {"use_flow_sigmas": False, "use_dynamic_shifting": False, "shift_terminal": None,
            "solver_p": None, "interpolation_type": "linear", "timestep_type": "discrete"}
# Keys with no effect on the update (flow_shift only matters with flow sigmas).
_IGNORED = {"flow_shift", "time_shift_type"}


def _bad(cls, key, value, why=""):
    return ValueError(f"{cls}: config option {key}={value!r} is not supported by fastdiff's fused "
                      f"samplers{': ' + why if why else ''}")


def _prediction(cls, cfg):
    p = cfg.get("prediction_type", "epsilon")
    p = {"original_sample": "sample"}.get(p, p)
    if p not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
        raise _bad(cls, "prediction_type", p)
    return p


def _thresholds(cls, cfg, clip_default=False):
    kw = {}
    if cfg.get("thresholding", False):
        kw.update(thresholding=True, dynamic_thresholding_ratio=cfg.get("dynamic_thresholding_ratio", 0.995),
                  sample_max_value=cfg.get("sample_max_value", 1.0))
    if cfg.get("clip_sample", clip_default):
        kw.update(clip_sample=True, clip_sample_range=cfg.get("clip_sample_range", 1.0))
    return kw


def _ddim(cls, cfg, steps):
    kw = dict(spacing=cfg.get("timestep_spacing", "leading"), steps_offset=cfg.get("steps_offset", 0),
              final_sigmas_type="zero" if cfg.get("set_alpha_to_one", True) else "sigma_min",
              diffusers_rule=True, **_thresholds(cls, cfg, clip_default=True))
    return "ddim", kw, {"set_alpha_to_one", "timestep_spacing", "steps_offset", "clip_sample",
                        "clip_sample_range", *_THRESHOLD_KEYS}


def _ddpm(cls, cfg, steps):
    vt = cfg.get("variance_type", "fixed_small")
    if vt not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise _bad(cls, "variance_type", vt, "learned variances need the model's variance output")
    kw = dict(spacing=cfg.get("timestep_spacing", "leading"), steps_offset=cfg.get("steps_offset", 0),
              variance_type=vt, **_thresholds(cls, cfg, clip_default=True))
    return "ddpm", kw, {"variance_type", "timestep_spacing", "steps_offset", "clip_sample",
                        "clip_sample_range", *_THRESHOLD_KEYS}


def _pndm(cls, cfg, steps):
    if _prediction(cls, cfg) == "sample":
        raise _bad(cls, "prediction_type", "sample")
    kw = dict(spacing=cfg.get("timestep_spacing", "leading"), steps_offset=cfg.get("steps_offset", 0),
              final_sigmas_type="zero" if cfg.get("set_alpha_to_one", False) else "sigma_min",
              diffusers_rule=True)
    name = "plms" if cfg.get("skip_prk_steps", False) else "pndm"
    return name, kw, {"skip_prk_steps", "set_alpha_to_one", "timestep_spacing", "steps_offset"}


def _dpm_common(cls, cfg):
    vt = cfg.get("variance_type")
    if vt not in (None, "learned", "learned_range"):
        raise _bad(cls, "variance_type", vt)
    kw = dict(karras=bool(cfg.get("use_karras_sigmas", False)),
              final_sigmas_type=cfg.get("final_sigmas_type", "zero"),
              lambda_min_clipped=cfg.get("lambda_min_clipped", -math.inf),
              order=cfg.get("solver_order", 2), solver_type=cfg.get("solver_type", "midpoint"),
              lower_order_final=cfg.get("lower_order_final", True), **_thresholds(cls, cfg))
    algorithm = cfg.get("algorithm_type", "dpmsolver++")
    kw["algorithm"] = {"deis": "dpmsolver++"}.get(algorithm, algorithm)
    if kw["solver_type"] in ("logrho", "bh1", "bh2"):
        kw["solver_type"] = "midpoint"  # what diffusers' __init__ registers for these
    flow_kw, flow_used = _flow_sigmas(cls, cfg)
    kw.update(flow_kw)
    return kw, flow_used | {"use_karras_sigmas", "final_sigmas_type", "lambda_min_clipped", "solver_order",
                "solver_type", "lower_order_final", "algorithm_type", "variance_type", *_THRESHOLD_KEYS}


def _dpm_multistep(cls, cfg, steps):
    kw, used = _dpm_common(cls, cfg)
    kw.update(spacing=cfg.get("timestep_spacing", "linspace"), steps_offset=cfg.get("steps_offset", 0),
              euler_at_final=cfg.get("euler_at_final", False))
    name = {"dpmsolver++": "dpm++2m", "sde-dpmsolver++": "dpm++sde-2m", "dpmsolver": "dpm-solver",
            "sde-dpmsolver": "dpm-solver-sde"}.get(kw["algorithm"])
    if name is None:
        raise _bad(cls, "algorithm_type", cfg.get("algorithm_type"))
    return name, kw, used | {"timestep_spacing", "steps_offset", "euler_at_final"}


def _dpm_singlestep(cls, cfg, steps):
    kw, used = _dpm_common(cls, cfg)
    kw["lower_order_final"] = cfg.get("lower_order_final", False)
    if kw["algorithm"] not in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
        raise _bad(cls, "algorithm_type", cfg.get("algorithm_type"))
    name = "dpm-solver-single" if kw["algorithm"] == "dpmsolver" else "dpm++2s"
    return name, kw, used


def _unipc(cls, cfg, steps):
    flow_kw, flow_used = _flow_sigmas(cls, cfg, shift_terminal=True)
    karras = bool(cfg.get("use_karras_sigmas", False))
    final = cfg.get("final_sigmas_type", "zero")
    if karras and final == "sigma_min":
        raise _bad(cls, "final_sigmas_type", final, "with use_karras_sigmas diffusers repeats the last "
                   "Karras sigma as the final one (a zero-length last step)")
    st = cfg.get("solver_type", "bh2")
    kw = dict(spacing=cfg.get("timestep_spacing", "linspace"), steps_offset=cfg.get("steps_offset", 0),
              karras=karras, final_sigmas_type=final, order=cfg.get("solver_order", 2),
              solver_type="bh2" if st in ("midpoint", "heun", "logrho") else st,
              lower_order_final=cfg.get("lower_order_final", True),
              predict_x0=cfg.get("predict_x0", True),
              disable_corrector=tuple(cfg.get("disable_corrector", ()) or ()),
              sigma_min=cfg.get("sigma_min"), sigma_max=cfg.get("sigma_max"), **_thresholds(cls, cfg),
              **flow_kw)
    return "unipc", kw, flow_used | {"timestep_spacing", "steps_offset", "use_karras_sigmas", "final_sigmas_type",
                         "solver_order", "solver_type", "lower_order_final", "predict_x0",
                         "disable_corrector", "sigma_min", "sigma_max", *_THRESHOLD_KEYS}


def _euler_family(name, keys):
    def read(cls, cfg, steps):
        kw = dict(spacing=cfg.get("timestep_spacing", "linspace"), steps_offset=cfg.get("steps_offset", 0),
                  init_noise_sigma="diffusers")
        used = {"timestep_spacing", "steps_offset"}
        if "use_karras_sigmas" in keys:
            kw["karras"] = bool(cfg.get("use_karras_sigmas", False))
            used.add("use_karras_sigmas")
        if "sigma_min" in keys:
            kw.update(sigma_min=cfg.get("sigma_min"), sigma_max=cfg.get("sigma_max"))
            used |= {"sigma_min", "sigma_max"}
        if "final_sigmas_type" in keys:
            kw["final_sigmas_type"] = cfg.get("final_sigmas_type", "zero")
            used.add("final_sigmas_type")
        if "clip_sample" in keys:
            kw.update(_thresholds(cls, cfg))
            used |= {"clip_sample", "clip_sample_range"}
        return name, kw, used
    return read


# -- solvers: exponential / beta sigmas, lu lambdas, and the DEIS, IPNDM, KDPM2 classes --

_SIGMA_KEYS = {"use_exponential_sigmas": "exponential_sigmas", "use_beta_sigmas": "beta_sigmas",
               "use_lu_lambdas": "lu_lambdas"}


def _sigma_kinds(cls, cfg, allowed=("use_exponential_sigmas", "use_beta_sigmas")):
    """Sampler arguments of the noise-level options other than Karras; (kwargs, keys used)."""
    kw = {}
    for key, arg in _SIGMA_KEYS.items():
        if cfg.get(key, False):
            if key not in allowed:
                raise _bad(cls, key, True)
            kw[arg] = True
    return kw, set(_SIGMA_KEYS)


def _with_sigma_kinds(read, allowed=("use_exponential_sigmas", "use_beta_sigmas")):
    def wrapped(cls, cfg, steps):
        name, kw, used = read(cls, cfg, steps)
        extra, keys = _sigma_kinds(cls, cfg, allowed)
        if extra and cls == "UniPCMultistepScheduler" and kw.get("final_sigmas_type") == "sigma_min":
            raise _bad(cls, "final_sigmas_type", "sigma_min", f"with {next(iter(extra))} diffusers repeats "
                       "the last sigma as the final one (a zero-length last step)")
        kw.update(extra)
        return name, kw, used | keys
    return wrapped


def _deis(cls, cfg, steps):
    if cfg.get("prediction_type") == "flow_prediction":
        raise _bad(cls, "prediction_type", "flow_prediction")
    algorithm, solver_type = cfg.get("algorithm_type", "deis"), cfg.get("solver_type", "logrho")
    if algorithm != "deis":  # diffusers' __init__ registers "deis" for dpmsolver(++)
        raise _bad(cls, "algorithm_type", algorithm)
    if solver_type != "logrho":
        raise _bad(cls, "solver_type", solver_type)
    kw = dict(spacing=cfg.get("timestep_spacing", "linspace"), steps_offset=cfg.get("steps_offset", 0),
              karras=bool(cfg.get("use_karras_sigmas", False)), order=cfg.get("solver_order", 2),
              lower_order_final=cfg.get("lower_order_final", True), **_thresholds(cls, cfg))
    extra, keys = _sigma_kinds(cls, cfg)
    kw.update(extra)
    # With any sigma grid diffusers' DEIS repeats the last sigma as the final level.
    kw["final_sigmas_type"] = "last" if (extra or kw["karras"]) else "sigma_min"
    return "deis", kw, keys | {"timestep_spacing", "steps_offset", "use_karras_sigmas", "solver_order",
                               "lower_order_final", "algorithm_type", "solver_type", *_THRESHOLD_KEYS}


def _sasolver(cls, cfg, steps):
    if cfg.get("prediction_type") == "flow_prediction":
        raise _bad(cls, "prediction_type", "flow_prediction")
    vt = cfg.get("variance_type")
    if vt not in (None, "learned", "learned_range"):
        raise _bad(cls, "variance_type", vt)
    algorithm = cfg.get("algorithm_type", "data_prediction")
    if algorithm not in ("data_prediction", "noise_prediction"):
        raise _bad(cls, "algorithm_type", algorithm)
    kw = dict(spacing=cfg.get("timestep_spacing", "linspace"), steps_offset=cfg.get("steps_offset", 0),
              karras=bool(cfg.get("use_karras_sigmas", False)),
              lambda_min_clipped=cfg.get("lambda_min_clipped", -math.inf),
              predictor_order=cfg.get("predictor_order", 2), corrector_order=cfg.get("corrector_order", 2),
              tau=cfg.get("tau_func"), predict_x0=algorithm == "data_prediction",
              lower_order_final=cfg.get("lower_order_final", True), **_thresholds(cls, cfg))
    extra, keys = _sigma_kinds(cls, cfg)
    kw.update(extra)
    kw["final_sigmas_type"] = "last" if (extra or kw["karras"]) else "sigma_min"
    return "sa-solver", kw, keys | {"timestep_spacing", "steps_offset", "use_karras_sigmas", "lambda_min_clipped",
                                    "predictor_order", "corrector_order", "tau_func", "algorithm_type",
                                    "lower_order_final", "variance_type", *_THRESHOLD_KEYS}


def _cosine(cls, cfg, steps):
    if cfg.get("rho", 7.0) != 7.0:
        raise _bad(cls, "rho", cfg.get("rho"), "only rho = 7")
    schedule = cfg.get("sigma_schedule", "exponential")
    if schedule not in ("exponential", "karras"):
        raise _bad(cls, "sigma_schedule", schedule)
    st = cfg.get("solver_type", "midpoint")
    kw = dict(sigma_min=cfg.get("sigma_min", 0.3), sigma_max=cfg.get("sigma_max", 500.0),
              karras=schedule == "karras", exponential_sigmas=schedule == "exponential",
              sigma_data=cfg.get("sigma_data", 1.0), order=cfg.get("solver_order", 2),
              solver_type="midpoint" if st in ("logrho", "bh1", "bh2") else st,
              lower_order_final=cfg.get("lower_order_final", True),
              euler_at_final=cfg.get("euler_at_final", False),
              final_sigmas_type=cfg.get("final_sigmas_type", "zero"),
              prediction_type=_prediction(cls, cfg))
    return "cosine-dpm", kw, {"sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "rho", "solver_order",
                              "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type"}


def _ipndm(cls, cfg, steps):
    if cfg.get("trained_betas") is not None:
        raise _bad(cls, "trained_betas", "...", "IPNDM's trained_betas replace its per-step noise levels")
    # The model output is read as v-prediction (diffusers: eps = sigma x + alpha v).
    return "ipndm", dict(prediction_type="v_prediction"), set()


def _kdpm2(name, keys=()):
    def read(cls, cfg, steps):
        pred = _prediction(cls, cfg)
        if pred == "sample":
            raise _bad(cls, "prediction_type", pred, "diffusers does not implement it for this class")
        kw = dict(spacing=cfg.get("timestep_spacing", "linspace"), steps_offset=cfg.get("steps_offset", 0),
                  init_noise_sigma="diffusers", karras=bool(cfg.get("use_karras_sigmas", False)))
        if "noise_sampler_seed" in keys:
            kw["noise_sampler_seed"] = cfg.get("noise_sampler_seed")
        extra, used = _sigma_kinds(cls, cfg)
        kw.update(extra)
        return name, kw, used | set(keys) | {"timestep_spacing", "steps_offset", "use_karras_sigmas"}
    return read


SUPPORTED = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "PNDMScheduler": _pndm,
    "DPMSolverMultistepScheduler": _with_sigma_kinds(_dpm_multistep, tuple(_SIGMA_KEYS)),
    "DPMSolverSinglestepScheduler": _with_sigma_kinds(_dpm_singlestep),
    "UniPCMultistepScheduler": _with_sigma_kinds(_unipc),
    "EulerDiscreteScheduler": _with_sigma_kinds(
        _euler_family("euler", {"use_karras_sigmas", "sigma_min", "final_sigmas_type"})),
    "EulerAncestralDiscreteScheduler": _euler_family("euler-ancestral", set()),
    "HeunDiscreteScheduler": _with_sigma_kinds(_euler_family("heun", {"use_karras_sigmas", "clip_sample"})),
    "LMSDiscreteScheduler": _with_sigma_kinds(_euler_family("lms", {"use_karras_sigmas"})),
    # -- solvers --
    "DEISMultistepScheduler": _deis,
    "SASolverScheduler": _sasolver,
    "CosineDPMSolverMultistepScheduler": _cosine,
    "IPNDMScheduler": _ipndm,
    "KDPM2DiscreteScheduler": _kdpm2("kdpm2"),
    "KDPM2AncestralDiscreteScheduler": _kdpm2("kdpm2-ancestral"),
    "DPMSolverSDEScheduler": _kdpm2("dpm++sde", {"noise_sampler_seed"}),
}


# -- solvers: why the remaining diffusers classes are refused ------------------------------
_TOKENS = "discrete-token (masked or categorical) diffusion, not a Gaussian state"
_REFUSED = {
    "AmusedScheduler": _TOKENS,
    "VQDiffusionScheduler": _TOKENS,
    "KarrasVeScheduler": "its churn and second-order correction are separate calls (step_correct) around "
                         "the model, on a variance-exploding schedule",
    "ScoreSdeVeScheduler": "a variance-exploding SDE with a separate Langevin corrector call (step_correct); "
                           "fastdiff's schedules are variance preserving",
    "RePaintScheduler": "inpainting with resampling jumps back in time (undo_step) and a known-region mask",
    "UnCLIPScheduler": "its variance comes from the model's learned-range channels at every step",
    "DDPMWuerstchenScheduler": "Wuerstchen's own continuous cosine schedule and time input (ratios), which "
                               "NoiseSchedule does not have",
}


# -- flow matching, EDM, consistency models, inversion, parallel -----------------------------

def _flow_sigmas(cls, cfg, shift_terminal=False):
    """DPM-Solver / UniPC ``use_flow_sigmas``: their flow grid on a flow schedule."""
    if not cfg.get("use_flow_sigmas", False):
        if _prediction(cls, cfg) == "flow_prediction":
            raise _bad(cls, "prediction_type", "flow_prediction", "needs use_flow_sigmas=True")
        return {}, set()
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
        if cfg.get(key, False):
            raise _bad(cls, key, True, "not combined with use_flow_sigmas")
    if cfg.get("shift_terminal") and not shift_terminal:
        raise _bad(cls, "shift_terminal", cfg["shift_terminal"])
    sched = NoiseSchedule.flow(cfg.get("num_train_timesteps", 1000), shift=cfg.get("flow_shift", 1.0),
                               use_dynamic_shifting=cfg.get("use_dynamic_shifting", False),
                               time_shift_type=cfg.get("time_shift_type", "exponential"),
                               shift_terminal=cfg.get("shift_terminal"))
    return {"schedule": sched}, {"use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type",
                                 "shift_terminal"}


_FLOW_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
              "max_image_seq_len", "invert_sigmas", "shift_terminal", "time_shift_type")


def _flow_match(name):
    def read(cls, cfg, steps):
        spacing = [k for k in ("karras", "exponential", "beta") if cfg.get(f"use_{k}_sigmas", False)]
        opts = {k: cfg[k] for k in _FLOW_KEYS if k in cfg}
        kw = dict(schedule=NoiseSchedule.flow(cfg.get("num_train_timesteps", 1000),
                                              sigma_spacing=spacing[0] if spacing else None, **opts),
                  prediction_type="flow_prediction")
        if cfg.get("stochastic_sampling", False):
            kw["stochastic_sampling"] = True
        return name, kw, {*_FLOW_KEYS, "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas",
                          "use_beta_sigmas"}
    return read


def _edm(name):
    def read(cls, cfg, steps):
        kw = dict(schedule=NoiseSchedule.edm(cfg.get("sigma_min", 0.002), cfg.get("sigma_max", 80.0),
                                             cfg.get("rho", 7.0), cfg.get("sigma_schedule", "karras")),
                  sigma_data=cfg.get("sigma_data", 0.5), final_sigmas_type=cfg.get("final_sigmas_type", "zero"))
        used = {"sigma_min", "sigma_max", "rho", "sigma_schedule", "sigma_data", "final_sigmas_type"}
        if _prediction(cls, cfg) not in ("epsilon", "v_prediction"):
            raise _bad(cls, "prediction_type", cfg.get("prediction_type"), "EDM preconditioning has "
                       "epsilon and v_prediction forms only")
        if name == "edm-dpm++2m":
            kw.update(order=cfg.get("solver_order", 2), lower_order_final=cfg.get("lower_order_final", True),
                      euler_at_final=cfg.get("euler_at_final", False), **_thresholds(cls, cfg))
            st = cfg.get("solver_type", "midpoint")
            kw["solver_type"] = "midpoint" if st in ("logrho", "bh1", "bh2") else st
            algorithm = {"deis": "dpmsolver++"}.get(cfg.get("algorithm_type", "dpmsolver++"),
                                                   cfg.get("algorithm_type", "dpmsolver++"))
            if algorithm == "sde-dpmsolver++":
                name_ = "edm-dpm++sde-2m"
            elif algorithm == "dpmsolver++":
                name_ = name
            else:
                raise _bad(cls, "algorithm_type", algorithm)
            used |= {"solver_order", "lower_order_final", "euler_at_final", "solver_type", "algorithm_type",
                     *_THRESHOLD_KEYS}
            return name_, kw, used
        return name, kw, used
    return read


def _cm(cls, cfg, steps):
    from ..schedule_families import EDMSchedule
    kw = dict(schedule=EDMSchedule(cfg.get("sigma_min", 0.002), cfg.get("sigma_max", 80.0), cfg.get("rho", 7.0),
                                   "karras", T=cfg.get("num_train_timesteps", 40), time_scale=250.0),
              sigma_data=cfg.get("sigma_data", 0.5), s_noise=cfg.get("s_noise", 1.0), prediction_type="epsilon")
    if cfg.get("clip_denoised", True):
        kw.update(clip_sample=True, clip_sample_range=1.0)
    return "cm", kw, {"sigma_min", "sigma_max", "rho", "sigma_data", "s_noise", "clip_denoised"}


def _lcm(name):
    def read(cls, cfg, steps):
        kw = dict(original_inference_steps=cfg.get("original_inference_steps", 50))
        used = {"original_inference_steps", "set_alpha_to_one", "timestep_spacing", "steps_offset"}
        if name == "lcm":  # TCD's step does not clamp: those keys then must keep their defaults
            kw.update(timestep_scaling=cfg.get("timestep_scaling", 10.0), **_thresholds(cls, cfg))
            used |= {"timestep_scaling", "clip_sample", "clip_sample_range", *_THRESHOLD_KEYS}
        return name, kw, used  # (set_alpha_to_one, spacing: unused by their set_timesteps / step)
    return read


def _ddim_inverse(cls, cfg, steps):
    kw = dict(spacing=cfg.get("timestep_spacing", "leading"), steps_offset=cfg.get("steps_offset", 0),
              final_sigmas_type="zero" if cfg.get("set_alpha_to_one", True) else "sigma_min",
              **_thresholds(cls, cfg, clip_default=True))
    return "ddim-inverse", kw, {"timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample",
                                "clip_sample_range"}


def _dpm_inverse(cls, cfg, steps):
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"):
        if cfg.get(key, False):
            raise _bad(cls, key, True, "inversion runs on the spaced timesteps only")
    if cfg.get("lambda_min_clipped", -math.inf) != -math.inf:
        raise _bad(cls, "lambda_min_clipped", cfg["lambda_min_clipped"])
    kw, used = _dpm_common(cls, cfg)
    del kw["final_sigmas_type"], kw["lambda_min_clipped"], kw["karras"]
    kw.update(spacing=cfg.get("timestep_spacing", "linspace"), steps_offset=cfg.get("steps_offset", 0),
              euler_at_final=cfg.get("euler_at_final", False))
    name = {"dpmsolver++": "dpm++2m-inverse", "dpmsolver": "dpm-solver-inverse"}.get(kw["algorithm"])
    if name is None:
        raise _bad(cls, "algorithm_type", kw["algorithm"], "inversion is deterministic here")
    return name, kw, used | {"timestep_spacing", "steps_offset", "euler_at_final", "lambda_min_clipped"}


SUPPORTED.update({
    "FlowMatchEulerDiscreteScheduler": _flow_match("flow-euler"),
    "FlowMatchHeunDiscreteScheduler": _flow_match("flow-heun"),
    "EDMEulerScheduler": _edm("edm-euler"),
    "EDMDPMSolverMultistepScheduler": _edm("edm-dpm++2m"),
    "CMStochasticIterativeScheduler": _cm,
    "LCMScheduler": _lcm("lcm"),
    "TCDScheduler": _lcm("tcd"),
    "DDIMInverseScheduler": _ddim_inverse,
    "DPMSolverMultistepInverseScheduler": _dpm_inverse,
    # The parallel schedulers' step() is DDIM's / DDPM's; fastdiff batches per-sample
    # timesteps itself (timesteps=[B, N]).
    "DDIMParallelScheduler": _ddim,
    "DDPMParallelScheduler": _ddpm,
})


# The diffusers scheduler (class, config overrides) each fused sampler reproduces, for
# choosing a sampler by name on top of a diffusers config (fastdiff.FusedScheduler).
DIFFUSERS_CLASSES = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": False}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm-solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpm-solver-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver"}),
    "dpm-solver-single": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++sde-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
    "unipc-bh1": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {"solver_order": 2}),
    "deis-3": ("DEISMultistepScheduler", {"solver_order": 3}),
    "ipndm": ("IPNDMScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2-ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "sa-solver": ("SASolverScheduler", {}),
    "cosine-dpm": ("CosineDPMSolverMultistepScheduler", {}),
    "dpm++sde": ("DPMSolverSDEScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "edm-euler": ("EDMEulerScheduler", {}),
    "edm-dpm++2m": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "edm-dpm++sde-2m": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}
# Sampler options a sampler alias may imply, as diffusers config keys.
DIFFUSERS_OPTIONS = {"karras": "use_karras_sigmas"}


def sampler_args(scheduler, steps):
    """(sampler name, Sampler keyword arguments) equivalent to ``scheduler`` run for
    ``steps`` steps."""
    cls = type(scheduler).__name__
    if cls not in SUPPORTED:
        why = _REFUSED.get(cls, "fastdiff has no sampler family whose fused step reproduces its update")
        raise ValueError(f"scheduler {cls} is not supported: {why}. Supported: {', '.join(SUPPORTED)}")
    if steps is None:
        raise ValueError("from_diffusers needs steps (the scheduler's num_inference_steps)")
    params = inspect.signature(type(scheduler).__init__).parameters
    # Only the keys the class itself takes: `from_config` of another class's config keeps
    # that class's keys as hidden config entries (skip_prk_steps on a DDIM made from
    # Stable Diffusion's PNDM config), which the scheduler ignores, and so does fastdiff.
    cfg = {k: v for k, v in dict(scheduler.config).items() if k in params}
    name, kw, used = SUPPORTED[cls](cls, cfg, steps)
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    for key, value in cfg.items():
        if key.startswith("_") or key in used or key in _SCHEDULE_KEYS or key in _IGNORED \
                or key == "prediction_type":
            continue
        if key in _MUST_BE:
            if value != _MUST_BE[key] and not (value is None and _MUST_BE[key] is False):
                raise _bad(cls, key, value)
            continue
        if key in defaults and _same(value, defaults[key]):
            continue
        raise _bad(cls, key, value, "unknown option with a non-default value")
    kw = {k: v for k, v in kw.items() if v is not None or k not in ("sigma_min", "sigma_max")}
    kw.setdefault("prediction_type", _prediction(cls, cfg))
    # flow-matching and EDM readers build their own schedule; IPNDM / cosine DPM have their own noise levels
    if "schedule" not in kw and cls not in ("IPNDMScheduler", "CosineDPMSolverMultistepScheduler"):
        kw["schedule"] = NoiseSchedule.from_diffusers(cfg)
    kw["steps"] = steps
    return name, kw


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
