"""The step-by-step sampler object: a plan (built once on the host) replayed step by step.

    sampler = fastdiff.Sampler("dpm++2m", schedule, steps=20)
    x = sampler.init_noise(torch.randn(shape))          # x_T times init_noise_sigma
    for t in sampler.timesteps:                         # one entry per model call
        out = model(sampler.scale_model_input(x, t), t)
        x = sampler.step(out, t, x)

modelled on diffusers' schedulers (``timesteps``, ``init_noise_sigma``,
``scale_model_input``, ``step``). Each ``step`` is exactly one fused kernel call; the
coefficients of every step are computed in float64 when the sampler is built and moved
to the device once, so a step does no host arithmetic, no host-device transfer and no
synchronisation (except for dynamic thresholding's per-sample quantile, which stays on
the device too).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import numbers
import threading

import numpy as np
import torch

from ..schedules import NoiseSchedule, TimeSharing
from .. import _ops
from .._ops import STEP_HEAD, step_n_basis
from ..step import dense_perm, differentiable_step, inverse_perm
from ..wrappers import model_output
from .core import PREDICTIONS, Clamp, Coeffs, Plan
from .grid import build_grid
from .grid_families import GRID_OPTIONS
from .guidance import rescale_coeffs
from .program import build as build_program
from .registry import SAMPLERS, default_schedule, diffusers_args, family, resolve

__all__ = ["Sampler", "make_generators", "randn", "DEFAULT_STEPS"]

DEFAULT_STEPS = 20
# A step's model time must equal the expected one to within this, relative and absolute
# (Sampler._check_t; the compiled step is given it too).
_T_TOL = 1e-6


def _seed_list(seeds) -> list:
    """Seeds as a list of Python ints in the range torch.Generator.manual_seed takes."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, (bool, np.bool_)):
        seeds = [seeds]
    if isinstance(seeds, (range, np.ndarray)) or (isinstance(seeds, torch.Tensor) and seeds.dim() == 1):
        seeds = [s.item() if isinstance(s, (np.generic, torch.Tensor)) else s for s in seeds]
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise TypeError(f"seeds must be a non-empty sequence of ints, got {type(seeds).__name__}")
    for s in seeds:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"seeds must be ints, got {type(s).__name__}")
        if not -2 ** 63 <= s < 2 ** 64:
            raise ValueError(f"seeds must be in [-2**63, 2**64) (what torch.Generator takes), got {s}")
    return [int(s) for s in seeds]


def make_generators(seeds, device="cpu") -> list:
    """One ``torch.Generator`` per seed (sample i draws all its noise from generator i, so
    it does not depend on the rest of the batch)."""
    return [torch.Generator(device=device).manual_seed(s) for s in _seed_list(seeds)]


def check_generator(generator):
    """``generator`` if it is None, a torch.Generator or a non-empty list of them."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)) and generator and all(
            isinstance(g, torch.Generator) for g in generator):
        return generator
    raise TypeError("generator must be a torch.Generator or a list of them (one per sample; or "
                    f"give seeds=[...]), got {type(generator).__name__}")


def check_guidance(g):
    """A guidance scale as a float (Python and numpy numbers alike), or None."""
    if g is None:
        return None
    if isinstance(g, (bool, np.bool_)) or not isinstance(g, numbers.Real) or not math.isfinite(g):
        raise TypeError(f"guidance_scale must be a finite number, got {g!r}")
    return float(g)


def randn(shape, generator=None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise, drawn like diffusers' ``randn_tensor``: one generator draws
    the whole batch; a list of generators draws one sample each (on the generator's
    device, then moved)."""
    shape = tuple(shape)
    generator = check_generator(generator)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators (seeds) for a batch of {shape[0]}")
        parts = [torch.randn((1,) + shape[1:], generator=g, device=g.device, dtype=dtype)
                 for g in generator]
        return torch.cat(parts).to(device)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _clamp_spec(thresholding, ratio, max_value, clip_sample, clip_range):
    if thresholding:
        if not 0 < ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
        if not max_value >= 1:
            raise ValueError(f"sample_max_value must be >= 1 for dynamic thresholding, got {max_value}")
        return Clamp("dynamic", float(max_value), float(ratio))
    if clip_sample:
        if not clip_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_range}")
        return Clamp("clip", float(clip_range))
    return None


class Sampler:
    """A sampler of ``steps`` steps: the plan (every coefficient, computed once) and, kept
    apart from it, the state of the runs it serves (one per thread for the step API, one
    per ``fastdiff.sample`` call), so it is reusable, usable from several threads at once
    and picklable. ``init_noise`` (or ``reset``) starts a run; a step after its last raises.

    Args:
        sampler: one of :data:`SAMPLERS` (``"ddim"``, ``"dpm++2m"``, ``"unipc"``, ...) or
            another program's name for it (``"DPM++ 2M Karras"``, ``"dpmpp_2m"``,
            ``"k_euler"``: :data:`fastdiff.samplers.registry.ALIASES`).
        schedule: a :class:`fastdiff.schedules.NoiseSchedule` (default: DDPM linear, T=1000;
            ``NoiseSchedule.flow()`` / ``.edm()`` for the flow-matching / EDM samplers).
        steps: number of steps (evaluation points, default 20); Heun and PNDM call the
            model more often, ``len(sampler.timesteps)`` times. diffusers' names
            ``num_inference_steps``, ``use_karras_sigmas`` and ``timestep_spacing`` are
            accepted for ``steps``, ``karras`` and ``spacing``.
        timesteps: explicit model times instead of a spacing, [N] or [B, N] (one grid per
            sample: every coefficient is then computed from that sample's times); descending;
            ``steps`` is then ignored.
        spacing: "leading" / "linspace" / "trailing" (discrete schedules; default as the
            matching diffusers scheduler) or "time_uniform" / "time_quadratic" / "logSNR"
            (continuous schedules).
        steps_offset: added to "leading" timesteps.
        karras: Karras et al. noise levels (diffusers' ``use_karras_sigmas``).
        exponential_sigmas, beta_sigmas, lu_lambdas: other noise-level grids instead of
            the spacing (diffusers' ``use_exponential_sigmas``, ``use_beta_sigmas``,
            ``use_lu_lambdas``; at most one of these and ``karras``).
        final_sigmas_type: "zero" or "sigma_min" (the default depends on the sampler, as
            in diffusers).
        prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample".
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic
            thresholding of the data estimate (per-sample quantile, on the device).
        clip_sample, clip_sample_range: clamp the data estimate to [-range, range].
        guidance_scale: classifier-free guidance weight w (m_u + w (m_c - m_u)), used when
            ``step`` gets ``model_out_cond``.
        guidance_rescale: phi of Lin et al.'s guidance rescale (diffusers' name), in
            [0, 1]: the guided output is rescaled per sample to the conditional output's
            std and mixed ``phi * rescaled + (1 - phi) * guided``, folded into the step's
            coefficients (``fastdiff.samplers.guidance``). 0: off.
        time_sharing: a :class:`fastdiff.TimeSharing`: the network's time input is f(t)
            (E-TSDM); the update keeps the true schedule. Used by :meth:`model_time`.
        generator, seeds: noise source of stochastic samplers (a generator, a list with
            one per sample, or ``seeds`` to make that list).
        sigma_min, sigma_max: Karras range overrides (sigma / alpha units).
        lambda_min_clipped: DPM-Solver's log-SNR clip of the grid.
        diffusers_rule: step DDIM / PNDM from t to t - T // steps as diffusers' DDIM and
            PNDM schedulers do (instead of to the next grid point; the same for
            "leading" spacing). Set by :meth:`from_diffusers`.
        **options: family options, e.g. ``order``, ``solver_type``, ``eta``,
            ``lower_order_final``, ``euler_at_final``, ``variance_type``,
            ``skip_prk_steps``, ``predict_x0``, ``disable_corrector``, ``init_noise_sigma``,
            ``use_clipped_model_output`` (see the family functions in this package).
    """

    def __init__(self, sampler: str = "dpm++2m", schedule: NoiseSchedule | None = None,
                 steps: int | None = None, *, timesteps=None, spacing: str | None = None,
                 steps_offset: int = 0, karras: bool | None = None, final_sigmas_type: str | None = None,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 clip_sample: bool = False, clip_sample_range: float = 1.0,
                 guidance_scale: float | None = None, time_sharing: TimeSharing | None = None,
                 generator=None, seeds=None, sigma_min: float | None = None,
                 sigma_max: float | None = None, lambda_min_clipped: float = -math.inf,
                 diffusers_rule: bool = False, exponential_sigmas: bool = False,
                 beta_sigmas: bool = False, lu_lambdas: bool = False,
                 guidance_rescale: float = 0.0, **options):
        args = {k: v for k, v in locals().items() if k in _INIT_ARGS}
        self._args = (args, dict(options))  # what to_dict and pickling rebuild it from
        self._tails = ()  # tail() starts applied to this configuration, in order
        named = diffusers_args(options, steps=steps, karras=karras, spacing=spacing)
        steps, karras, spacing = named["steps"], named["karras"], named["spacing"]
        sampler, implied = resolve(sampler)
        if "karras" in implied:
            if karras is False:
                raise ValueError(f"the sampler name implies karras=True but karras={karras!r} was given")
            karras = True
        karras = bool(karras)
        if steps is None:
            steps = DEFAULT_STEPS
        fam = family(sampler)
        self.name = sampler
        self.schedule = default_schedule(sampler) if schedule is None else schedule
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction_type!r}")
        if timesteps is not None:
            steps = None  # explicit timesteps define the step count
        if timesteps is None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer))):
            raise TypeError(f"steps must be an int, got {type(steps).__name__}")
        if timesteps is None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        guidance_scale = check_guidance(guidance_scale)
        if time_sharing is not None and not isinstance(time_sharing, TimeSharing):
            raise TypeError(f"time_sharing must be a fastdiff.TimeSharing, got {type(time_sharing).__name__}")
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) \
                or not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if guidance_rescale and guidance_scale is None:
            raise ValueError("guidance_rescale needs guidance_scale (it rescales the guided output)")
        self.guidance_rescale = float(guidance_rescale)
        opts = {**fam.fixed, **options}
        grid_opts = {k: opts.pop(k) for k in GRID_OPTIONS if k in opts}  # e.g. flow matching's mu
        params = inspect.signature(fam.plan).parameters
        unknown = sorted(set(opts) - set(params) - {"pred", "clamp"})
        if unknown:
            valid = sorted(k for k in params if k not in ("grid", "pred", "clamp"))
            raise TypeError(f"sampler {sampler!r} got unknown option(s) {unknown}; its options: {valid}")
        self.prediction_type = prediction_type
        self._options = opts
        self.clamp = _clamp_spec(thresholding, dynamic_thresholding_ratio, sample_max_value,
                                 clip_sample, clip_sample_range)
        self.grid = build_grid(
            self.schedule, steps, flavor=fam.flavor, timesteps=timesteps, spacing=spacing,
            steps_offset=steps_offset, karras=karras, final=final_sigmas_type or fam.final,
            karras_t=fam.karras_t, karras_range=fam.karras_range, sigma_min=sigma_min,
            sigma_max=sigma_max, lambda_min_clipped=lambda_min_clipped, rule=diffusers_rule,
            sigma_kind=_sigma_kind(exponential_sigmas, beta_sigmas, lu_lambdas), flow=fam.flow, **grid_opts)
        with np.errstate(all="ignore"):  # non-finite coefficients are refused in _finalize
            self.plan: Plan = fam.plan(self.grid, pred=prediction_type, clamp=self.clamp, **opts)
        self.grid = self.plan.grid or self.grid
        self.guidance_scale = guidance_scale
        self.time_sharing = time_sharing
        self._seeds = None if seeds is None else _seed_list(seeds)
        self.generator = make_generators(self._seeds) if seeds is not None else check_generator(generator)
        self._seed_gens = self.generator if seeds is not None else None
        self.steps = self.grid.n
        self._finalize()

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, scheduler, steps: int | None = None, **overrides) -> "Sampler":
        """The fused equivalent of a diffusers scheduler instance (DDIM, DDPM, PNDM,
        DPMSolverMultistep/Singlestep, UniPC, Euler, EulerAncestral, Heun, LMS, DEIS,
        SASolver, KDPM2, KDPM2Ancestral, DPMSolverSDE, IPNDM, CosineDPMSolverMultistep;
        ``fastdiff.samplers.from_diffusers.SUPPORTED``), reading its config; an option it
        cannot honour raises ValueError naming it. ``steps`` (or ``num_inference_steps``):
        the scheduler's number of inference steps; ``overrides``: Sampler arguments that
        replace what the config gives."""
        from .from_diffusers import sampler_args
        named = diffusers_args(overrides, steps=steps, karras=overrides.pop("karras", None),
                               spacing=overrides.pop("spacing", None))
        if named["steps"] is None and overrides.get("timesteps") is not None:
            named["steps"] = DEFAULT_STEPS  # unused: explicit timesteps define the run
        name, kwargs = sampler_args(scheduler, named.pop("steps"))
        kwargs.update(overrides, **{k: v for k, v in named.items() if v is not None})
        return cls(name, **kwargs)

    # -- saving ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The configuration as a JSON-safe dict (only what differs from the defaults):
        ``Sampler.from_dict(d)`` builds an equal Sampler, with the same coefficients and,
        from the same seeds, the same samples.

        The noise source is saved as ``seeds`` (the seeds the Sampler was built with, so
        a rebuilt one starts their streams afresh); a Sampler drawing from a
        ``torch.Generator`` cannot be saved this way (ValueError; pickle it instead).
        """
        d = {"format": 1, **self._portable()}
        if self.generator is not None:
            if self._seed_gens is None or self.generator is not self._seed_gens:
                raise ValueError("Sampler.to_dict: the sampler draws its noise from a torch.Generator, "
                                 "which a JSON config cannot hold; build it with seeds=[...] instead "
                                 "(or pickle it: pickling keeps the generator's state)")
            d["seeds"] = list(self._seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sampler":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict):
            raise TypeError(f"Sampler.from_dict expects a dict, got {type(d).__name__}")
        if d.get("format") != 1 or "sampler" not in d:
            raise ValueError("Sampler.from_dict: not a Sampler config (needs format 1 and 'sampler'); "
                             f"got keys {sorted(d)}")
        kw = {k: v for k, v in d.items() if k not in ("format", "options", "tail")}
        unknown = sorted(set(kw) - set(_INIT_ARGS))
        if unknown:
            raise ValueError(f"Sampler.from_dict: unknown keys {unknown}")
        if kw.get("schedule") is not None:
            kw["schedule"] = NoiseSchedule.from_dict(kw["schedule"])
        if kw.get("time_sharing") is not None:
            ts = kw["time_sharing"]
            if not isinstance(ts, dict) or set(ts) != {"t_tilde", "n"}:
                raise ValueError(f"Sampler.from_dict: time_sharing must be {{'t_tilde', 'n'}}, got {ts!r}")
            kw["time_sharing"] = TimeSharing(**ts)
        options = d.get("options", {})
        if not isinstance(options, dict):
            raise ValueError(f"Sampler.from_dict: options must be a dict, got {type(options).__name__}")
        return cls(**kw, **options)._tailed(d.get("tail", ()))

    def _tailed(self, starts):
        s = self
        for start in starts:
            s = s.tail(start)
        return s

    def _portable(self) -> dict:
        """to_dict without the noise source."""
        args, options = self._args
        defaults = _init_defaults()
        d = {"sampler": self.name}
        for k, v in args.items():
            if k in ("sampler", "generator", "seeds") or (k in defaults and _same(v, defaults[k])):
                continue
            d[k] = _to_json(k, v)
        if options:
            d["options"] = {k: _to_json(k, v) for k, v in options.items()}
        if self._tails:
            d["tail"] = list(self._tails)
        return d

    def __eq__(self, other):
        """Same configuration and the same noise source (the same seeds, or the same
        generator objects)."""
        if not isinstance(other, Sampler):
            return NotImplemented
        if self._portable() != other._portable():
            return False
        if self._seed_gens is not None and self.generator is self._seed_gens:
            return other._seed_gens is not None and other.generator is other._seed_gens \
                and self._seeds == other._seeds
        return self.generator is other.generator

    __hash__ = None

    def __getstate__(self):
        # The plan holds closures over the schedule; the arguments rebuild it exactly. The
        # noise source is kept as it is now (generators pickle their state), and so is this
        # thread's run in progress (its step index and history), so a copy made mid-run
        # (copy.deepcopy, pickle) continues it: diffusers pipelines copy their scheduler.
        args, options = self._args
        args = dict(args)
        if self._seed_gens is None or self.generator is not self._seed_gens:
            args.update(generator=self.generator, seeds=None)
        state = {"args": args, "options": options, "tails": self._tails}
        if self._seed_gens is not None and self.generator is self._seed_gens:
            state["seed_gens"] = self.generator  # the seeds' streams, where they are now
        run = getattr(self._local, "run", None) or self.__dict__.get("_carried")
        if run is not None and run.k > 0:
            state["run"] = self._run_state(run)
        return state

    def __setstate__(self, state):
        self.__init__(**state["args"], **state["options"])
        if state.get("tails"):  # copy.copy (tail() itself) comes here too, without tails
            self.__dict__.update(self._tailed(state["tails"]).__dict__)
        if "seed_gens" in state:
            self.generator = self._seed_gens = state["seed_gens"]
        if "run" in state:
            # The copy's run is that of the first thread that uses the copy (the copy may
            # be made in one thread and stepped in another, as a server hands it on).
            r = state["run"]
            run = self._carried = _Run(r["donating"])
            run.k, run.store, run.owned = r["k"], dict(r["store"]), set(r["owned"])
            run.grad, run.brownian = r["grad"], r["brownian"]

    def __copy__(self):
        # A shallow copy would share the run's history tensors, which the run overwrites
        # in place: it starts a new run instead (as tail() wants).
        state = self.__getstate__()
        state.pop("run", None)
        new = type(self).__new__(type(self))
        new.__setstate__(state)
        return new

    def _run_state(self, run):
        """A run's state by names (its history tensors, which of them it may overwrite),
        also while the compiled step holds them; the folded next model input is left out
        (remade from the state at the next step)."""
        store, owned = run.store, run.owned
        if run.k >= self._n_calls:  # finished: its next step says so, no history needed
            store, owned = {}, set()
        elif run.prog is not None:
            store, owned = self._named(run)
        return {"k": run.k, "store": store, "owned": owned, "grad": run.grad,
                "brownian": run.brownian, "donating": run.donating}

    def _finalize(self):
        calls = self.plan.calls
        if not calls:
            raise ValueError("the plan has no steps")
        # Outputs nobody reads are not written; the next model input is folded in.
        reads = {}
        for k, call in enumerate(calls):
            for name in tuple(call.op.history) + ((call.op.x_base,) if call.op.x_base else ()):
                reads[name] = k
        for k, call in enumerate(calls):
            op = call.op
            keep = [o for o, name in enumerate(op.outputs) if name == "x" or reads.get(name, -1) > k]
            if len(keep) < len(op.outputs):
                op.coeffs = op.coeffs.select_outputs(keep)
                op.outputs = tuple(op.outputs[o] for o in keep)
            if k + 1 < len(calls) and calls[k + 1].c_in is not None:
                op.coeffs = op.coeffs.with_output(op.outputs.index("x"), calls[k + 1].c_in)
                op.outputs = op.outputs + ("x_in",)
            if self.guidance_scale is not None:
                op.coeffs.guidance(float(self.guidance_scale))
            if not torch.isfinite(op.coeffs.data).all():
                raise ValueError(f"sampler {self.name!r}: step {k} has non-finite coefficients; the grid "
                                 "reaches a level where this sampler / prediction type is undefined "
                                 "(e.g. sigma = 0 or alpha = 0); change final_sigmas_type or the timesteps")
        if self.plan.init_scale is not None and not np.isfinite(self.plan.init_scale).all():
            raise ValueError(f"sampler {self.name!r}: the initial noise scale is not finite "
                             "(alpha = 0 at the first timestep); use v_prediction with a first "
                             "timestep below T - 1")
        self._drop = [[] for _ in calls]
        for name, k in reads.items():
            self._drop[k].append(name)
        # What step() needs of each call, looked up once: (op, n_out, index of the new
        # state, index of the next model input or -1, (index, name) of the stored outputs).
        self._runs = [(c.op, len(c.op.outputs), c.op.outputs.index("x"),
                       c.op.outputs.index("x_in") if "x_in" in c.op.outputs else -1,
                       tuple((o, n) for o, n in enumerate(c.op.outputs) if n not in ("x", "x_in")))
                      for c in calls]
        self._n_calls = len(calls)
        self._kept = {c.op.keep_x for c in calls if c.op.keep_x is not None}
        self._calls_t = np.stack([c.t for c in calls])  # [n_calls, R]
        self._tables = {}
        self._local = threading.local()
        # Steps whose coefficients change at run time (per-sample thresholding, guidance
        # rescale) keep the general step.
        self._programs = {} if self.guidance_rescale == 0 and not any(
            c.op.clamp and self.clamp.kind == "dynamic" for c in calls) else None

    def _program(self, owned: bool):
        """The prepared run (``fastdiff.samplers.program``) for owned or shown states."""
        prog = self._programs.get(owned)
        if prog is None:
            prog = self._programs[owned] = build_program(self.plan.calls, self._drop, owned)
        return prog

    # -- description -------------------------------------------------------------------

    @property
    def timesteps(self) -> torch.Tensor:
        """Model time of every model call: [n_calls] (or [n_calls, B] for per-sample
        grids); int64 for integer timesteps, else float32."""
        t = torch.from_numpy(self._calls_t)
        t = t.long() if self.grid.t_integer else t.float()
        return t[:, 0] if t.shape[1] == 1 else t

    def __len__(self) -> int:
        return len(self.plan.calls)

    @property
    def init_noise_sigma(self):
        """Factor from unit-variance noise to the initial state (1 for VP samplers)."""
        s = self.plan.init_scale
        if s is None:
            return 1.0
        return float(s[0]) if s.shape[0] == 1 else torch.from_numpy(s)

    @property
    def stochastic(self) -> bool:
        return any(c.op.noise for c in self.plan.calls)

    @property
    def step_index(self) -> int:
        """Index of the next model call of this thread's run (0 .. len(self); len(self)
        once the run is finished)."""
        return self._run.k

    def __repr__(self):
        return (f"Sampler({self.name!r}, steps={self.steps}, calls={len(self)}, "
                f"prediction_type={self.prediction_type!r}, schedule={self.schedule!r})")

    # -- starting mid-schedule (img2img, inpainting) -------------------------------------

    def tail(self, start: int) -> "Sampler":
        """A new sampler for the rest of this run from grid point ``start`` (0 <= start <
        steps): the same noise levels and options, but a fresh run: multistep samplers
        warm up again from first order, as diffusers' multistep schedulers do when a
        pipeline starts them mid-schedule."""
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start < self.steps:
            raise ValueError(f"start must be an int in [0, {self.steps}), got {start!r}")
        g = self.grid
        sub = copy.copy(self)
        sub.grid = dataclasses.replace(g, t=g.t[:, start:], alpha=g.alpha[:, start:],
                                       sigma=g.sigma[:, start:], t_end=g.t_end)
        with np.errstate(all="ignore"):
            sub.plan = family(self.name).plan(sub.grid, pred=self.prediction_type, clamp=self.clamp,
                                              **self._options)
        sub.grid = sub.plan.grid or sub.grid
        sub.steps = sub.grid.n
        sub._finalize()
        sub._tails = self._tails + (int(start),)
        return sub

    def begin_at(self, k: int, like: torch.Tensor):
        """Start a new run at model call ``k`` of this plan instead of 0, as if the calls
        before it had output zeros: the history they would have left is zeros shaped like
        ``like`` (how diffusers' LMS and stateless schedulers behave after
        ``set_begin_index``; samplers whose later steps start from a kept state cannot
        begin there and raise ValueError)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < len(self):
            raise ValueError(f"k must be an int in [0, {len(self)}), got {k!r}")
        calls = self.plan.calls
        before = {n for c in calls[:k] for n in c.op.outputs} | {c.op.keep_x for c in calls[:k]}
        run = _Run()
        for c in calls[k:]:
            if c.op.x_base is not None and c.op.x_base in before:
                raise ValueError(f"sampler {self.name!r} cannot begin at call {k}: a later step "
                                 "starts from a state kept before it")
            for name in c.op.history:
                if name in before and name not in run.store:
                    run.store[name] = torch.zeros_like(like, memory_format=torch.contiguous_format)
                    run.owned.add(name)
        run.k = int(k)
        self._local.run = run

    # -- the loop ------------------------------------------------------------------------
    # Nothing above is written after construction. What one run changes (the step index,
    # the history, the folded model input) lives in a _Run: one per thread for the step
    # API, one per call of fastdiff.sample. So one Sampler serves concurrent runs.

    @property
    def _run(self) -> "_Run":
        run = getattr(self._local, "run", None)
        if run is None:
            # (dict.pop is atomic: one thread takes a copy's carried run, see __setstate__)
            run = self._local.run = self.__dict__.pop("_carried", None) or _Run()
        return run

    def reset(self):
        """Forget the history; the next ``step`` is the first of a new run (runs are per
        thread: other threads' runs are not affected)."""
        self._local.run = _Run()

    def init_noise(self, x_T: torch.Tensor) -> torch.Tensor:
        """The initial state from unit-variance noise x_T [B, ...] (x_T itself for VP
        samplers, ``x_T * init_noise_sigma`` for the Euler family). Starts a new run."""
        self.reset()
        return self._init_noise(x_T, self._run)

    def _init_noise(self, x_T, run=None):
        """The initial state; with ``run``, the state and its first model input
        ``c_in x`` are made in one pass of the fused op, into the op's recycled memory
        (as every later state and model input of the run), and the run's folded model
        input is set."""
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise TypeError(f"x_T must be a floating-point tensor, got "
                            f"{x_T.dtype if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
        self._check_rows(x_T)
        s = self.plan.init_scale
        if s is None:
            return x_T
        if run is None or x_T.dtype not in _STEP_DTYPES or x_T.device.type == "meta" \
                or torch.compiler.is_compiling() or (torch.is_grad_enabled() and x_T.requires_grad):
            return x_T * self._rows(torch.from_numpy(s).to(x_T.device, x_T.dtype), x_T)
        coeffs = self._init_table(x_T.device, x_T.dtype)
        n_out = (coeffs.shape[1] - STEP_HEAD) // step_n_basis(0)
        perm = None if x_T.is_contiguous() else dense_perm(x_T)
        v = x_T if perm is None else x_T.permute(perm)  # channels_last stays channels_last
        outs = _ops.resolve("sampler_step", x_T.device)(v, None, v, None, [], None, coeffs, False, n_out)
        if perm is not None:
            outs = [o.permute(inverse_perm(perm)) for o in outs]
        if len(outs) > 1:
            run.x_in = _folded(outs[0], outs[1])
        return outs[0]

    def scale_model_input(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """The model input for the next call: x itself for VP samplers; ``c_in * x`` for
        the Euler family (already computed by the previous fused step when x is its
        output, unchanged since, so this is free; an x edited in place or replaced, as
        inpainting does, is scaled afresh)."""
        return self._model_input(self._run, x, trusted=False)

    def _model_input(self, run, x, trusted, compiling=None):
        """``trusted``: the caller knows x was not edited since the step that made it (a
        loop that shows x to nobody), which saves the check inference tensors cannot make.
        ``compiling``: whether the loop is being traced, when the caller knows it for the
        whole loop (asking costs ~10 us per step right after a model call)."""
        if run.k >= self._n_calls:
            self._finished()
        owner, x_in, version = run.x_in
        # A traced loop cannot read version counters (and an in-place edit keeps x's
        # identity there): compiled, the model input is always c_in x, which the compiler
        # fuses into its neighbours.
        if owner is x and not (torch.compiler.is_compiling() if compiling is None else compiling) \
                and (trusted or (version is not None and x._version == version)):
            return x_in
        c_in = self.plan.calls[run.k].c_in
        if c_in is None:
            return x
        return x * self._c_in(x.device, x.dtype)[run.k].view(_bview(x))

    def model_time(self, batch: int, device=None, doubled: bool = False) -> torch.Tensor:
        """The network's time input for the next call: [batch] (or [2 * batch] for a CFG
        batch), int64 or float32, with ``time_sharing`` applied."""
        return self._model_time(self._run, batch, device, doubled)

    def _model_time(self, run, batch, device, doubled):
        if run.k >= self._n_calls:
            self._finished()
        key = ("t", device, batch, doubled)  # every call's input, built once per form
        rows = self._tables.get(key)
        if rows is None:
            batch = _count("batch", batch)
            tab = self._time_table(torch.device(device or "cpu"))
            if tab.shape[1] not in (1, batch):
                raise ValueError(f"per-sample timesteps have {tab.shape[1]} rows, batch is {batch}")
            tab = tab.expand(-1, batch)
            rows = self._tables[key] = list(torch.cat([tab, tab], 1) if doubled else tab)
        return rows[run.k]

    def step(self, model_out: torch.Tensor, t, x: torch.Tensor, *,
             model_out_cond: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator=None, donate: bool = False) -> torch.Tensor:
        """One sampler update from the model output at the current call; returns the next
        state. ``model_out``: the model's output for ``scale_model_input(x)`` (with CFG, the
        unconditional one, and ``model_out_cond`` the conditional one). ``t``: the model
        time of this call, a number or a [1] / [B] tensor (its values are checked when it
        is on the CPU). ``noise``: explicit standard-normal noise for stochastic samplers
        (else drawn from ``generator`` or the sampler's generator). A step after the last
        one of the run raises: start a new run with ``init_noise`` or ``reset``.

        The new state has x's memory layout (channels_last stays channels_last). It is
        differentiable (with respect to x, the model outputs and the noise) when autograd
        records: the history is then never overwritten.

        ``donate=True`` promises that the caller does not use ``x`` (nor the model input
        ``scale_model_input`` returned for it) after this call: the step may then write
        its results into their memory, in place, instead of new tensors, which saves a
        memory pass per step on CPU (``fastdiff.sample`` donates its own states). The
        sampler's internal history is always updated in place once no later step reads it.
        """
        run = getattr(self._local, "run", None) or self._run
        return self._step(run, model_out, t, x, model_out_cond, noise, generator, donate)

    def _step(self, run, model_out, t, x, model_out_cond=None, noise=None, generator=None,
              donate=False):
        if run.prog is not None:
            new = run.prog.step(x, model_out, model_out_cond, t, noise, donate)
            if isinstance(new, torch.Tensor):
                return new
            new = self._fast_step(run, model_out, t, x, model_out_cond, noise, generator, donate, new)
            if new is not None:
                return new
        k = run.k
        if k >= self._n_calls:
            self._finished()
        op, n_out, x_at, x_in_at, stored = self._runs[k]
        if not isinstance(x, torch.Tensor) or x.dtype not in _STEP_DTYPES:
            raise TypeError(f"x must be a float32/float16/bfloat16/float64 tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        model_out = _prediction(model_out, x, "model_out")
        if model_out_cond is not None:
            model_out_cond = _prediction(model_out_cond, x, "model_out_cond")
            if self.guidance_scale is None:
                raise ValueError("model_out_cond given but the sampler has no guidance_scale")
        self._check_rows(x)
        if t is not None and not torch.compiler.is_compiling():
            # (a traced step cannot read t's value; the compiled loop is the eager one's)
            self._check_t(t, k, x.shape[0])
        if not run.tried and self._programs is not None and x.is_contiguous() \
                and x.device.type != "meta" and not torch.compiler.is_compiling() and not (
                    torch.is_grad_enabled() and _needs_grad(x, model_out, model_out_cond, noise)):
            # Checked in full above; from here on the run follows its prepared form (once
            # per run: a run that left it keeps the general step).
            run.tried = True
            if self._enter_program(run, x, donate or run.donating):
                new = self._fast_step(run, model_out, None, x, model_out_cond, noise, generator, donate)
                if new is not None:
                    return new
        device = x.device
        coeffs = self._table(device, x.dtype)["coeffs"][k]
        if model_out_cond is not None and self.guidance_rescale:
            coeffs = rescale_coeffs(coeffs, model_out, model_out_cond, self.guidance_rescale)
        if op.clamp and self.clamp.kind == "dynamic":
            coeffs = self._threshold(coeffs, x, model_out, model_out_cond)
        z = None
        if op.noise:
            z = self._noise(x, noise, generator) if op.brownian is None or noise is not None \
                else self._brownian_noise(run, x, op, generator)
        store = run.store
        grad = torch.is_grad_enabled() and (
            run.grad or x.requires_grad or model_out.requires_grad or coeffs.requires_grad
            or (model_out_cond is not None and model_out_cond.requires_grad)
            or (z is not None and z.requires_grad))
        donate = donate and not grad
        if op.keep_x is not None:
            store[op.keep_x] = x
            if donate:
                run.owned.add(op.keep_x)
        hist = [store[n] for n in op.history]
        x_base = store[op.x_base] if op.x_base is not None else None
        perm = None if x.is_contiguous() else dense_perm(x)
        if perm is None:
            kx, kb, km, kc, kh, kz = x, x_base, model_out, model_out_cond, hist, z
        else:  # the kernel runs in x's memory order, on views, and its outputs keep it
            kx, kb, km, kc, kz = (None if a is None else a.permute(perm)
                                  for a in (x, x_base, model_out, model_out_cond, z))
            kh = [h.permute(perm) for h in hist]
        args = (kx, kb, km, kc, kh, kz, coeffs, op.clamp)
        out = None if grad else self._reuse(run, op, k, x, donate, n_out, perm, (km, kc, kz))
        if grad:
            run.grad = True
            outs = differentiable_step(_ops.resolve("sampler_step", device), *args, n_out)
        elif out is None:
            outs = _ops.resolve("sampler_step", device)(*args, n_out)
        else:
            outs = [o if o is not None else torch.empty_like(kx, memory_format=torch.contiguous_format)
                    for o in out]
            _ops.resolve("sampler_step.out", device)(*args, out=outs)
        if perm is not None:
            inv = inverse_perm(perm)
            outs = [o.permute(inv) for o in outs]
        new = outs[x_at]
        if x_in_at >= 0:
            run.x_in = _folded(new, outs[x_in_at])
        for o, name in stored:
            store[name] = outs[o]
            if not grad:  # a graph may have saved it: never overwrite it then
                run.owned.add(name)
        for name in self._drop[k]:
            store.pop(name, None)
            run.owned.discard(name)
        run.k += 1
        return new

    def _enter_program(self, run, x, owned):
        """Make the run follow the prepared form for owned (or shown) states from its
        current call, taking over its named tensors; False (and nothing changed) when one
        the form would overwrite is not the run's own, or when the step's op is not a
        compiled kernel (the reference backend keeps the general step)."""
        owned = bool(owned)
        program = self._compiled(owned, x.device, x.dtype)
        if program is None:
            return False
        recipes, internal = self._program(owned)
        names = recipes[run.k].names
        if {n for n, _, _ in names} != set(run.store) or any(
                own and n not in run.owned for n, _, own in names):
            return False
        slots = [None] * len(internal)
        for n, slot, _ in names:
            slots[slot] = run.store[n]
        if recipes[run.k].x_owned:  # entered owned from a later call: x is donated to it
            slots[recipes[run.k].x_slot] = x
        run.prog = _ops.extension().StepRun(program, run, slots, x, run.k)
        return True

    def _compiled(self, owned, device, dtype):
        """The prepared form as the compiled extension steps it (csrc/program.cpp), built
        once per form, device, dtype and backend; None without a compiled step op."""
        fn, fn_out = _ops.resolve("sampler_step", device), _ops.resolve("sampler_step.out", device)
        ext = _ops.extension()
        # (a program built before a backend switch leaves its runs at their next step)
        key = ("program", owned, device, dtype, fn, ext and ext._backend_epoch())
        if key not in self._tables:
            for old in [k for k in self._tables if k[0] == "program" and k[5] != key[5]]:
                del self._tables[old]  # built for an earlier backend: never used again
            program = None
            if ext is not None and isinstance(fn, torch._ops.OpOverload) \
                    and isinstance(fn_out, torch._ops.OpOverload) and fn_out._schema.name == fn._schema.name:
                recipes, internal = self._program(owned)
                coeffs = self._table(device, dtype)["coeffs"]
                calls = []
                for k, r in enumerate(recipes):
                    op, n_out, x_at, x_in_at, _ = self._runs[k]
                    want = self._calls_t[k]
                    w = float(want[0]) if self.grid.t_integer else float(np.float32(want[0]))
                    calls.append((r.x_slot, r.x_owned, r.history, r.x_base, r.outs, r.release, x_at,
                                  x_in_at, op.clamp, op.noise, want.shape[0] == 1, w, coeffs[k], n_out))
                program = ext.StepProgram(fn._schema.name, calls, len(internal), owned,
                                          self.guidance_scale is not None, _T_TOL)
            self._tables[key] = program
        return self._tables[key]

    def _fast_step(self, run, model_out, t, x, model_out_cond, noise, generator, donate, code=None):
        """A step of a run that follows its prepared form: one call into the compiled
        run (``run.prog``, csrc/program.cpp), which checks only what can change between
        steps (the first step checked everything) and calls the fused op on the slots.
        What it leaves to Python comes back as a code (``code``: the one the caller got),
        done here before it is called again. None when this step cannot follow the form
        (x replaced by a tensor of another kind, autograd, ...): the run then continues by
        names, nothing of this step done yet."""
        done = set()
        while True:
            new = code if code is not None else run.prog.step(x, model_out, model_out_cond, t, noise, donate)
            code = None
            if isinstance(new, torch.Tensor):
                return new
            if new in done or new == _LEAVE:
                return self._leave_program(run)
            done.add(new)
            if new == _FINISHED:
                self._finished()
            elif new == _SWITCH:
                # The caller starts donating its states (or keeps one): the other form.
                owned = not run.prog.owned
                self._leave_program(run)
                if not self._enter_program(run, x, owned):
                    return None
            elif new == _PREPARE:
                model_out = _prediction(model_out, x, "model_out").contiguous()
                if model_out_cond is not None:
                    model_out_cond = _prediction(model_out_cond, x, "model_out_cond").contiguous()
                    if self.guidance_scale is None:
                        raise ValueError("model_out_cond given but the sampler has no guidance_scale")
            elif new == _CHECK_T:
                self._check_t(t, run.k, x.shape[0])
                t = None
            elif new == _NOISE:
                op = self._runs[run.k][0]
                noise = self._noise(x, noise, generator) if op.brownian is None or noise is not None \
                    else self._brownian_noise(run, x, op, generator)
                noise = noise.contiguous()

    def _named(self, run):
        """(store, owned) of a run in the compiled step at its current call: the slots'
        tensors by name, and the names it may overwrite."""
        S = run.prog.slots()
        names = self._program(run.prog.owned)[0][run.k].names
        return {n: S[s] for n, s, _ in names}, {n for n, _, internal in names if internal}

    def _leave_program(self, run):
        """Continue the run by names (the general step) from the current call."""
        run.store, run.owned = self._named(run)
        run.prog = None
        return None

    def _reuse(self, run, op, k, x, donate, n, perm, inputs):
        """Memory for call k's outputs that nothing reads after it: the donated state x
        (unless it is kept as history), the donated model input of this call, and the
        sampler's own history tensors whose last reader is this call, in the kernel's
        layout (``perm``). Of those the caller or the model has seen (x, the model input,
        kept states), not one that a model output or the noise (``inputs``) overlaps other
        than exactly: a model may return a view of its input. A list with one tensor or
        None (allocate) per output, or None when there is nothing to reuse."""
        store = run.store
        pool = []  # (tensor, seen outside)
        if donate and op.keep_x is None and all(x is not t for t in store.values()):
            pool.append((x, True))
        for name in self._drop[k]:
            t = store.get(name)
            if name in run.owned and t is not None and all(t is not p for p, _ in pool):
                pool.append((t, name in self._kept))
        owner, x_in, _ = run.x_in
        if donate and owner is x and x_in is not x:
            pool.append((x_in, True))
        if not pool:
            return None
        if perm is not None:
            pool = [(t.permute(perm), seen) for t, seen in pool]
        spans = None
        bufs = []
        for t, seen in pool:
            if not t.is_contiguous():
                continue
            if seen:
                if spans is None:  # every tensor here has x's shape and dtype: x.nbytes
                    nbytes = x.nbytes
                    spans = [_span(i, nbytes) for i in inputs if i is not None]
                lo = t.data_ptr()
                if any(a < lo + nbytes and lo < b and not (exact and a == lo) for a, b, exact in spans):
                    continue
            bufs.append(t)
        if not bufs:
            return None
        return (bufs + [None] * n)[:n]

    def _finished(self):
        raise ValueError(f"sampler {self.name!r}: the run is finished (all {self._n_calls} model "
                         "calls were stepped); start a new one with init_noise(x_T) or reset()")

    # -- helpers -------------------------------------------------------------------------

    def coeffs(self, k: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """The coefficient matrix of call k on ``device`` for samples of ``dtype``."""
        return self._table(torch.device(device), dtype)["coeffs"][k]

    def _table(self, device, dtype):
        """Coefficients of every call (and model-input scales) on the device, built on
        first use: one host-to-device copy for the whole run."""
        key = (device, dtype)
        tab = self._tables.get(key)
        if tab is None:
            # Calls of one matrix shape are stacked and rounded on the host (numpy rounds
            # float64 -> float32 to nearest, as torch does), copied in one go and unbound:
            # a few tensor ops in all, not a few per call (this runs in the first step).
            acc = np.float64 if dtype == torch.float64 else np.float32
            mats = [c.op.coeffs.array for c in self.plan.calls]
            coeffs = [None] * len(mats)
            for shape in {m.shape for m in mats}:
                idx = [k for k, m in enumerate(mats) if m.shape == shape]
                block = torch.from_numpy(np.stack([mats[k] for k in idx]).astype(acc)).to(device)
                for k, c in zip(idx, block.unbind(0)):
                    coeffs[k] = c
            tab = {"coeffs": coeffs}
            if any(c.c_in is not None for c in self.plan.calls):
                # (built with the coefficients, not when first read: a compiled loop must
                # find the tables as the eager one left them)
                c_in = np.stack([np.ones(self.grid.rows) if c.c_in is None else c.c_in
                                 for c in self.plan.calls])
                tab["c_in"] = torch.from_numpy(c_in).to(device=device, dtype=dtype)
            self._tables[key] = tab
        return tab

    def _init_table(self, device, dtype):
        """Coefficients of the fused pass that starts a run from x_T: output 0 the state
        ``init_scale x_T``, output 1 (when the first call scales its input) the first
        model input ``c_in init_scale x_T`` (the op's d term is zero)."""
        key = ("init", device, dtype)
        coeffs = self._tables.get(key)
        if coeffs is None:
            s, c_in = self.plan.init_scale, self.plan.calls[0].c_in
            c = Coeffs(len(s), 1 if c_in is None else 2)
            c.out(0, x=s)
            if c_in is not None:
                c.out(1, x=s * c_in)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            coeffs = self._tables[key] = c.tensor(acc, device)
        return coeffs

    def prepare(self, device="cpu", dtype=torch.float32, batch: int | None = None) -> "Sampler":
        """Build now what the first run on ``device`` for samples of ``dtype`` would
        build at its first step: every call's coefficients on the device (one copy), the
        prepared runs (``fastdiff.samplers.program``), the start and input scales, and
        with ``batch`` the network time inputs for that batch (plain and CFG-doubled).
        Like diffusers' ``set_timesteps(device=...)``; optional (the first step does it
        otherwise). Returns the Sampler."""
        device = torch.device(device)
        if dtype not in _STEP_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in _STEP_DTYPES]}, got {dtype}")
        self._table(device, dtype)
        if self._programs is not None:
            self._program(True)
            self._program(False)
        if self.plan.init_scale is not None:
            self._init_table(device, dtype)
        if batch is not None:
            run = _Run()
            for doubled in (False, True):
                self._model_time(run, batch, device, doubled)
        return self

    def _c_in(self, device, dtype):
        """Model-input scales of every call, [n_calls, R] (only needed when the previous
        step's folded model input cannot be used)."""
        return self._table(device, dtype)["c_in"]

    def _time_table(self, device):
        """Network time inputs of every call, [n_calls, R], time sharing applied."""
        tab = self._tables.get(("t", device))
        if tab is None:
            t = self.timesteps.reshape(len(self), -1)
            if self.time_sharing is not None:
                t = self.time_sharing(t)
            tab = self._tables[("t", device)] = t.to(device)
        return tab

    def _rows(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.view(_bview(x))  # [R] -> [R, 1, ...]; R = 1 broadcasts over the batch

    def _check_rows(self, x):
        R = self.grid.rows
        if R > 1 and x.shape[0] != R:
            raise ValueError(f"the sampler has per-sample timesteps for {R} samples, x has batch "
                             f"{x.shape[0]}")

    def _check_t(self, t, k, batch):
        # The compiled step (csrc/program.cpp, Run::check_t) makes the common case of this
        # check itself (given _T_TOL) and hands every other case to this one.
        want = self._calls_t[k]
        if isinstance(t, torch.Tensor):
            if t.dim() > 1 or t.numel() not in (1, batch):
                raise ValueError(f"t must be a number or a [1] or [{batch}] tensor (the batch), got "
                                 f"shape {tuple(t.shape)}")
            if t.device.type != "cpu":
                return  # comparing would synchronise with the device
            if t.numel() == 1 and want.shape[0] == 1:  # the common case, without numpy's
                w = float(want[0])                     # allclose (~20 us per step)
                w = w if self.grid.t_integer else float(np.float32(w))
                if abs(float(t) - w) <= _T_TOL * (1.0 + abs(w)):
                    return
            t = t.detach().double().reshape(-1).numpy()
        elif isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, (bool, np.bool_)):
            t = np.array([float(t)])
        else:
            raise TypeError(f"t must be a number or a tensor, got {type(t).__name__}")
        if not np.allclose(t, want if self.grid.t_integer else want.astype(np.float32), rtol=_T_TOL, atol=_T_TOL):
            raise ValueError(f"step {k} expects model time {want.tolist() if want.size < 5 else want[:4].tolist()}"
                             f", got {t.tolist() if t.size < 5 else t[:4].tolist()}: call step once per entry "
                             "of sampler.timesteps, in order (or reset())")

    def _noise(self, x, noise, generator):
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
                raise ValueError(f"noise must be a tensor of x's shape {tuple(x.shape)}")
            return noise.to(device=x.device, dtype=x.dtype)
        g = generator if generator is not None else self.generator
        return randn(x.shape, g, x.device, x.dtype)

    def _brownian_noise(self, run, x, op, generator):
        """The standardised Brownian increment of this op (``fastdiff.samplers.brownian``).
        The paths' seeds: the plan's own seed (one path for the batch), else one seed drawn
        from each generator (a list, e.g. from ``seeds=``: one path per sample), else the
        generators' initial seeds when the plan asks for them (diffusers' cosine DPM-Solver)."""
        from .brownian import BrownianNoise
        if run.brownian is None:
            lo, hi, seed = self.plan.brownian
            g = generator if generator is not None else self.generator
            if seed == "generator":  # the generators' own seeds, as diffusers' cosine DPM-Solver
                if g is None:
                    seeds = int(torch.randint(0, 2 ** 63 - 1, ()))
                else:
                    seeds = [int(gi.initial_seed()) for gi in g] if isinstance(g, (list, tuple)) \
                        else int(g.initial_seed())
            elif seed is not None:
                seeds = int(seed)
            elif isinstance(g, (list, tuple)):
                seeds = [int(torch.randint(0, 2 ** 63 - 1, (), generator=gi)) for gi in g]
            else:
                seeds = int(torch.randint(0, 2 ** 63 - 1, (), generator=g))
            if self.grid.rows > 1 and not isinstance(seeds, list):
                raise ValueError("Brownian-tree noise with per-sample timesteps needs one seed per sample "
                                 "(seeds= or a list of generators)")
            run.brownian = BrownianNoise(x, lo, hi, seeds)
        sa, sb = op.brownian
        return run.brownian(sa, sb).to(device=x.device, dtype=x.dtype)

    def _threshold(self, coeffs, x, m, mc):
        """Imagen dynamic thresholding: s = clamp(quantile(|x0|, ratio), 1, max) per sample,
        written into the coefficient columns (clamp limit and divisor), on the device."""
        B = x.shape[0]
        acc = coeffs.dtype
        view = (-1,) + (1,) * (x.dim() - 1)
        mm = m.to(acc)
        if mc is not None:
            mm = mm + coeffs[:, 0].view(view) * (mc.to(acc) - mm)
        x0 = coeffs[:, 1].view(view) * x.to(acc) + coeffs[:, 2].view(view) * mm
        s = torch.quantile(x0.abs().reshape(B, -1), self.clamp.ratio, dim=1)
        s = s.clamp(min=1.0, max=self.clamp.value).to(acc)
        c = coeffs.expand(B, -1).clone()
        c[:, 3] = s
        c[:, 4] = s
        return c


def _sigma_kind(exponential, beta, lu):
    chosen = [k for k, on in (("exponential", exponential), ("beta", beta), ("lu", lu)) if on]
    if len(chosen) > 1:
        raise ValueError(f"choose at most one of exponential_sigmas, beta_sigmas, lu_lambdas; got {chosen}")
    return chosen[0] if chosen else None


# What the compiled step leaves to Python (csrc/program.cpp, enum Code).
_LEAVE, _SWITCH, _PREPARE, _CHECK_T, _NOISE, _FINISHED = 1, 2, 3, 4, 5, 6
_STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _Run:
    """The state of one sampling run: the index of the next model call, the named history
    tensors, which of them the run may overwrite, the folded next model input (with the
    state it belongs to and that state's version counter), whether autograd records, and
    the Brownian paths of the run (made at its first noise draw)."""
    __slots__ = ("k", "store", "owned", "x_in", "grad", "brownian", "prog", "donating", "tried")

    def __init__(self, donating: bool = False):
        self.k = 0
        self.store = {}
        self.owned = set()
        self.x_in = (None, None, None)
        self.grad = False
        self.brownian = None
        # The prepared form, while the run follows it (see Sampler._fast_step): the
        # compiled run holding the slots' tensors (it keeps k and x_in current).
        self.prog = None
        self.donating = donating  # the loop will donate every state it made (fastdiff.sample)
        self.tried = False  # the run was offered the prepared form


def _folded(x, x_in):
    """A run's ``x_in``: the next model input x_in made with state x, valid as long as x
    keeps its version (None for an inference tensor, which has no version counter; the
    compiled step, csrc/program.cpp, makes the same triple)."""
    try:
        version = x._version
    except RuntimeError:
        version = None
    return x, x_in, version


def _needs_grad(x, m, mc, noise):
    """Whether a step's inputs ask autograd to record it (with grad mode on)."""
    return x.requires_grad or getattr(m, "requires_grad", False) or (
        mc is not None and getattr(mc, "requires_grad", False)) or (
        noise is not None and getattr(noise, "requires_grad", False))


def _span(t, nbytes):
    """(first byte, end, whether an output may be exactly t) of an input t: the rule of
    the step op is that an output is an input exactly (contiguous) or shares no memory."""
    if t.is_contiguous():
        b = t.data_ptr()
        return b, b + nbytes, True
    return (*_ops._byte_extent(t), False)


def _count(name, v, low=1):
    """A Python int from an int or numpy integer >= low (bools refused)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return int(v)


_INIT_ARGS = ("sampler", "schedule", "steps", "timesteps", "spacing", "steps_offset", "karras",
              "final_sigmas_type", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
              "sample_max_value", "clip_sample", "clip_sample_range", "guidance_scale",
              "time_sharing", "generator", "seeds", "sigma_min", "sigma_max", "lambda_min_clipped",
              "diffusers_rule", "exponential_sigmas", "beta_sigmas", "lu_lambdas", "guidance_rescale")


def _init_defaults():
    return {k: p.default for k, p in inspect.signature(Sampler.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _same(a, b):
    if isinstance(a, (torch.Tensor, np.ndarray, NoiseSchedule)) or isinstance(b, (torch.Tensor, np.ndarray)):
        return False
    return type(a) is type(b) and a == b


def _to_json(name, v):
    """A Sampler argument as JSON-safe data (schedules and time sharing as dicts)."""
    if isinstance(v, NoiseSchedule):
        return v.to_dict()
    if isinstance(v, TimeSharing):
        return {"t_tilde": v.t_tilde, "n": v.n}
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (list, tuple)):
        return [_to_json(name, e) for e in v]
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"Sampler.to_dict: {name}={v} has no JSON form")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"Sampler.to_dict: {name} of type {type(v).__name__} has no JSON form")


def _bview(x):
    return (-1,) + (1,) * (x.dim() - 1)


def _prediction(out, x, name):
    """The model's prediction as a tensor like x (diffusers outputs unwrapped, learned
    variance channels dropped, cast to x's dtype)."""
    out = model_output(out)
    if out.shape != x.shape:
        if out.dim() >= 2 and out.shape[0] == x.shape[0] and out.shape[1] == 2 * x.shape[1] \
                and out.shape[2:] == x.shape[2:]:
            out = out[:, :x.shape[1]].contiguous()  # learned variance: the first half predicts
        else:
            raise ValueError(f"{name} has shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
    if out.device != x.device:
        raise ValueError(f"{name} is on {out.device}, expected x's device {x.device}")
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out
