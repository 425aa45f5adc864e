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

__all__ = ["sampler_args", "SUPPORTED"]

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
    if p not in ("epsilon", "v_prediction", "sample"):
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
    if cfg.get("prediction_type") == "flow_prediction":
        raise _bad(cls, "prediction_type", "flow_prediction")
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
    return kw, {"use_karras_sigmas", "final_sigmas_type", "lambda_min_clipped", "solver_order",
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
    if cfg.get("prediction_type") == "flow_prediction":
        raise _bad(cls, "prediction_type", "flow_prediction")
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
              sigma_min=cfg.get("sigma_min"), sigma_max=cfg.get("sigma_max"), **_thresholds(cls, cfg))
    return "unipc", kw, {"timestep_spacing", "steps_offset", "use_karras_sigmas", "final_sigmas_type",
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


def sampler_args(scheduler, steps):
    """(sampler name, Sampler keyword arguments) equivalent to ``scheduler`` run for
    ``steps`` steps."""
    cls = type(scheduler).__name__
    if cls not in SUPPORTED:
        why = _REFUSED.get(cls, "fastdiff has no sampler family whose fused step reproduces its update")
        raise ValueError(f"scheduler {cls} is not supported: {why}. Supported: {', '.join(SUPPORTED)}")
    cfg = dict(scheduler.config)
    if steps is None:
        raise ValueError("from_diffusers needs steps (the scheduler's num_inference_steps)")
    name, kw, used = SUPPORTED[cls](cls, cfg, steps)
    defaults = {k: p.default for k, p in inspect.signature(type(scheduler).__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
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
    if cls not in ("IPNDMScheduler", "CosineDPMSolverMultistepScheduler"):  # own noise levels
        kw["schedule"] = NoiseSchedule.from_diffusers(scheduler)
    kw["steps"] = steps
    return name, kw


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
