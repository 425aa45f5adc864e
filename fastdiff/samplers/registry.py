"""Sampler names: each is a family (plan function + grid flavour) with fixed options."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
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
from .edm import consistency, edm_dpm, edm_euler
from .flow import flow_euler, flow_heun
from .inverse import ddim_inverse
from .lcm import lcm, tcd

__all__ = ["Family", "FAMILIES", "SAMPLERS", "INVERSE", "OWN_SCHEDULE", "ALIASES", "DIFFUSERS_ARGS", "family",
           "resolve", "diffusers_args", "default_schedule"]


@dataclass(frozen=True)
class Family:
    """plan: the family's plan function; flavor: diffusers' timestep family ("ddim",
    "dpmsolver", "euler"); fixed: option defaults the name sets (explicit options
    override them, e.g. ``Sampler("dpm++2m", order=1)``); final: default final level;
    karras_t / karras_range: how Karras sigmas map to model times (see ``build_grid``);
    flow: the grid on a flow-matching schedule (None: the family is not defined there)."""
    plan: Callable
    flavor: str
    fixed: dict = field(default_factory=dict)
    final: str = "zero"
    karras_t: str = "round"
    karras_range: str = "table"
    flow: str | None = None


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

# -- flow matching, EDM, consistency models, inversion ----------------------------------------
FAMILIES.update({
    "flow-euler": Family(flow_euler, "flow", flow="match"),
    "flow-heun": Family(flow_heun, "flow", flow="match"),
    "edm-euler": Family(edm_euler, "edm"),
    "edm-dpm++2m": Family(edm_dpm, "edm", {"algorithm": "dpmsolver++", "order": 2}),
    "edm-dpm++sde-2m": Family(edm_dpm, "edm", {"algorithm": "sde-dpmsolver++", "order": 2}),
    "cm": Family(consistency, "cm"),
    "lcm": Family(lcm, "lcm"),
    "tcd": Family(tcd, "lcm"),
    "ddim-inverse": Family(ddim_inverse, "ddim-inverse"),
    "dpm++2m-inverse": Family(dpm_multistep, "dpm-inverse", {"algorithm": "dpmsolver++", "order": 2}),
    "dpm-solver-inverse": Family(dpm_multistep, "dpm-inverse", {"algorithm": "dpmsolver"}),
})
# DPM-Solver and UniPC on flow-matching schedules (diffusers' use_flow_sigmas): their grids differ.
for _name, _fam in list(FAMILIES.items()):
    if _fam.plan in (dpm_multistep, dpm_singlestep, unipc) and _fam.flavor == "dpmsolver":
        FAMILIES[_name] = replace(_fam, flow="unipc" if _fam.plan is unipc else "dpm")
INVERSE = ("ddim-inverse", "dpm++2m-inverse", "dpm-solver-inverse")  # data -> noise (fastdiff.invert)
OWN_SCHEDULE = {"flow": "flow", "edm": "edm", "cm": "edm"}  # flavors that need a non-VP schedule


def default_schedule(name: str):
    """The schedule ``Sampler(name)`` uses when none is given: flow matching (T = 1000,
    shift 1) for the flow samplers, EDM's defaults for the EDM / consistency ones, else
    DDPM linear (T = 1000)."""
    from ..schedules import NoiseSchedule
    kind = OWN_SCHEDULE.get(family(name).flavor)
    if kind == "flow":
        return NoiseSchedule.flow()
    if kind == "edm":
        if family(name).flavor == "cm":
            from ..schedule_families import EDMSchedule
            return EDMSchedule(T=40, time_scale=250.0)  # diffusers' CMStochasticIterativeScheduler default
        return NoiseSchedule.edm()
    return NoiseSchedule.linear()


SAMPLERS = tuple(FAMILIES)

# Other programs' names for the samplers above (A1111 / ComfyUI / k-diffusion), matched
# after normalisation (see ``_key``), so "DPM++ 2M", "dpmpp_2m" and "dpm++2m" are one
# name and need no entry; a trailing "Karras" ("DPM++ 2M Karras", "lms_karras") adds
# ``karras=True`` to any name. Only exact equivalents of a family are listed: names of
# samplers fastdiff does not have (e.g. "DPM++ 2S a", "DPM++ SDE") stay unknown.
ALIASES = {
    "Euler a": "euler-ancestral",
    "k_euler": "euler",
    "k_euler_a": "euler-ancestral",
    "k_euler_ancestral": "euler-ancestral",
    "k_heun": "heun",
    "k_lms": "lms",
    "k_dpmpp_2m": "dpm++2m",
    "DPM++ 2M SDE": "dpm++sde-2m",
    "k_dpmpp_2m_sde": "dpm++sde-2m",
    "uni_pc_bh2": "unipc",
    "DPM2": "kdpm2",
    "DPM2 a": "kdpm2-ancestral",
    "k_dpm_2": "kdpm2",
    "k_dpm_2_a": "kdpm2-ancestral",
    "k_dpm_2_ancestral": "kdpm2-ancestral",
    "dpm_2": "kdpm2",
    "dpm_2_ancestral": "kdpm2-ancestral",
    "DPM++ SDE": "dpm++sde",
    "k_dpmpp_sde": "dpm++sde",
    "DPM-Solver++": "dpm++2m",
    "DPM-Solver": "dpm-solver",
}
_KARRAS = "karras"


def _key(name: str) -> str:
    return name.lower().replace("++", "pp").replace(" ", "").replace("_", "").replace("-", "")


# diffusers' argument names for Sampler / sample arguments (both spellings are accepted).
DIFFUSERS_ARGS = {"num_inference_steps": "steps", "use_karras_sigmas": "karras",
                  "timestep_spacing": "spacing"}


def diffusers_args(options: dict, **given):
    """Move diffusers' spellings (:data:`DIFFUSERS_ARGS`) out of ``options`` (a kwargs
    dict, changed in place) into fastdiff's: returns ``given`` (fastdiff name -> value,
    None = not given) with them filled in; both spellings at once raise ValueError."""
    for theirs, ours in DIFFUSERS_ARGS.items():
        if theirs in options:
            value = options.pop(theirs)
            if given.get(ours) is not None and value is not None:
                raise ValueError(f"give either {ours}= or {theirs}= (diffusers' name), not both "
                                 f"({ours}={given[ours]!r}, {theirs}={value!r})")
            if value is not None:
                given[ours] = value
    return given


def resolve(name: str) -> tuple[str, dict]:
    """(family name in :data:`FAMILIES`, Sampler options the name implies) for a sampler
    name or alias: ``resolve("DPM++ 2M Karras") == ("dpm++2m", {"karras": True})``."""
    if not isinstance(name, str):
        raise TypeError(f"sampler must be a name (str), got {type(name).__name__}")
    if name in FAMILIES:
        return name, {}
    lookup = {**{_key(a): n for a, n in ALIASES.items()}, **{_key(n): n for n in FAMILIES}}
    key = _key(name)
    if key in lookup:
        return lookup[key], {}
    if key.endswith(_KARRAS) and key[:-len(_KARRAS)] in lookup:
        return lookup[key[:-len(_KARRAS)]], {"karras": True}
    aliases = ", ".join(f"{a!r} -> {n}" for a, n in ALIASES.items())
    raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}. Case, spaces, "
                     f"'_' / '-' and 'pp' for '++' do not matter ('DPM++ 2M' = 'dpmpp_2m'); a "
                     f"trailing ' Karras' adds karras=True; other names: {aliases}")


def family(name: str) -> Family:
    """The family of a sampler name or alias (see :func:`resolve`)."""
    return FAMILIES[resolve(name)[0]]
