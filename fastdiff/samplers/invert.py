"""``fastdiff.invert``: run a deterministic sampler from data up to noise (for editing)."""
from __future__ import annotations

from typing import Callable

import torch

from .loop import sample
from .registry import INVERSE

__all__ = ["invert"]


def invert(model: Callable, x0: torch.Tensor, *, sampler: str = "ddim-inverse", schedule=None,
           steps: int = 50, scheduler=None, **options) -> torch.Tensor:
    """Invert data into noise: the probability-flow ODE run upwards from ``x0``.

    Args:
        model: ``model(x, t, ...)`` as for :func:`fastdiff.sample` (cond / guidance_scale /
            uncond in ``options`` work the same way).
        x0: the data (or latents) [B, ...] to invert; it is not modified.
        sampler: one of :data:`fastdiff.samplers.registry.INVERSE`: "ddim-inverse"
            (diffusers' DDIMInverseScheduler), "dpm++2m-inverse" / "dpm-solver-inverse"
            (DPMSolverMultistepInverseScheduler).
        schedule: the model's VP :class:`fastdiff.NoiseSchedule` (default DDPM linear).
        steps: number of steps (model calls).
        scheduler: a diffusers DDIMInverseScheduler / DPMSolverMultistepInverseScheduler
            instead of ``sampler`` / ``schedule`` (its config is read).
        **options: further :func:`fastdiff.sample` / :class:`fastdiff.Sampler` arguments
            (``spacing``, ``order``, ``prediction_type``, ``guidance_scale``, ...).

    Returns:
        the inverted latents [B, ...] at the last (noisiest) level, which
        ``fastdiff.sample(model, x_T=...)`` with the matching forward sampler maps back
        to about ``x0``.
    """
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got "
                        f"{x0.dtype if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    if scheduler is not None:
        from .from_diffusers import sampler_args
        name, _ = sampler_args(scheduler, steps)
        if name not in INVERSE:
            raise ValueError(f"invert needs an inverse scheduler (DDIMInverseScheduler, "
                             f"DPMSolverMultistepInverseScheduler), got {type(scheduler).__name__}")
        return sample(model, x_T=x0, scheduler=scheduler, steps=steps, progress=options.pop("progress", False),
                      **options)
    if sampler not in INVERSE:
        raise ValueError(f"invert: sampler must be one of {INVERSE}, got {sampler!r}")
    return sample(model, x_T=x0, sampler=sampler, schedule=schedule, steps=steps,
                  progress=options.pop("progress", False), **options)
