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

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..embedding import patch_time_embedding
from ..samplers.core import data_eps
from ..samplers.from_diffusers import DIFFUSERS_CLASSES, DIFFUSERS_OPTIONS, sampler_args
from ..samplers.registry import resolve
from ..samplers.sampler import Sampler
from ..schedules import TimeSharing

__all__ = ["FusedScheduler", "FusedSchedulerOutput", "fuse", "MID_SCHEDULE", "PIPELINE_CLASSES"]

# What a diffusers scheduler does when a pipeline starts it mid-schedule (img2img and
# inpainting call set_begin_index): "continue" takes the same step as in a full run (the
# scheduler keeps no state across steps, or, for LMS, the history it lacks adds nothing);
# "restart" runs a fresh multistep solve over the remaining noise levels (its warm-up
# counts the steps it has taken). Classes not listed refuse to start mid-schedule.
MID_SCHEDULE = {
    "DDIMScheduler": "continue",
    "DDPMScheduler": "continue",
    "EulerDiscreteScheduler": "continue",
    "EulerAncestralDiscreteScheduler": "continue",
    "HeunDiscreteScheduler": "continue",
    "LMSDiscreteScheduler": "continue",
    "DPMSolverMultistepScheduler": "restart",
    "DPMSolverSinglestepScheduler": "restart",
    "UniPCMultistepScheduler": "restart",
}
# The classes a FusedScheduler reproduces inside pipelines (tested there). Others that
# Sampler.from_diffusers maps are refused: flow-matching pipelines pass custom sigmas / mu,
# LCM / TCD / consistency pipelines read a differently defined pred_original_sample.
PIPELINE_CLASSES = (*MID_SCHEDULE, "PNDMScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler",
                    "KDPM2AncestralDiscreteScheduler", "SASolverScheduler", "DPMSolverSDEScheduler",
                    "IPNDMScheduler", "CosineDPMSolverMultistepScheduler")
_PRIVATE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path")


def _diffusers_class(name):
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)) or cls is FusedScheduler:
        raise ValueError(f"scheduler_class must name a diffusers scheduler class, got {name!r}")
    return cls


class FusedSchedulerOutput:
    """The result of :meth:`FusedScheduler.step` in both forms: ``prev_sample`` (also
    ``out[0]``) and ``pred_original_sample`` (``out[1]``: the data estimate x0 of the step,
    clipped / thresholded as the scheduler does; computed only when read)."""

    __slots__ = ("prev_sample", "_x0", "_make_x0")

    def __init__(self, prev_sample, make_x0):
        self.prev_sample = prev_sample
        self._x0, self._make_x0 = None, make_x0

    @property
    def pred_original_sample(self):
        if self._x0 is None:
            self._x0 = self._make_x0()
        return self._x0

    def to_tuple(self):
        return self.prev_sample, self.pred_original_sample

    def __getitem__(self, i):
        if i in (0, -2, "prev_sample"):
            return self.prev_sample
        if i in (1, -1, "pred_original_sample"):
            return self.pred_original_sample
        raise IndexError(i) if isinstance(i, int) else KeyError(i)

    def __iter__(self):
        yield self.prev_sample
        yield self.pred_original_sample

    def __len__(self):
        return 2


class _Run:
    """A fused sampler and what the scheduler derives from it once: per-call noise levels
    (alpha, sigma) and model-input scales (None: the sample itself), and the DDIM eta it
    was built with."""

    def __init__(self, sampler: Sampler, eta: float = 0.0):
        self.sampler, self.eta = sampler, eta
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
            raise ValueError(f"FusedScheduler does not reproduce {scheduler_class} in pipelines (not verified "
                             f"there); supported: {', '.join(PIPELINE_CLASSES)}")
        cfg = {k: v for k, v in scheduler_config.items() if k not in _PRIVATE_KEYS}
        self._source = source_cls.from_config(cfg)
        sampler_args(self._source, 1)  # refuse what fastdiff cannot honour, now
        source_cfg = {k: v for k, v in self._source.config.items() if k not in _PRIVATE_KEYS}
        self.register_to_config(scheduler_class=scheduler_class, **source_cfg)
        self._step_params = set(inspect.signature(source_cls.step).parameters)
        self._takes = set(inspect.signature(source_cls.set_timesteps).parameters)
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
        """k-diffusion noise level sigma / alpha of every model call and of the final
        level, [len(timesteps) + 1] float32 (CPU)."""
        if self._run is None:
            raise RuntimeError("call set_timesteps first")
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
        self._begin_index = int(begin_index)
        self._reset_progress()

    def __len__(self):
        return self.config.num_train_timesteps

    # -- the loop -----------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None,
                      sigmas=None, mu=None):
        """Prepare a run of ``num_inference_steps`` steps (or the custom ``timesteps``, for
        classes whose ``set_timesteps`` takes them); ``timesteps`` then holds the model time
        of every UNet call, on ``device``."""
        if sigmas is not None:
            raise ValueError("FusedScheduler: custom sigmas are not supported by fastdiff's fused samplers; "
                             "give num_inference_steps or timesteps")
        if mu is not None:
            raise ValueError("FusedScheduler: mu (dynamic shifting) is not supported by fastdiff's fused "
                             "samplers")
        if timesteps is not None:
            if "timesteps" not in self._takes:
                raise ValueError(f"{self.config.scheduler_class} does not take custom timesteps, so neither "
                                 "does a FusedScheduler reproducing it")
            timesteps = [float(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
            self._key = ("timesteps", tuple(timesteps))
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps or timesteps")
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
            self._key = ("steps", int(num_inference_steps))
        self._run = self._get_run(self._key, None)
        self.num_inference_steps = self._run.sampler.steps
        t = self._run.sampler.timesteps
        self.timesteps = t.to(device) if device is not None else t
        self._begin_index = None
        self._reset_progress()

    def _get_run(self, key, eta):
        run = self._runs.get((key, eta))
        if run is None:
            extra = {} if eta is None else {"eta": eta}
            if key[0] == "timesteps":
                sampler = Sampler.from_diffusers(self._source, timesteps=list(key[1]), **extra)
            else:
                sampler = Sampler.from_diffusers(self._source, key[1], **extra)
            run = self._runs[(key, eta)] = _Run(sampler, 0.0 if eta is None else eta)
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
        cls = self.config.scheduler_class
        mode = MID_SCHEDULE.get(cls)
        if mode == "continue":
            self._pending, self._offset = True, b
        elif mode == "restart":
            self._started = _Run(self._restart(full, b))
        else:
            why = ("diffusers' version has no set_begin_index and steps from mismatched noise levels there"
                   if cls == "PNDMScheduler" else "not verified against diffusers for this class")
            raise ValueError(f"FusedScheduler: {cls} cannot start mid-schedule (begin_index={b}, as img2img "
                             f"and inpainting pipelines do): {why}; use another sampler, e.g. "
                             "FusedScheduler.from_config(config, sampler='ddim') or 'dpm++2m'")
        return self._started

    def _restart(self, full, b):
        """A fresh multistep run from call b, with diffusers' orders: the warm-up counts
        from b while the last steps' orders follow the whole run's length."""
        cfg = self.config
        if cfg.get("disable_corrector"):
            raise ValueError("FusedScheduler: disable_corrector with a mid-schedule start is not supported")
        tail = full.tail(b)
        if cfg.scheduler_class.startswith("DPMSolver"):  # history length = order - 1 there
            want = [min(len(full.plan.calls[b + j].op.history), j) for j in range(len(tail))]
            got = [len(c.op.history) for c in tail.plan.calls]
            if want != got:
                raise ValueError(f"FusedScheduler: {cfg.scheduler_class} started at step {b} of "
                                 f"{full.steps} uses solver orders {[w + 1 for w in want]}; a fused "
                                 f"restart would use {[g + 1 for g in got]}")
        return tail

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The UNet input for the next call: ``sample`` itself for DDPM-type samplers,
        ``sample / sqrt(sigma^2 + 1)`` for the Euler family (any batch, e.g. the doubled
        CFG batch)."""
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
        Returns:
            :class:`FusedSchedulerOutput` (``prev_sample`` first), whatever ``return_dict``.
        """
        if kwargs:
            raise TypeError(f"FusedScheduler.step got unsupported argument(s) {sorted(kwargs)}")
        run = self._started or self._start()
        if eta is not None and "eta" in self._step_params and eta != run.eta:
            if self._done:
                raise ValueError("FusedScheduler: eta changed in the middle of a run")
            self._run = self._get_run(self._key, float(eta))
            run = self._start()
        s = run.sampler
        if self._pending:
            s.begin_at(self._offset, sample)
            self._pending = False
        k = self._offset + self._done
        prev = s.step(model_output, timestep, sample, generator=generator)
        self._done += 1
        return FusedSchedulerOutput(prev, lambda: self._x0(s, run, k, model_output, sample))

    def _x0(self, s, run, k, model_output, sample):
        """The data estimate of call k (what diffusers returns as pred_original_sample)."""
        m = model_output.sample if hasattr(model_output, "sample") else model_output
        if m.shape[1] == 2 * sample.shape[1]:
            m = m[:, :sample.shape[1]]
        a, sg = run.alpha[k], run.sigma[k]
        (px, pm), _ = data_eps(s.prediction_type, a, sg)
        if run.sigma_space:
            px = px * a
        x0 = float(px) * sample + float(pm) * m.to(sample.dtype)
        clamp = s.clamp
        if clamp is None:
            return x0
        if clamp.kind == "clip":
            return x0.clamp(-clamp.value, clamp.value)
        q = torch.quantile(x0.abs().reshape(x0.shape[0], -1).float(), clamp.ratio, dim=1)
        q = q.clamp(1.0, clamp.value).to(x0.dtype).view((-1,) + (1,) * (x0.dim() - 1))
        return x0.clamp(-q, q) / q

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """``original_samples`` noised to the level of ``timesteps`` (what the replaced class
        gives: alpha x0 + sigma noise, or x0 + sigma / alpha noise for the Euler family).
        With a begin index (img2img, inpainting) the level is that of the current call and
        ``timesteps`` is not read."""
        src = type(self._source)
        if self._run is None or not hasattr(src, "index_for_timestep"):
            # DDIM, DDPM, PNDM: the training table at integer timesteps, on the device.
            return self._source.add_noise(original_samples, noise, timesteps)
        run = self._run
        if self._begin_index is None:
            ts = timesteps.detach().reshape(-1).cpu().double().numpy()
            sched = self.timesteps.detach().cpu().double().numpy()
            idx = []
            for t in ts:
                hit = np.flatnonzero(sched == t)
                if not hit.size:
                    raise ValueError(f"add_noise: timestep {t:g} is not one of this run's timesteps")
                idx.append(hit[1] if hit.size > 1 else hit[0])  # diffusers' choice for repeats
        else:
            step = self.step_index
            idx = [self._begin_index if step is None else step] * timesteps.reshape(-1).shape[0]
        idx = np.asarray(idx)
        a, s = run.alpha[idx], run.sigma[idx]
        if run.sigma_space:
            a, s = np.ones_like(a), s / a
        view = (-1,) + (1,) * (original_samples.dim() - 1)
        a = torch.from_numpy(a).to(original_samples.device, original_samples.dtype).view(view)
        s = torch.from_numpy(s).to(original_samples.device, original_samples.dtype).view(view)
        return a * original_samples + s * noise.to(original_samples.dtype)


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
