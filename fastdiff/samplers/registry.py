"""Sampler names: each is a family (plan function + grid flavour) with fixed options."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .ddim import ddim, ddpm
from .deis import deis
from .cosine import cosine_dpm
from .dpm import dpm_multistep, dpm_singlestep
from .dpmsde import dpmpp_sde
from .euler import euler, euler_ancestral, heun
from .ipndm import ipndm
from .kdpm2 import kdpm2, kdpm2_ancestral
from .lms import lms
from .pndm import pndm
from .sasolver import sa_solver
from .unipc import unipc

__all__ = ["Family", "FAMILIES", "SAMPLERS", "family"]


@dataclass(frozen=True)
class Family:
    """plan: the family's plan function; flavor: diffusers' timestep family ("ddim",
    "dpmsolver", "euler"); fixed: option defaults the name sets (explicit options
    override them, e.g. ``Sampler("dpm++2m", order=1)``); final: default final level;
    karras_t / karras_range: how Karras sigmas map to model times (see ``build_grid``)."""
    plan: Callable
    flavor: str
    fixed: dict = field(default_factory=dict)
    final: str = "zero"
    karras_t: str = "round"
    karras_range: str = "table"


_EULER = dict(flavor="euler", karras_t="float", karras_range="spaced")
FAMILIES = {
    "ddpm": Family(ddpm, "ddim"),
    "ddim": Family(ddim, "ddim"),
    "pndm": Family(pndm, "ddim", {"skip_prk_steps": False}, final="sigma_min"),
    "plms": Family(pndm, "ddim", {"skip_prk_steps": True}, final="sigma_min"),
    "dpm-solver": Family(dpm_multistep, "dpmsolver", {"algorithm": "dpmsolver"}, final="sigma_min",
                         karras_t="dpm"),
    "dpm-solver-sde": Family(dpm_multistep, "dpmsolver", {"algorithm": "sde-dpmsolver"},
                             final="sigma_min", karras_t="dpm"),
    "dpm-solver-single": Family(dpm_singlestep, "dpmsolver", {"algorithm": "dpmsolver"},
                                final="sigma_min"),
    "dpm++2m": Family(dpm_multistep, "dpmsolver", {"algorithm": "dpmsolver++", "order": 2}, karras_t="dpm"),
    "dpm++3m": Family(dpm_multistep, "dpmsolver", {"algorithm": "dpmsolver++", "order": 3}, karras_t="dpm"),
    "dpm++2s": Family(dpm_singlestep, "dpmsolver", {"algorithm": "dpmsolver++", "order": 2}),
    "dpm++3s": Family(dpm_singlestep, "dpmsolver", {"algorithm": "dpmsolver++", "order": 3}),
    "dpm++sde-2m": Family(dpm_multistep, "dpmsolver", {"algorithm": "sde-dpmsolver++", "order": 2},
                          karras_t="dpm"),
    "unipc": Family(unipc, "dpmsolver", {"solver_type": "bh2"}),
    "unipc-bh1": Family(unipc, "dpmsolver", {"solver_type": "bh1"}),
    "euler": Family(euler, **_EULER),
    "euler-ancestral": Family(euler_ancestral, **_EULER),
    "heun": Family(heun, **_EULER),
    "lms": Family(lms, **_EULER),
    # -- solvers (issue 12 part 2) --
    "deis": Family(deis, "dpmsolver", {"order": 2}, final="sigma_min"),
    "deis-3": Family(deis, "dpmsolver", {"order": 3}, final="sigma_min"),
    "ipndm": Family(ipndm, "angle"),
    "kdpm2": Family(kdpm2, "euler", karras_range="spaced"),
    "kdpm2-ancestral": Family(kdpm2_ancestral, "euler", karras_range="spaced"),
    "sa-solver": Family(sa_solver, "dpmsolver", final="sigma_min"),
    "cosine-dpm": Family(cosine_dpm, "cosine"),
    "dpm++sde": Family(dpmpp_sde, **{**_EULER, "flavor": "euler64"}),
}

SAMPLERS = tuple(FAMILIES)


def family(name: str) -> Family:
    if not isinstance(name, str):
        raise TypeError(f"sampler must be a name (str), got {type(name).__name__}")
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}") from None
