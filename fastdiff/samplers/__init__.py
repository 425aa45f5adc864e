"""Fused diffusion samplers.

Every sampler computes its step coefficients in float64 on the host, once, and does all
tensor work of a step in one ``fastdiff.step.fused_step`` call. ``sample()`` runs the
whole loop around a model; ``Sampler`` is the step-by-step object it is built on.

Families (one file each): ``ddim`` (DDPM, DDIM), ``pndm`` (PNDM, PLMS), ``dpm``
(DPM-Solver / DPM-Solver++, multistep and singlestep, ODE and SDE), ``unipc``, ``euler``
(Euler, Euler ancestral, Heun), ``lms``, ``deis``, ``sasolver`` (SA-Solver), ``kdpm2``
(KDPM2, KDPM2 ancestral), ``dpmsde`` (DPM-Solver++ SDE, Brownian-tree noise from
``brownian``), ``ipndm``, ``cosine`` (cosine DPM-Solver), ``flow`` (flow matching),
``edm`` (EDM, consistency models), ``lcm`` (LCM, TCD), ``inverse`` (DDIM inversion;
``invert`` runs the inverse samplers); ``grid`` and ``grid_families`` build the time grids,
``from_diffusers`` maps diffusers scheduler configs, ``sampler`` is the runtime.
"""
from .invert import invert
from .loop import sample
from .registry import SAMPLERS
from .sampler import Sampler, make_generators

__all__ = ["sample", "invert", "Sampler", "SAMPLERS", "make_generators"]
