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

import numpy as np
import torch

from ..schedules import NoiseSchedule, TimeSharing
from .. import _ops
from ..wrappers import model_output
from .core import PREDICTIONS, Clamp, Plan
from .grid import build_grid
from .grid_families import GRID_OPTIONS
from .guidance import rescale_coeffs
from .registry import SAMPLERS, default_schedule, diffusers_args, family, resolve

__all__ = ["Sampler", "make_generators", "randn", "DEFAULT_STEPS"]

DEFAULT_STEPS = 20


def make_generators(seeds, device="cpu") -> list:
    """One ``torch.Generator`` per seed (sample i draws all its noise from generator i, so
    it does not depend on the rest of the batch)."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = [seeds]
    if isinstance(seeds, (range, np.ndarray)) or (isinstance(seeds, torch.Tensor) and seeds.dim() == 1):
        seeds = [int(s) for s in seeds]
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise TypeError(f"seeds must be a non-empty sequence of ints, got {type(seeds).__name__}")
    gens = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"seeds must be ints, got {type(s).__name__}")
        gens.append(torch.Generator(device=device).manual_seed(int(s)))
    return gens


def randn(shape, generator=None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise, drawn like diffusers' ``randn_tensor``: one generator draws
    the whole batch; a list of generators draws one sample each (on the generator's
    device, then moved)."""
    shape = tuple(shape)
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
    """A sampler for one run of ``steps`` steps (reusable: it restarts after the last step).

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
        if guidance_scale is not None and not (isinstance(guidance_scale, (int, float))
                                               and math.isfinite(guidance_scale)):
            raise TypeError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
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
        self.generator = make_generators(seeds) if seeds is not None else generator
        self.steps = self.grid.n
        self._finalize()
        self.reset()

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
        self._calls_t = np.stack([c.t for c in calls])  # [n_calls, R]
        self._tables = {}

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
        """Index of the next model call (0 .. len(self) - 1)."""
        return self._k

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
        sub.reset()
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
        self.reset()
        for c in calls[k:]:
            if c.op.x_base is not None and c.op.x_base in before:
                raise ValueError(f"sampler {self.name!r} cannot begin at call {k}: a later step "
                                 "starts from a state kept before it")
            for name in c.op.history:
                if name in before and name not in self._store:
                    self._store[name] = torch.zeros_like(like, memory_format=torch.contiguous_format)
                    self._owned.add(name)
        self._k = int(k)

    # -- the loop ------------------------------------------------------------------------

    def reset(self):
        """Forget the history; the next ``step`` is the first of a new run."""
        self._k = 0
        self._store = {}
        self._owned = set()  # names in _store whose tensors the sampler may overwrite
        self._x_in = (None, None)
        self._brownian = None  # Brownian paths of the run, made at its first noise draw

    def init_noise(self, x_T: torch.Tensor) -> torch.Tensor:
        """The initial state from unit-variance noise x_T [B, ...] (x_T itself for VP
        samplers, ``x_T * init_noise_sigma`` for the Euler family). Starts a new run."""
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise TypeError(f"x_T must be a floating-point tensor, got "
                            f"{x_T.dtype if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
        self.reset()
        self._check_rows(x_T)
        s = self.plan.init_scale
        if s is None:
            return x_T
        return x_T * self._rows(torch.from_numpy(s).to(x_T.device, x_T.dtype), x_T)

    def scale_model_input(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """The model input for the next call: x itself for VP samplers; ``c_in * x`` for
        the Euler family (already computed by the previous fused step when x is its
        output, so this is free)."""
        owner, x_in = self._x_in
        if owner is x:
            return x_in
        c_in = self.plan.calls[self._k].c_in
        if c_in is None:
            return x
        return x * self._c_in(x.device, x.dtype)[self._k].view(_bview(x))

    def model_time(self, batch: int, device=None, doubled: bool = False) -> torch.Tensor:
        """The network's time input for the next call: [batch] (or [2 * batch] for a CFG
        batch), int64 or float32, with ``time_sharing`` applied."""
        key = ("t", device, batch, doubled)  # every call's input, built once per form
        rows = self._tables.get(key)
        if rows is None:
            tab = self._time_table(torch.device(device or "cpu"))
            if tab.shape[1] not in (1, batch):
                raise ValueError(f"per-sample timesteps have {tab.shape[1]} rows, batch is {batch}")
            tab = tab.expand(-1, batch)
            rows = self._tables[key] = list(torch.cat([tab, tab], 1) if doubled else tab)
        return rows[self._k]

    def step(self, model_out: torch.Tensor, t, x: torch.Tensor, *,
             model_out_cond: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator=None, donate: bool = False) -> torch.Tensor:
        """One sampler update from the model output at the current call; returns the next
        state. ``model_out``: the model's output for ``scale_model_input(x)`` (with CFG, the
        unconditional one, and ``model_out_cond`` the conditional one). ``t``: the model
        time of this call (checked when given as a number or CPU tensor). ``noise``:
        explicit standard-normal noise for stochastic samplers (else drawn from
        ``generator`` or the sampler's generator).

        ``donate=True`` promises that the caller does not use ``x`` (nor the model input
        ``scale_model_input`` returned for it) after this call: the step may then write
        its results into their memory, in place, instead of new tensors, which saves a
        memory pass per step on CPU (``fastdiff.sample`` donates its own states). The
        sampler's internal history is always updated in place once no later step reads it.
        """
        k = self._k
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
        if t is not None:
            self._check_t(t, k)
        device = x.device
        coeffs = self._table(device, x.dtype)["coeffs"][k]
        if model_out_cond is not None and self.guidance_rescale:
            coeffs = rescale_coeffs(coeffs, model_out, model_out_cond, self.guidance_rescale)
        if op.clamp and self.clamp.kind == "dynamic":
            coeffs = self._threshold(coeffs, x, model_out, model_out_cond)
        z = None
        if op.noise:
            z = self._noise(x, noise, generator) if op.brownian is None or noise is not None \
                else self._brownian_noise(x, op, generator)
        store = self._store
        donate = donate and x.is_contiguous() and not x.requires_grad
        if op.keep_x is not None:
            store[op.keep_x] = x
            if donate:
                self._owned.add(op.keep_x)
        args = (x, store[op.x_base] if op.x_base is not None else None, model_out,
                model_out_cond, [store[n] for n in op.history], z, coeffs, op.clamp)
        out = self._reuse(op, k, x, donate, n_out)
        if out is None:
            outs = _ops.resolve("sampler_step", device)(*args, n_out)
        else:
            outs = [o if o is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
                    for o in out]
            _ops.resolve("sampler_step.out", device)(*args, out=outs)
        new = outs[x_at]
        if x_in_at >= 0:
            self._x_in = (new, outs[x_in_at])  # the next model input, valid for this state only
        for o, name in stored:
            store[name] = outs[o]
            self._owned.add(name)
        for name in self._drop[k]:
            store.pop(name, None)
            self._owned.discard(name)
        self._k += 1
        if self._k == len(self.plan.calls):
            self.reset()
        return new

    def _reuse(self, op, k, x, donate, n):
        """Memory for call k's outputs that nothing reads after it: the donated state x
        (unless it is kept as history), the donated model input of this call, and the
        sampler's own history tensors whose last reader is this call. A list with one
        tensor or None (allocate) per output, or None when there is nothing to reuse."""
        pool = []
        if donate and op.keep_x is None \
                and all(x is not t for t in self._store.values()):
            pool.append(x)
        for name in self._drop[k]:
            t = self._store.get(name)
            if name in self._owned and t is not None and t.is_contiguous() \
                    and all(t is not p for p in pool):
                pool.append(t)
        owner, x_in = self._x_in
        if donate and owner is x and x_in is not x and x_in.is_contiguous():
            pool.append(x_in)
        if not pool:
            return None
        return (pool + [None] * n)[:n]

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
            tab = self._tables[key] = {"coeffs": coeffs}
        return tab

    def _c_in(self, device, dtype):
        """Model-input scales of every call, [n_calls, R] (only needed when the previous
        step's folded model input cannot be used)."""
        tab = self._table(device, dtype)
        if "c_in" not in tab:
            c_in = np.stack([np.ones(self.grid.rows) if c.c_in is None else c.c_in
                             for c in self.plan.calls])
            tab["c_in"] = torch.from_numpy(c_in).to(device=device, dtype=dtype)
        return tab["c_in"]

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

    def _check_t(self, t, k):
        want = self._calls_t[k]
        if isinstance(t, torch.Tensor):
            if t.device.type != "cpu":
                return  # comparing would synchronise with the device
            if t.numel() == 1 and want.shape[0] == 1:  # the common case, without numpy's
                w = float(want[0])                     # allclose (~20 us per step)
                w = w if self.grid.t_integer else float(np.float32(w))
                if abs(float(t) - w) <= 1e-6 + 1e-6 * abs(w):
                    return
            t = t.detach().double().reshape(-1).numpy()
        elif isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, bool):
            t = np.array([float(t)])
        else:
            raise TypeError(f"t must be a number or a tensor, got {type(t).__name__}")
        if t.shape[0] not in (1, want.shape[0]) and want.shape[0] != 1:
            raise ValueError(f"t has {t.shape[0]} entries, expected {want.shape[0]}")
        if not np.allclose(t, want if self.grid.t_integer else want.astype(np.float32), rtol=1e-6, atol=1e-6):
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

    def _brownian_noise(self, x, op, generator):
        """The standardised Brownian increment of this op (``fastdiff.samplers.brownian``).
        The paths' seeds: the plan's own seed (one path for the batch), else one seed drawn
        from each generator (a list, e.g. from ``seeds=``: one path per sample), else the
        generators' initial seeds when the plan asks for them (diffusers' cosine DPM-Solver)."""
        from .brownian import BrownianNoise
        if self._brownian is None:
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
            self._brownian = BrownianNoise(x, lo, hi, seeds)
        sa, sb = op.brownian
        return self._brownian(sa, sb).to(device=x.device, dtype=x.dtype)

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


_STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
