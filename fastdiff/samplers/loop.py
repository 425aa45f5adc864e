"""``fastdiff.sample``: the whole sampling loop around a user's model."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import singular
from ..schedules import TimeSharing
from ..wrappers import ETSDM, model_output
from .core import PREDICTIONS
from .registry import diffusers_args
from .sampler import DEFAULT_STEPS, Sampler, _Run, check_generator, check_guidance, make_generators, randn

__all__ = ["sample"]


def sample(model: Callable, shape=None, *, x_T: torch.Tensor | None = None, schedule=None,
           sampler: str | Sampler | None = None, steps: int | None = None, timesteps=None, scheduler=None,
           guidance_scale: float | None = None, cond=None, uncond=None, generator=None,
           seeds=None, time_sharing=None, progress: bool = True,
           callback: Callable | None = None, callback_on_step_end: Callable | None = None,
           prediction_type: str | None = None, device=None, dtype=None, initial: str | None = None,
           initial_predictor=None, initial_guidance_scale: float | None = None, compile: bool | str = False,
           **options) -> torch.Tensor:
    """Draw samples from a diffusion model with a fused sampler.

    Args:
        model: any ``model(x, t, ...)`` returning a tensor, or a diffusers UNet (its
            ``.sample`` is taken). ``t`` is a [B] tensor (int64 for integer timesteps,
            else float32); with ``time_sharing`` it is the E-TSDM shared time f(t).
        shape: [B, ...] of the samples (or give ``x_T``).
        x_T: initial unit-variance noise [B, ...] (as a diffusers pipeline draws it,
            before ``init_noise_sigma``). Default: drawn from ``generator`` / ``seeds``.
        schedule: :class:`fastdiff.schedules.NoiseSchedule` (default DDPM linear).
        sampler: a name from :data:`fastdiff.SAMPLERS` (default "dpm++2m") or an alias
            (``"DPM++ 2M Karras"``, ``"k_euler"``, ...), or a
            :class:`fastdiff.Sampler` built before (its steps, schedule, options,
            guidance scale and time sharing are used, not the model's attributes: to draw
            many batches without recomputing its coefficients; schedule, scheduler,
            timesteps, prediction_type, time_sharing and options must then not be given).
        steps: number of steps (default 20, or a prebuilt Sampler's own; diffusers'
            ``num_inference_steps`` is the same, as are ``use_karras_sigmas`` /
            ``timestep_spacing`` for ``karras`` / ``spacing``); ``timesteps``: explicit
            model times [steps] or [B, steps] (per-sample grids).
        scheduler: a diffusers scheduler instance instead of ``sampler``/``schedule``: its
            config is read and the equivalent fused sampler runs (options it cannot
            honour raise ValueError).
        guidance_scale, cond, uncond: classifier-free guidance. Conditioning convention:
            a tensor is passed as the model's third positional argument
            (``encoder_hidden_states`` of a ``UNet2DConditionModel``, ``class_labels`` of
            a ``UNet2DModel``); a dict is passed as keyword arguments. With
            ``guidance_scale`` != 1 the model is called once per step on the batch
            [uncond; cond] (tensors concatenated along dim 0) and the fused step mixes
            ``m_u + w (m_c - m_u)``; otherwise only ``cond`` is used. An ``uncond``
            with batch 1 (one negative prompt) is broadcast to ``cond``'s batch, as
            diffusers pipelines do.
        generator, seeds: noise source: a ``torch.Generator``, a list of them (one per
            sample), or ``seeds`` (one seed per sample: sample i is then identical
            whatever the rest of the batch).
        time_sharing: :class:`fastdiff.TimeSharing` applied to the network's time input
            (E-TSDM; the update keeps the true schedule). Default: the model's own
            ``time_sharing`` attribute (fastdiff's UNet records the sharing it was trained
            with), if any; ``False`` turns it off.
        progress: show a tqdm progress bar. callback: ``callback(i, t, x)`` after each
            model call i with its model time t and the new state x. Without a callback
            the loop updates its state in place (``Sampler.step(..., donate=True)``), one
            memory pass per step fewer; with one, every state is a new tensor the callback
            may keep. callback_on_step_end: diffusers' form,
            ``callback_on_step_end(None, i, t, {"latents": x})`` returning a dict whose
            ``"latents"``, if present, replaces the state (give one of the two callbacks).
        prediction_type: "epsilon", "v_prediction" or "sample". Default: the model's
            ``prediction_type`` attribute if it has one (fastdiff's UNet), else "epsilon";
            with a ``scheduler`` its config decides.
        device, dtype: of the drawn x_T (default CPU float32).
        initial: None (start from x_T) or "singdiffusion": start from SingDiffusion's step
            from t = 1, ``x_t1 = alpha_t1 y + sigma_t1 x_T`` with y =
            ``initial_predictor.predict(x_T, cond)`` (the Euler family's state x / alpha
            accordingly), then run the sampler unchanged (docs/singdiffusion.md).
        initial_predictor: an object with ``predict(x1, cond) -> y`` shaped like x1, e.g.
            ``fastdiff.singular.ClassMeans`` or a trained ``InitialPredictor``.
        initial_guidance_scale: w of the predictor's normalized guidance
            ``(y_u + w (y_c - y_u)) / w`` (applied when w > 1, with ``uncond``); separate
            from ``guidance_scale``. Default None: y = the conditional prediction.
        compile: True (or a ``torch.compile`` backend name, e.g. "aot_eager"): run the
            whole loop, every model call and fused step, as one graph of
            ``torch.compile(fullgraph=True)``, unrolled over the run's steps: no Python
            between steps and no recompilation across them; calling again with the same
            prebuilt ``sampler=`` and shapes reuses the graph (a new Sampler is a new
            plan, so a new graph: the first compile takes seconds). No progress bar or
            callback then. Equal to the eager loop up to the compiled model's rounding.
        **options: further :class:`Sampler` arguments (``spacing``, ``karras``, ``order``,
            ``eta``, ``thresholding``, ``guidance_rescale``, ...).

    Returns:
        the samples [B, ...] (the final state; for the Euler family with a nonzero final
        sigma it is in the k-diffusion scale x / alpha, as in diffusers). They keep x_T's
        memory layout (a channels_last x_T gives channels_last samples). With an x_T (or a
        model) that requires grad, the samples are differentiable through every step (the
        loop then updates nothing in place). One Sampler may serve calls from several
        threads at once: each call has its own run.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
    if compile and (callback is not None or callback_on_step_end is not None):
        raise ValueError("compile=True runs every step in one compiled graph: no callback between steps")
    steps = diffusers_args(options, steps=steps)["steps"]
    if callback is not None and callback_on_step_end is not None:
        raise ValueError("give either callback or callback_on_step_end (diffusers' form), not both")
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise TypeError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
    if seeds is not None and generator is not None:
        raise ValueError("give either generator or seeds, not both")
    gens = make_generators(seeds) if seeds is not None else check_generator(generator)
    guidance_scale = check_guidance(guidance_scale)
    if initial not in singular.INITIALS:
        raise ValueError(f"initial must be one of {singular.INITIALS}, got {initial!r}")
    if initial is None and (initial_predictor is not None or initial_guidance_scale is not None):
        raise ValueError('initial_predictor / initial_guidance_scale need initial="singdiffusion"')
    if initial is not None and initial_predictor is None:
        raise ValueError(f'initial="{initial}" needs initial_predictor= (e.g. '
                         'fastdiff.singular.ClassMeans(data) or a trained InitialPredictor)')
    if isinstance(sampler, Sampler):
        s = _prebuilt(sampler, steps, guidance_scale, schedule=schedule, scheduler=scheduler,
                      timesteps=timesteps, prediction_type=prediction_type,
                      time_sharing=time_sharing, **options)
        guidance_scale = s.guidance_scale
    elif sampler is not None and not isinstance(sampler, str):
        raise TypeError(f"sampler must be a name or a fastdiff.Sampler, got {type(sampler).__name__}")
    elif scheduler is not None:
        if schedule is not None or sampler is not None:
            raise ValueError("give either scheduler (diffusers) or sampler / schedule, not both")
        if prediction_type is not None:
            options["prediction_type"] = prediction_type
        s = Sampler.from_diffusers(scheduler, DEFAULT_STEPS if steps is None else steps, timesteps=timesteps,
                                   guidance_scale=guidance_scale,
                                   time_sharing=_model_time_sharing(model, time_sharing),
                                   generator=gens, **options)
    else:
        s = Sampler(sampler or "dpm++2m", schedule, DEFAULT_STEPS if steps is None else steps, timesteps=timesteps,
                    guidance_scale=guidance_scale, time_sharing=_model_time_sharing(model, time_sharing), generator=gens,
                    prediction_type=prediction_type or _model_prediction(model), **options)
    x_T = _initial_noise(shape, x_T, gens, device, dtype)
    if seeds is not None and len(gens) != x_T.shape[0]:
        raise ValueError(f"got {len(gens)} seeds for a batch of {x_T.shape[0]}")
    cfg = guidance_scale is not None and guidance_scale != 1
    if cfg and uncond is None:
        raise ValueError("guidance_scale needs uncond (the unconditional conditioning)")
    if uncond is not None and guidance_scale is None:
        raise ValueError("uncond given without guidance_scale")
    args_c, kw_c = _conditioning(cond, "cond")
    if cfg:
        args_u, kw_u = _conditioning(uncond, "uncond")
        args, kwargs = _cfg_batch(args_u, kw_u, args_c, kw_c)
    else:
        args, kwargs = args_c, kw_c
    # This call's own run (the Sampler may be running elsewhere at the same time); without
    # a callback nobody sees the states it makes, so it donates them to the next step.
    run = _Run(donating=callback is None and callback_on_step_end is None and not compile)
    if initial is None:
        x = s._init_noise(x_T, run)
    else:
        x = singular.initial_state(s, x_T, initial_predictor, cond, uncond, initial_guidance_scale)
    B = x.shape[0]
    if compile:
        backend = "inductor" if compile is True else compile
        ops = [s._runs[k][0] for k in range(len(s))]
        if any(op.noise and op.brownian is not None for op in ops):
            raise ValueError(f"compile=True: {s.name!r} draws Brownian-tree noise, which cannot be "
                             "traced; run it without compile")
        # A generator cannot be traced: the run's noise is drawn first, in the order the
        # eager steps draw it (so the samples are the same), and passed to each step.
        g = gens if gens is not None else s.generator
        noises = [randn(x.shape, g, x.device, x.dtype) if op.noise else None for op in ops]
        return torch.compile(_compiled_loop, fullgraph=True, backend=backend)(
            s, run, model, x, args, kwargs, cfg, noises)
    shown_t = s.timesteps
    steps_iter = range(len(s))
    if progress:
        from tqdm.auto import tqdm
        steps_iter = tqdm(steps_iter, desc=f"fastdiff {s.name}", leave=False)
    # (fastdiff.sample itself may run inside a traced function: asked once, not per step)
    compiling = torch.compiler.is_compiling()
    for i in steps_iter:
        t = s._model_time(run, B, x.device, cfg)
        # Without a callback nobody else sees x, so it is unchanged since the step made it.
        inp = s._model_input(run, x, trusted=callback is None and callback_on_step_end is None,
                             compiling=compiling)
        # The loop's own states (not the caller's x_T) are dead after the step unless a
        # callback may have kept them: donate them to the step (an in-place update).
        # `out` lives on until the next model call has made its output: freed before,
        # it let glibc trim the heap every step on CPU (page faults, and with several
        # threads TLB shoot-downs: 100-200 us per step measured by bench_sample.py).
        donate = callback is None and callback_on_step_end is None and x is not x_T
        if cfg:
            out = model_output(model(torch.cat([inp, inp]), t, *args, **kwargs))
            out_u, out_c = out.chunk(2)
            x = s._step(run, out_u, None, x, out_c, generator=gens, donate=donate)
        else:
            out = model_output(model(inp, t, *args, **kwargs))
            x = s._step(run, out, None, x, generator=gens, donate=donate)
        if callback is not None:
            callback(i, shown_t[i], x)
        elif callback_on_step_end is not None:
            x = _on_step_end(callback_on_step_end, i, shown_t[i], x)
    return x


def _compiled_loop(s, run, model, x, args, kwargs, cfg, noises):
    """The loop of ``sample(compile=True)``: traced once, unrolled over the run's steps
    (the plan is fixed, so every step's op is known when tracing); ``noises``: each
    step's noise tensor (or None)."""
    B = x.shape[0]
    for z in noises:
        t = s._model_time(run, B, x.device, cfg)
        inp = s._model_input(run, x, trusted=True)
        if cfg:
            out_u, out_c = model_output(model(torch.cat([inp, inp]), t, *args, **kwargs)).chunk(2)
            x = s._step(run, out_u, None, x, out_c, noise=z)
        else:
            x = s._step(run, model_output(model(inp, t, *args, **kwargs)), None, x, noise=z)
    return x


def _on_step_end(fn, i, t, x):
    out = fn(None, i, t, {"latents": x})
    if out is None:
        return x
    if not isinstance(out, dict):
        raise TypeError(f"callback_on_step_end must return a dict (diffusers' callback_kwargs), got "
                        f"{type(out).__name__}")
    new = out.get("latents", x)
    if not isinstance(new, torch.Tensor) or new.shape != x.shape:
        raise ValueError(f"callback_on_step_end returned latents of shape "
                         f"{tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__}, "
                         f"expected {tuple(x.shape)}")
    return new


def _prebuilt(s, steps, guidance_scale, **given):
    """Check that nothing given to ``sample`` contradicts a prebuilt Sampler."""
    for name, value in given.items():
        if value is not None:
            raise ValueError(f"sample: {name} cannot be given with a prebuilt Sampler (it was "
                             "fixed when the Sampler was built)")
    if steps is not None and steps != s.steps:
        raise ValueError(f"sample: steps={steps} but the prebuilt Sampler has {s.steps} steps")
    if guidance_scale is not None and guidance_scale != s.guidance_scale:
        raise ValueError(f"sample: guidance_scale={guidance_scale} but the prebuilt Sampler has "
                         f"guidance_scale={s.guidance_scale}")
    return s


def _model_time_sharing(model, time_sharing):
    if time_sharing is False:
        return None
    if time_sharing is None and not isinstance(model, ETSDM):  # ETSDM applies it itself
        own = getattr(model, "time_sharing", None)
        return own if isinstance(own, TimeSharing) else None
    return time_sharing


def _model_prediction(model):
    own = getattr(model, "prediction_type", None)
    return own if isinstance(own, str) and own in PREDICTIONS else "epsilon"


def _initial_noise(shape, x_T, gens, device, dtype):
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor):
            raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)}")
        if not x_T.is_floating_point():
            raise TypeError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
        if dtype is not None and x_T.dtype != dtype:
            raise TypeError(f"x_T has dtype {x_T.dtype} but dtype={dtype}")
        if device is not None and x_T.device != torch.device(device):
            raise ValueError(f"x_T is on {x_T.device} but device={device}")
        if x_T.dim() < 1 or x_T.shape[0] < 1:
            raise ValueError(f"x_T must have shape [B, ...] with B >= 1, got {tuple(x_T.shape)}")
        return x_T
    if shape is None:
        raise ValueError("give shape or x_T")
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) for n in shape):
        raise TypeError(f"shape must be a tuple of positive ints [B, ...], got {shape!r}")
    if not shape or not all(n >= 1 for n in shape):
        raise ValueError(f"shape must be a tuple of positive ints [B, ...], got {tuple(shape)}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                              or dtype.is_complex):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return randn(tuple(int(n) for n in shape), gens, device or "cpu", dtype or torch.float32)


def _conditioning(c, name):
    """-> (positional args, keyword args) for the model call."""
    if c is None:
        return (), {}
    if isinstance(c, torch.Tensor):
        return (c,), {}
    if isinstance(c, dict):
        return (), dict(c)
    raise TypeError(f"{name} must be a tensor (the model's third argument) or a dict of keyword "
                    f"arguments, got {type(c).__name__}")


def _cat(u, c, what):
    if isinstance(u, torch.Tensor) and isinstance(c, torch.Tensor):
        if u.dim() > 0 and u.shape[0] == 1 and c.dim() > 0 and c.shape[0] > 1 and u.shape[1:] == c.shape[1:]:
            u = u.expand_as(c)  # one negative prompt for the batch (diffusers pipelines)
        if u.shape != c.shape:
            raise ValueError(f"uncond and cond {what} have shapes {tuple(u.shape)} and {tuple(c.shape)}")
        return torch.cat([u, c])
    if isinstance(u, torch.Tensor) or isinstance(c, torch.Tensor) or u != c:
        raise ValueError(f"uncond and cond differ in {what} in a way that cannot be batched "
                         "(tensors are concatenated, other values must be equal)")
    return c


def _cfg_batch(args_u, kw_u, args_c, kw_c):
    if len(args_u) != len(args_c) or set(kw_u) != set(kw_c):
        raise ValueError("uncond and cond must have the same form (both tensors, or dicts with the "
                         f"same keys); got keys {sorted(kw_u)} and {sorted(kw_c)}")
    args = tuple(_cat(u, c, "the positional conditioning") for u, c in zip(args_u, args_c))
    kwargs = {k: _cat(kw_u[k], kw_c[k], repr(k)) for k in kw_c}
    return args, kwargs
