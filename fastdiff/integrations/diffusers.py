"""fastdiff's fused sampler steps inside diffusers pipelines.

    pipe = fastdiff.fuse(pipe)                                    # one line, or
    pipe.scheduler = fastdiff.FusedScheduler.from_config(pipe.scheduler.config)

:class:`FusedScheduler` is a diffusers scheduler (``SchedulerMixin`` + ``ConfigMixin``)
that a pipeline drives with its own loop, exactly as it drives the scheduler it
replaces: the same timesteps, the same number of UNet calls, the same results (to
float32 rounding). Each ``step`` is one fused kernel pass of a :class:`fastdiff.Sampler`
built from the replaced scheduler's config (``Sampler.from_diffusers``); its
coefficients are computed once per ``set_timesteps`` and live on the device, so a step
does no host arithmetic and never synchronises with the device.

Importing this module imports diffusers; ``import fastdiff`` does not (``fastdiff.fuse``
and ``fastdiff.FusedScheduler`` load it on first use).
"""
from __future__ import annotations

import inspect
import numbers

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..embedding import patch_time_embedding
from ..samplers.core import EDMPrecond, data_eps
from ..samplers.lcm import boundary_scalings, tcd_level
from ..samplers.from_diffusers import _REFUSED, DIFFUSERS_CLASSES, DIFFUSERS_OPTIONS, sampler_args
from ..samplers.registry import resolve
from ..samplers.sampler import Sampler
from ..schedules import TimeSharing

__all__ = ["FusedScheduler", "FusedSchedulerOutput", "fuse", "MID_SCHEDULE", "PIPELINE_CLASSES"]

# What a diffusers scheduler does when a pipeline starts it mid-schedule (img2img and
# inpainting call set_begin_index): "continue" takes the same step as in a full run (the
# scheduler keeps no state across steps; LMS: the history it lacks adds nothing; the
# two-call classes (Heun, KDPM2, DPM++ SDE) start at a step's first call; DPM++ SDE's
# Brownian tree spans the whole run's levels either way); "restart" runs a fresh
# multistep solve over the remaining noise levels (its warm-up counts the steps it has
# taken: EDM DPM-Solver's lower_order_nums, as DPM-Solver's, starts at zero while its
# last steps' orders follow the step index in the full run); "resumed" is PLMS's own way
# (``fastdiff.samplers.pndm``, option ``resumed``).
MID_SCHEDULE = {
    "DDIMScheduler": "continue",
    "DDPMScheduler": "continue",
    "EulerDiscreteScheduler": "continue",
    "EDMEulerScheduler": "continue",
    "EulerAncestralDiscreteScheduler": "continue",
    "HeunDiscreteScheduler": "continue",
    "LMSDiscreteScheduler": "continue",
    "KDPM2DiscreteScheduler": "continue",
    "KDPM2AncestralDiscreteScheduler": "continue",
    "DPMSolverSDEScheduler": "continue",
    "FlowMatchEulerDiscreteScheduler": "continue",
    "FlowMatchHeunDiscreteScheduler": "continue",
    "LCMScheduler": "continue",
    "TCDScheduler": "continue",
    "DPMSolverMultistepScheduler": "restart",
    "DPMSolverSinglestepScheduler": "restart",
    "UniPCMultistepScheduler": "restart",
    "DEISMultistepScheduler": "restart",
    "SASolverScheduler": "restart",
    "IPNDMScheduler": "restart",
    "CosineDPMSolverMultistepScheduler": "restart",
    "EDMDPMSolverMultistepScheduler": "restart",
    "PNDMScheduler": "resumed",
}
# The classes a FusedScheduler reproduces inside pipelines (each tested there, full runs
# and mid-schedule starts).
PIPELINE_CLASSES = tuple(MID_SCHEDULE)
# Classes Sampler.from_diffusers maps that FusedScheduler refuses, and why.
_NOT_IN_PIPELINES = {
    "CMStochasticIterativeScheduler": "not verified against diffusers inside pipelines "
                                      "(ConsistencyModelPipeline)",
    "DDIMInverseScheduler": "an inversion (data to noise) scheduler, driven by pipelines as a separate "
                            "inverse_scheduler; not verified there",
    "DPMSolverMultistepInverseScheduler": "an inversion (data to noise) scheduler, driven by pipelines as "
                                          "a separate inverse_scheduler; not verified there",
    "DDIMParallelScheduler": "the parallel-sampling pipeline calls batch_step_no_noise with per-sample "
                             "timesteps, which FusedScheduler does not implement",
    "DDPMParallelScheduler": "the parallel-sampling pipeline calls batch_step_no_noise with per-sample "
                             "timesteps, which FusedScheduler does not implement",
}
# Classes whose set_timesteps(mu=...) writes exp(mu) into the config's flow_shift, where it
# stays for every later run: not reproduced.
_STICKY_MU = ("DPMSolverMultistepScheduler", "DEISMultistepScheduler")
# Multistep classes whose fused plan keeps order - 1 past outputs per step, so a restart's
# solver orders can be checked against the full run's.
_ORDER_BY_HISTORY = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
                     "CosineDPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler")
# Multistep classes whose lower_order_final lowers the last steps' orders only in runs of
# fewer than 15 steps, counted over the whole run: a restart's shorter tail must not lower
# them where the full run does not (their step() takes no eta).
_LOWER_BY_LENGTH = ("DPMSolverMultistepScheduler", "DEISMultistepScheduler", "CosineDPMSolverMultistepScheduler",
                    "EDMDPMSolverMultistepScheduler")
# Classes whose network output is EDM-preconditioned: their data estimate is
# c_skip x + c_out F with the config's sigma_data (the fused plans fold it into their
# coefficients; pred_original_sample needs it spelled out).
_PRECONDITIONED = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler")
# step() arguments of the replaced class that FusedScheduler honours only at their default
# (a pipeline passing the default gets the same step), with why where a reason is known.
_STEP_AT_DEFAULT = {
    "per_token_timesteps": "FlowMatchEulerDiscreteScheduler then steps every token from its own sigma "
                           "(per_token_timesteps / num_train_timesteps) to the largest level of the schedule "
                           "below it, a step size per token read from the tensor's values, while a fused step "
                           "has one set of coefficients per sample, fixed by set_timesteps",
}
# EDM's churn, as step() arguments (Karras et al. 2022): where a class applies it, values
# other than the defaults build the run's sampler with them (fixed for the whole run,
# chosen at its first step, as eta); FlowMatchEulerDiscreteScheduler takes them and
# ignores them, so they are accepted at any value there.
_CHURN_ARGS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_CHURN_CLASSES = ("EulerDiscreteScheduler", "EDMEulerScheduler", "FlowMatchHeunDiscreteScheduler")
_IGNORES_CHURN = ("FlowMatchEulerDiscreteScheduler",)
# What step() returns besides prev_sample, by class (diffusers' output fields; the
# tuple form's second element): LCM's consistency output, TCD's noised estimate.
_SECOND_OUTPUT = {"LCMScheduler": "denoised", "TCDScheduler": "pred_noised_sample"}
_PRIVATE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path")
# Classes whose corrector starts from their stored last sample: a state the pipeline edits
# between steps is then corrected from the stored one (fastdiff's default folds the
# corrector into the prediction, which corrects the edited state).
_KEEPS_LAST_SAMPLE = ("UniPCMultistepScheduler", "SASolverScheduler")


def _diffusers_class(name):
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)) or cls is FusedScheduler:
        raise ValueError(f"scheduler_class must name a diffusers scheduler class, got {name!r}")
    return cls


class FusedSchedulerOutput:
    """The result of :meth:`FusedScheduler.step` in both forms: ``prev_sample`` (also
    ``out[0]``) and ``pred_original_sample`` (``out[1]``: the data estimate x0 of the step,
    clipped / thresholded as the scheduler does; computed only when read). For LCM and
    TCD the second element is instead their own output field, ``denoised`` (LCM: its
    consistency output c_skip x + c_out x0) or ``pred_noised_sample`` (TCD), as diffusers'
    tuple has it; ``pred_original_sample`` is still the data estimate."""

    # Made once per pipeline step right after a UNet call, when every attribute costs
    # microseconds: the step's inputs are kept as one tuple, read only if asked for.
    __slots__ = ("prev_sample", "_step", "_x0", "_second")

    def __init__(self, prev_sample, step):
        self.prev_sample = prev_sample
        self._step = step  # (scheduler, sampler, _Run, call index, model_output, sample)
        self._x0 = self._second = None

    @property
    def _name(self):
        return self._step[0]._second or "pred_original_sample"

    @property
    def pred_original_sample(self):
        if self._x0 is None:
            sched, s, run, k, model_output, sample = self._step
            self._x0 = sched._x0(s, run, k, model_output, sample)
        return self._x0

    def _second_value(self):
        sched, s, run, k, model_output, sample = self._step
        if sched._second is None:
            return self.pred_original_sample
        if self._second is None:
            self._second = sched._second_output(s, run, k, model_output, sample, self.pred_original_sample)
        return self._second

    def __getattr__(self, name):  # reached only for names that are not slots or properties
        if not name.startswith("_") and name == self._name:
            return self._second_value()
        raise AttributeError(f"FusedSchedulerOutput has no attribute {name!r}")

    def to_tuple(self):
        return self.prev_sample, self._second_value()

    def __getitem__(self, i):
        if i == 0 or i in (-2, "prev_sample"):
            return self.prev_sample
        if i in (1, -1, self._name):
            return self._second_value()
        if i == "pred_original_sample":
            return self.pred_original_sample
        raise IndexError(i) if isinstance(i, int) else KeyError(i)

    def __iter__(self):
        yield self.prev_sample
        yield self._second_value()

    def __len__(self):
        return 2


class _Run:
    """A fused sampler and what the scheduler derives from it once: per-call noise levels
    (alpha, sigma) and model-input scales (None: the sample itself), the DDIM eta and
    the churn options ((name, value) pairs, _CHURN_ARGS) it was built with, and whether
    its steps draw no noise (``direct``: a step can then go straight to the compiled
    step)."""

    def __init__(self, sampler: Sampler, eta: float = 0.0, churn: tuple = ()):
        self.sampler, self.eta, self.churn = sampler, eta, churn
        grid, calls = sampler.grid, sampler.plan.calls
        if grid.rows != 1:
            raise ValueError("FusedScheduler runs one grid for the whole batch")
        t_grid = grid.t[0]
        levels = []
        for c in calls:
            hit = np.flatnonzero(t_grid == c.t[0])
            if hit.size:
                levels.append((grid.alpha[0, hit[0]], grid.sigma[0, hit[0]]))
            else:  # PNDM's Runge-Kutta midpoints lie between grid points
                a, s = grid.lookup(c.t)
                levels.append((float(a[0]), float(s[0])))
        self.alpha = np.array([a for a, _ in levels] + [grid.alpha[0, -1]])
        self.sigma = np.array([s for _, s in levels] + [grid.sigma[0, -1]])
        self.c_in = [None if c.c_in is None else float(c.c_in[0]) for c in calls]
        self.sigma_space = sampler.plan.sigma_space
        self.direct = not any(c.op.noise for c in calls)  # no noise to draw in Python


class FusedScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs fastdiff's fused step in a pipeline's own loop.

    Build it from the scheduler it replaces, as diffusers' schedulers are swapped::

        pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config)
        pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config, sampler="DPM++ 2M Karras")
        pipe.scheduler = FusedScheduler.from_scheduler(pipe.scheduler)

    The config is that of the replaced diffusers scheduler (all its keys, so
    ``scheduler.config.num_train_timesteps``, ``DDIMScheduler.from_config(fused.config)``
    work) plus ``scheduler_class``, the diffusers class whose behaviour it reproduces
    (``_class_name`` of the source config, or the class of ``sampler=``). A config value
    fastdiff cannot reproduce raises ValueError naming it, at construction.

    Args:
        scheduler_class: name of the diffusers scheduler class (``"PNDMScheduler"``, ...).
        **scheduler_config: that class's config (keys it does not take are kept, as
            diffusers keeps them, and ignored).
    """

    config_name = SchedulerMixin.config_name
    _compatibles = []

    def __init__(self, scheduler_class: str = "DDIMScheduler", **scheduler_config):
        source_cls = _diffusers_class(scheduler_class)
        if scheduler_class not in PIPELINE_CLASSES:
            why = _NOT_IN_PIPELINES.get(scheduler_class) or _REFUSED.get(
                scheduler_class, "fastdiff has no sampler family whose fused step reproduces its update")
            raise ValueError(f"FusedScheduler does not reproduce {scheduler_class} in pipelines: {why}; "
                             f"supported: {', '.join(PIPELINE_CLASSES)}")
        cfg = {k: v for k, v in scheduler_config.items() if k not in _PRIVATE_KEYS}
        self._source = source_cls.from_config(cfg)
        # refuse what fastdiff cannot honour, now
        self._flow = getattr(sampler_args(self._source, 1)[1].get("schedule"), "kind", None) == "flow"
        source_cfg = {k: v for k, v in self._source.config.items() if k not in _PRIVATE_KEYS}
        self.register_to_config(scheduler_class=scheduler_class, **source_cfg)
        step_params = inspect.signature(source_cls.step).parameters
        self._step_params = set(step_params)
        # the eta a pipeline's step(eta=...) is compared with: the class's default (TCD: 0.3)
        self._eta = float(step_params["eta"].default) if "eta" in step_params else 0.0
        self._step_defaults = {k: p.default for k, p in step_params.items()
                               if p.default is not inspect.Parameter.empty}
        self._pred = (EDMPrecond(self.config.prediction_type, self.config.sigma_data)
                      if scheduler_class in _PRECONDITIONED else None)
        self._takes = set(inspect.signature(source_cls.set_timesteps).parameters) - {"self"}
        self._second = _SECOND_OUTPUT.get(scheduler_class)
        self._runs = {}
        self._run = None
        self.num_inference_steps = None
        self.timesteps = self._source.timesteps
        self._begin_index = None
        self._reset_progress()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, sampler: str | None = None,
                    **kwargs):
        """A FusedScheduler from a diffusers scheduler config (``pipe.scheduler.config``,
        a dict, or a saved FusedScheduler config).

        ``sampler``: a fastdiff sampler name or alias (``"dpm++2m"``, ``"DPM++ 2M Karras"``,
        ``"k_euler"``) to run instead of the config's own class: the config is then read
        by the matching diffusers class, as ``DPMSolverMultistepScheduler.from_config(config)``
        would. ``kwargs``: config values that replace the config's (diffusers' names,
        e.g. ``use_karras_sigmas=True``, ``timestep_spacing="trailing"``).
        """
        if config is None:
            raise ValueError("from_config needs a config (e.g. pipe.scheduler.config)")
        if isinstance(config, ConfigMixin):
            config = config.config
        if not isinstance(config, dict):
            raise TypeError(f"config must be a scheduler config (dict), got {type(config).__name__}")
        cfg = dict(config)
        name = cfg.get("_class_name")
        if name == cls.__name__ or "scheduler_class" in cfg:
            name = cfg.pop("scheduler_class", None)
        cfg.pop("_class_name", None)
        name = kwargs.pop("scheduler_class", name)
        if sampler is not None:
            family, implied = resolve(sampler)
            if family not in DIFFUSERS_CLASSES:
                raise ValueError(f"sampler {sampler!r} ({family}) has no diffusers scheduler counterpart "
                                 f"to run in a pipeline; choose one of {', '.join(DIFFUSERS_CLASSES)}")
            name, overrides = DIFFUSERS_CLASSES[family]
            kwargs = {**overrides, **{DIFFUSERS_OPTIONS[k]: v for k, v in implied.items()}, **kwargs}
        if name is None:
            raise ValueError("the config has no _class_name (a scheduler built in code): use "
                             "FusedScheduler.from_scheduler(scheduler), or give sampler= or scheduler_class=")
        source = _diffusers_class(name).from_config(cfg, **kwargs)  # diffusers' own key handling
        out = cls(name, **dict(source.config))
        return (out, {}) if return_unused_kwargs else out

    @classmethod
    def from_scheduler(cls, scheduler, sampler: str | None = None, **kwargs) -> "FusedScheduler":
        """A FusedScheduler reproducing the diffusers scheduler instance ``scheduler``."""
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
        cfg = dict(scheduler.config)
        if not isinstance(scheduler, cls):
            cfg["_class_name"] = type(scheduler).__name__
        return cls.from_config(cfg, sampler=sampler, **kwargs)

    # -- what pipelines read ------------------------------------------------------------------

    @property
    def order(self) -> int:
        """The replaced class's ``order`` (model calls per step as pipelines count them)."""
        return type(self._source).order

    @property
    def init_noise_sigma(self):
        if self._run is None:
            return self._source.init_noise_sigma
        return self._run.sampler.init_noise_sigma

    @property
    def sigmas(self) -> torch.Tensor:
        """The noise level of every model call and of the final level, [len(timesteps) + 1]
        float32 (CPU): k-diffusion's sigma / alpha, or on a flow-matching schedule the flow
        sigma s of x = (1 - s) x0 + s eps (as the diffusers classes define theirs)."""
        if self._run is None:
            raise RuntimeError("call set_timesteps first")
        if self._flow:
            return torch.from_numpy(self._run.sigma).float()
        with np.errstate(divide="ignore"):
            return torch.from_numpy(self._run.sigma / self._run.alpha).float()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._source.alphas_cumprod

    @property
    def sampler(self) -> Sampler | None:
        """The fused :class:`fastdiff.Sampler` of the current run (None before set_timesteps)."""
        return None if self._run is None else self._run.sampler

    @property
    def step_index(self) -> int | None:
        """Index (into ``timesteps``) of the next model call; None before the first step."""
        return None if self._started is None else self._first + self._done

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start the run at ``timesteps[begin_index]`` (img2img and inpainting pipelines)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
        self._check_begin(int(begin_index))
        self._begin_index = int(begin_index)
        self._reset_progress()

    def __len__(self):
        return self.config.num_train_timesteps

    def set_shift(self, shift: float):
        """Refused: FlowMatchEulerDiscreteScheduler.set_shift is not reproduced."""
        raise ValueError(f"FusedScheduler: {self.config.scheduler_class}.set_shift is not reproduced: diffusers "
                         "then shifts with the new value between the endpoints of the config's shift, which "
                         "fastdiff's flow schedule does not separate; set shift in the config instead")

    # -- the loop -----------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None,
                      sigmas=None, mu=None, **kwargs):
        """Prepare a run of ``num_inference_steps`` steps; ``timesteps`` then holds the model
        time of every UNet call, on ``device``. The other arguments are the replaced
        class's, where its ``set_timesteps`` takes them, with its meaning:

        - ``timesteps``: custom model times (flow matching: used as given while the sigmas
          derived from them are shifted, as FlowMatchEulerDiscreteScheduler does).
        - ``sigmas``: custom flow sigmas in (0, 1] before the shift (flow-matching
          schedules: FlowMatchEuler, UniPC with ``use_flow_sigmas``; Flux pipelines pass
          them); their count is the number of steps.
        - ``mu``: the dynamic shift's exponent (with ``use_dynamic_shifting``; ignored
          without it, as diffusers ignores it).
        - ``original_inference_steps``, ``strength`` (LCM, TCD): the distillation schedule
          the timesteps are taken from, and the img2img fraction of it.
        """
        cls = self.config.scheduler_class
        unknown = sorted(set(kwargs) - self._takes)
        if unknown:
            raise TypeError(f"{cls}.set_timesteps got unexpected argument(s) {unknown}")
        grid = self._grid_options(num_inference_steps, timesteps, sigmas, mu, kwargs)
        if grid.get("sigmas") is not None:
            num_inference_steps = len(grid["sigmas"])
        if timesteps is not None:
            if "timesteps" not in self._takes:
                raise ValueError(f"{cls} does not take custom timesteps, so neither does a FusedScheduler "
                                 "reproducing it")
            timesteps = tuple(float(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist")
                                                  else timesteps))
            if grid.get("sigmas") is not None and len(timesteps) != len(grid["sigmas"]):
                raise ValueError(f"sigmas ({len(grid['sigmas'])}) and timesteps ({len(timesteps)}) must have "
                                 "the same length")
            self._key = ("timesteps", timesteps, tuple(sorted(grid.items())))
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps, timesteps or (flow matching) sigmas")
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
            self._key = ("steps", int(num_inference_steps), tuple(sorted(grid.items())))
        self._run = self._get_run(self._key, None)
        self.num_inference_steps = self._run.sampler.steps
        t = self._run.sampler.timesteps
        self.timesteps = t.to(device) if device is not None else t
        self._begin_index = None
        self._reset_progress()

    def _grid_options(self, steps, timesteps, sigmas, mu, kwargs) -> dict:
        """The Sampler options (``mu``, ``sigmas``, ``original_inference_steps``, LCM / TCD
        explicit timesteps) that set_timesteps' arguments amount to, checked as the
        replaced class checks them."""
        cls, cfg, out = self.config.scheduler_class, self.config, {}
        if sigmas is not None:
            if "sigmas" not in self._takes or not self._flow:
                raise ValueError(f"FusedScheduler: custom sigmas for {cls} are not supported by fastdiff's fused "
                                 "samplers (only on flow-matching schedules); give num_inference_steps or timesteps")
            sigmas = tuple(float(v) for v in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas))
            if steps is not None and len(sigmas) != steps:
                raise ValueError(f"sigmas has {len(sigmas)} values but num_inference_steps={steps}")
            out["sigmas"] = sigmas
        elif timesteps is not None and self._flow and "timesteps" in self._takes:
            if cfg.get("use_flow_sigmas"):
                raise ValueError(f"FusedScheduler: custom timesteps for {cls} with use_flow_sigmas are not "
                                 "supported")
            # FlowMatchEuler derives its (then shifted) sigmas from the timesteps as given
            out["sigmas"] = tuple((np.asarray(timesteps, dtype=np.float32) / np.float32(cfg.num_train_timesteps))
                                  .astype(np.float64).tolist())
        if mu is not None:
            if "mu" not in self._takes:
                raise ValueError(f"{cls}.set_timesteps takes no mu")
            if cls in _STICKY_MU:
                raise ValueError(f"FusedScheduler: {cls}.set_timesteps(mu=...) is not reproduced: diffusers writes "
                                 "exp(mu) into the config's flow_shift, which then holds for every later run; "
                                 "set flow_shift in the config instead")
            if cfg.get("use_dynamic_shifting"):  # diffusers ignores mu without it
                out["mu"] = float(mu)
        elif cfg.get("use_dynamic_shifting") and "mu" in self._takes and self._flow and cls not in _STICKY_MU:
            raise ValueError(f"{cls}: use_dynamic_shifting=True needs set_timesteps(..., mu=...)")
        ntt = kwargs.get("num_train_timesteps")
        if ntt is not None and ntt != cfg.num_train_timesteps:
            raise ValueError(f"FusedScheduler: num_train_timesteps={ntt} differs from the config's "
                             f"{cfg.num_train_timesteps}; set it in the config")
        original, strength = kwargs.get("original_inference_steps"), kwargs.get("strength", 1.0)
        if original is not None:
            if cls == "TCDScheduler":
                raise ValueError("FusedScheduler: TCDScheduler.set_timesteps(original_inference_steps=...) spaces "
                                 "its timesteps over all training timesteps in diffusers (the value only bounds "
                                 "their count), which is not reproduced; set original_inference_steps in the config")
            out["original_inference_steps"] = int(original)
        if strength != 1.0:
            if timesteps is not None:
                raise ValueError(f"FusedScheduler: {cls} with custom timesteps and strength < 1 is not reproduced "
                                 "(diffusers then adds noise after its last step)")
            if steps is None:
                raise ValueError("set_timesteps needs num_inference_steps")
            from ..samplers.grid_families import lcm_timesteps
            T = cfg.num_train_timesteps
            orig = out.pop("original_inference_steps", cfg.original_inference_steps)
            out["lcm_timesteps"] = tuple(lcm_timesteps(T, int(steps), orig, strength).tolist())
        return out

    def _get_run(self, key, eta):
        run = self._runs.get((key, eta))
        if run is None:
            extra = {} if eta is None else {"eta": eta}
            extra.update(key[2])
            if self.config.scheduler_class in _KEEPS_LAST_SAMPLE:
                extra["keep_last_sample"] = True
            ts = extra.pop("lcm_timesteps", None)
            if key[0] == "timesteps" or ts is not None:
                sampler = Sampler.from_diffusers(self._source, timesteps=list(ts or key[1]), **extra)
            else:
                sampler = Sampler.from_diffusers(self._source, key[1], **extra)
            churn = tuple(kv for kv in key[2] if kv[0] in _CHURN_ARGS)
            run = self._runs[(key, eta)] = _Run(sampler, self._eta if eta is None else eta, churn)
            while len(self._runs) > 4:  # a few recent step counts, their device tables kept
                self._runs.pop(next(iter(self._runs)))
        return run

    def _reset_progress(self):
        self._started = None   # the _Run stepping this run, once its first call is made
        self._offset = 0       # index into timesteps of that sampler's call 0
        self._first = 0        # index into timesteps of the first call of this run
        self._done = 0         # calls stepped so far
        self._pending = False  # begin_at still to be applied (it needs the state's shape)

    def _start(self) -> _Run:
        """The sampler for this run, chosen at its first call: the full plan, or for a
        mid-schedule start what the replaced class does there (MID_SCHEDULE)."""
        if self._run is None:
            raise RuntimeError("FusedScheduler: call set_timesteps before stepping")
        full = self._run.sampler
        b = self._begin_index or 0
        if not 0 <= b < len(full):
            raise ValueError(f"begin_index {b} is outside the {len(full)} model calls of this run")
        self._first, self._offset, self._started = b, 0, self._run
        full.reset()
        if b == 0:
            return self._run
        mode = MID_SCHEDULE[self.config.scheduler_class]
        if mode == "continue":
            self._pending, self._offset = True, b
        elif mode == "restart":
            self._started = _Run(self._restart(full, b), self._run.eta, self._run.churn)
        else:
            self._started = _Run(self._resumed_plms(b), self._run.eta, self._run.churn)
        return self._started

    def _restart(self, full, b):
        """A fresh multistep run from call b, with diffusers' orders: the warm-up counts
        from b while the last steps' orders follow the whole run's length."""
        cfg = self.config
        if cfg.get("disable_corrector"):
            raise ValueError("FusedScheduler: disable_corrector with a mid-schedule start is not supported")
        tail = full.tail(b)
        if cfg.scheduler_class in _ORDER_BY_HISTORY:  # history length = order - 1 there
            want = [min(len(full.plan.calls[b + j].op.history), j) for j in range(len(tail))]
            got = [len(c.op.history) for c in tail.plan.calls]
            if want != got and cfg.scheduler_class in _LOWER_BY_LENGTH and cfg.get("lower_order_final"):
                # the full run is long enough that lower_order_final changes none of its orders
                # (the check below confirms it), the tail is not: build the tail without it
                key = self._key[:2] + (self._key[2] + (("lower_order_final", False),),)
                tail = self._get_run(key, None).sampler.tail(b)
                got = [len(c.op.history) for c in tail.plan.calls]
            if want != got:
                raise ValueError(f"FusedScheduler: {cfg.scheduler_class} started at step {b} of "
                                 f"{full.steps} uses solver orders {[w + 1 for w in want]}; a fused "
                                 f"restart would use {[g + 1 for g in got]}")
        return tail

    def _resumed_plms(self, b):
        """diffusers' PNDMScheduler started at call b: a fresh PLMS run over the timesteps
        from there, which lack the full run's repeated second entry (``pndm(resumed=True)``;
        set_begin_index has refused the starts this does not cover)."""
        sampler = Sampler.from_diffusers(self._source, self._run.sampler.steps, resumed=True)
        return sampler.tail(b - 1)  # call b of the full run is at grid point b - 1

    def _check_begin(self, b):
        """Refuse, when set_begin_index is called, the mid-schedule starts not reproduced."""
        if b == 0 or self.config.scheduler_class != "PNDMScheduler":
            return
        if not self.config.skip_prk_steps:
            raise ValueError(f"FusedScheduler: PNDMScheduler with Runge-Kutta warm-up (skip_prk_steps=False) "
                             f"cannot start mid-schedule (begin_index={b}): diffusers then takes the noise "
                             "levels of the full run's first steps whatever the start; use skip_prk_steps=True "
                             "or another sampler, e.g. FusedScheduler.from_config(config, sampler='ddim')")
        if b == 1:
            raise ValueError("FusedScheduler: PNDMScheduler cannot start at begin_index=1 (the full run's "
                             "repeated timestep): diffusers' PLMS then steps from one level above its start; "
                             "use another sampler, e.g. FusedScheduler.from_config(config, sampler='ddim')")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The UNet input for the next call: ``sample`` itself for DDPM-type samplers,
        ``sample / sqrt(sigma^2 + 1)`` for the Euler family, EDM's c_in(sigma) =
        ``1 / sqrt(sigma^2 + sigma_data^2)`` for the EDM classes (any batch, e.g. the
        doubled CFG batch)."""
        run = self._started or self._start()
        c_in = run.c_in[self._offset + self._done]
        # a host number: the multiply needs no device table and reads nothing back
        return sample if c_in is None else sample * c_in

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, eta: float | None = None, **kwargs) -> FusedSchedulerOutput:
        """One fused update from the (guided) model output at the current call.

        Args:
            model_output: the UNet's prediction for ``scale_model_input(sample)``, [B, ...]
                (a learned-variance output with 2C channels uses the first C).
            timestep: this call's entry of ``timesteps`` (checked when it is a CPU tensor or
                a number; device tensors are not read, to avoid a synchronisation).
            sample: the current latents [B, ...].
            generator: noise of stochastic samplers: a ``torch.Generator`` or a list with
                one per sample.
            eta: DDIM's eta (pipelines pass it when ``step`` takes it); ignored, as by
                diffusers, for classes whose ``step`` has no eta.
            kwargs: other arguments of the replaced class's ``step``. EDM's churn
                (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``) is applied as diffusers
                does where the class applies it (the same values for a whole run; a change
                in the middle of a run is a ValueError), and accepted at any value where
                diffusers ignores it (FlowMatchEulerDiscreteScheduler); every other
                argument is accepted at its default (``per_token_timesteps=None``, ...), and
                another value is a ValueError naming it.
        Returns:
            :class:`FusedSchedulerOutput` (``prev_sample`` first), whatever ``return_dict``.
        """
        churn = self._check_step_kwargs(kwargs) if kwargs else ()
        run = self._started or self._start()
        new_eta = eta is not None and "eta" in self._step_params and eta != run.eta
        if new_eta or churn != run.churn:
            if self._done:
                what = "eta" if new_eta else "/".join(_CHURN_ARGS)
                raise ValueError(f"FusedScheduler: {what} changed in the middle of a run (the fused run is "
                                 "built with the values of its first step: pass the same ones at every step)")
            key = self._key[:2] + (self._key[2] + churn,)
            self._run = self._get_run(key, float(eta) if new_eta else None)
            run = self._start()
        s = run.sampler
        if self._pending:
            s.begin_at(self._offset, sample)
            self._pending = False
        k = self._offset + self._done
        # A noiseless step that follows the sampler's prepared run goes straight to the
        # compiled step (two Python frames fewer, ~10 us each right after a UNet call);
        # whatever it hands back, Sampler.step does from the start.
        prog = s._run.prog if run.direct else None
        prev = None if prog is None else prog.step(sample, model_output, None, timestep, None, False)
        if not isinstance(prev, torch.Tensor):
            prev = s.step(model_output, timestep, sample, generator=generator)
        self._done += 1
        return FusedSchedulerOutput(prev, (self, s, run, k, model_output, sample))

    def _check_step_kwargs(self, kwargs):
        """Refuse step() arguments the replaced class's step does not take (TypeError, as
        calling it would) and those it takes at a value other than its default, except
        EDM's churn; returns the churn options to build the run with ((name, value)
        pairs, those not at their default)."""
        cls = self.config.scheduler_class
        unknown = sorted(set(kwargs) - set(self._step_defaults))
        if unknown:
            raise TypeError(f"FusedScheduler.step ({cls}) got unsupported argument(s) {unknown}")
        churn = []
        for name, value in kwargs.items():
            default = self._step_defaults[name]
            if name in _CHURN_ARGS and torch.is_tensor(value) and value.numel() == 1 \
                    and not value.dtype.is_complex and value.dtype != torch.bool:
                value = value.item()  # diffusers takes a one-element tensor as its value
            if value is default or (default is not None and not torch.is_tensor(value) and value == default):
                continue
            if name in _CHURN_ARGS and cls in _IGNORES_CHURN:
                continue
            if name in _CHURN_ARGS and cls in _CHURN_CLASSES:
                if not isinstance(value, numbers.Real) or isinstance(value, bool):
                    raise TypeError(f"FusedScheduler.step: {name} must be a number, got {type(value).__name__}")
                churn.append((name, float(value)))
                continue
            if value is None and default is False:  # a flag diffusers tests for truth (DDIMPipeline passes
                continue                            # use_clipped_model_output=None)
            why = _STEP_AT_DEFAULT.get(name, "the fused step is built by set_timesteps with the class's default "
                                             f"{default!r}")
            raise ValueError(f"FusedScheduler: {cls}.step({name}=...) is not reproduced: {why}")
        return tuple(sorted(churn))

    def _model_output(self, model_output, sample):
        m = model_output.sample if hasattr(model_output, "sample") else model_output
        if m.shape[1] == 2 * sample.shape[1]:
            m = m[:, :sample.shape[1]]
        return m.to(sample.dtype)

    def _x0(self, s, run, k, model_output, sample):
        """The data estimate of call k (what diffusers returns as pred_original_sample)."""
        m = self._model_output(model_output, sample)
        a, sg = run.alpha[k], run.sigma[k]
        (px, pm), _ = data_eps(self._pred or s.prediction_type, a, sg)
        if run.sigma_space:
            px = px * a
        x0 = float(px) * sample + float(pm) * m
        clamp = s.clamp
        if clamp is None:
            return x0
        if clamp.kind == "clip":
            return x0.clamp(-clamp.value, clamp.value)
        q = torch.quantile(x0.abs().reshape(x0.shape[0], -1).float(), clamp.ratio, dim=1)
        q = q.clamp(1.0, clamp.value).to(x0.dtype).view((-1,) + (1,) * (x0.dim() - 1))
        return x0.clamp(-q, q) / q

    def _second_output(self, s, run, k, model_output, sample, x0):
        """LCM's ``denoised`` (c_skip x + c_out x0) or TCD's ``pred_noised_sample``
        (alpha_s x0 + sigma_s eps at its intermediate level) of call k."""
        if self._second == "denoised":
            c_skip, c_out = boundary_scalings(s.grid.t[:, k], self.config.timestep_scaling)
            return float(c_out[0]) * x0 + float(c_skip[0]) * sample
        a_s, s_s = tcd_level(s.grid, k, run.eta)
        _, (ex, em) = data_eps(s.prediction_type, run.alpha[k], run.sigma[k])
        eps = float(ex) * sample + float(em) * self._model_output(model_output, sample)
        return float(a_s[0]) * x0 + float(s_s[0]) * eps

    def _lacks(self, method):
        """Refuse what the replaced class does not have (flow matching: scale_noise, not
        add_noise; IPNDM: neither), as calling it on that class would."""
        src = type(self._source)
        if not hasattr(src, method):
            other = {"add_noise": "scale_noise", "scale_noise": "add_noise"}[method]
            has = f"; it has {other}" if hasattr(src, other) else ""
            raise AttributeError(f"FusedScheduler: {src.__name__} has no {method} (diffusers' class does not "
                                 f"define it{has})")

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Flow matching's forward process, ``(1 - s) sample + s noise`` at the flow sigma s
        of ``timestep`` ([B] model times; with a begin index, as in img2img and
        inpainting, the current call's level and ``timestep`` only gives the batch size),
        as FlowMatchEuler/HeunDiscreteScheduler.scale_noise."""
        self._lacks("scale_noise")
        a, s = self._levels(timestep, sample)
        return s * noise.to(sample.dtype) + a * sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """``original_samples`` noised to the level of ``timesteps`` (what the replaced class
        gives: alpha x0 + sigma noise, or x0 + sigma / alpha noise for the Euler family).
        With a begin index (img2img, inpainting) the level is that of the current call and
        ``timesteps`` is not read."""
        self._lacks("add_noise")
        src = type(self._source)
        if self._run is None or not hasattr(src, "index_for_timestep"):
            # DDIM, DDPM, PNDM: the training table at integer timesteps, on the device.
            return self._source.add_noise(original_samples, noise, timesteps)
        a, s = self._levels(timesteps, original_samples)
        return a * original_samples + s * noise.to(original_samples.dtype)

    def _levels(self, timesteps, like):
        """(alpha, sigma) of the calls at ``timesteps`` [B] (or, with a begin index, of the
        current call), as [B, 1, ...] tensors like ``like``; alpha = 1 and sigma / alpha for
        the Euler family's sigma-space states. The call is found as diffusers finds it."""
        if self._run is None:
            raise RuntimeError("FusedScheduler: call set_timesteps first")
        run = self._run
        timesteps = torch.as_tensor(timesteps)
        if self._begin_index is None:
            ts = timesteps.detach().reshape(-1).cpu().double().numpy()
            sched = self.timesteps.detach().cpu().double().numpy()
            idx = []
            for t in ts:
                hit = np.flatnonzero(sched == t)
                if not hit.size:
                    raise ValueError(f"timestep {t:g} is not one of this run's timesteps")
                idx.append(hit[1] if hit.size > 1 else hit[0])  # diffusers' choice for repeats
        else:
            step = self.step_index
            idx = [self._begin_index if step is None else step] * timesteps.reshape(-1).shape[0]
        idx = np.asarray(idx)
        a, s = run.alpha[idx], run.sigma[idx]
        if run.sigma_space:
            a, s = np.ones_like(a), s / a
        view = (-1,) + (1,) * (like.dim() - 1)
        a = torch.from_numpy(a).to(like.device, like.dtype).view(view)
        s = torch.from_numpy(s).to(like.device, like.dtype).view(view)
        return a, s


def fuse(pipe, sampler: str | None = None, time_sharing: TimeSharing | None = None):
    """Swap a diffusers pipeline's scheduler for the equivalent :class:`FusedScheduler`
    (or the one running ``sampler``, a fastdiff name or alias), in place.

    ``time_sharing``: a :class:`fastdiff.TimeSharing` applied to the pipeline's UNet
    (E-TSDM, through :func:`fastdiff.patch_time_embedding`). Returns ``pipe``.
    """
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(scheduler, SchedulerMixin):
        raise TypeError(f"fuse expects a diffusers pipeline with a scheduler, got {type(pipe).__name__}")
    if time_sharing is not None:
        if not isinstance(time_sharing, TimeSharing):
            raise TypeError(f"time_sharing must be a fastdiff.TimeSharing, got {type(time_sharing).__name__}")
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise TypeError(f"time_sharing needs a pipeline with a UNet; {type(pipe).__name__} has none")
    fused = FusedScheduler.from_scheduler(scheduler, sampler=sampler)
    if time_sharing is not None:
        patch_time_embedding(pipe.unet, sharing=time_sharing)
    pipe.scheduler = fused  # register_modules is what DiffusionPipeline.__setattr__ updates
    return pipe
