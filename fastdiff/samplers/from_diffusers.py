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
_MUST_BE = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
            "use_flow_sigmas": False, "use_dynamic_shifting": False, "shift_terminal": None,
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


SUPPORTED = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "PNDMScheduler": _pndm,
    "DPMSolverMultistepScheduler": _dpm_multistep,
    "DPMSolverSinglestepScheduler": _dpm_singlestep,
    "UniPCMultistepScheduler": _unipc,
    "EulerDiscreteScheduler": _euler_family("euler", {"use_karras_sigmas", "sigma_min", "final_sigmas_type"}),
    "EulerAncestralDiscreteScheduler": _euler_family("euler-ancestral", set()),
    "HeunDiscreteScheduler": _euler_family("heun", {"use_karras_sigmas", "clip_sample"}),
    "LMSDiscreteScheduler": _euler_family("lms", {"use_karras_sigmas"}),
}


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
}
# Sampler options a sampler alias may imply, as diffusers config keys.
DIFFUSERS_OPTIONS = {"karras": "use_karras_sigmas"}


def sampler_args(scheduler, steps):
    """(sampler name, Sampler keyword arguments) equivalent to ``scheduler`` run for
    ``steps`` steps."""
    cls = type(scheduler).__name__
    if cls not in SUPPORTED:
        raise ValueError(f"scheduler {cls} is not supported; supported: {', '.join(SUPPORTED)}")
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
    kw.update(schedule=NoiseSchedule.from_diffusers(cfg), steps=steps,
              prediction_type=_prediction(cls, cfg))
    return name, kw


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
