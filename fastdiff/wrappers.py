"""Drop-in E-TSDM for an existing network: ``fastdiff.etsdm(model)``.

The wrapper maps the time argument through the sharing map f (docs/etsdm.md) and
calls the original model; weights are not copied and the architecture is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from .schedules import TimeSharing

__all__ = ["etsdm", "ETSDM", "model_output"]

# Names a model's time parameter goes by (diffusers UNets call it `timestep`).
_TIME_NAMES = ("t", "timestep", "timesteps", "time", "sigma")


class ETSDM(nn.Module):
    """``model`` with its time input replaced by f(t) (E-TSDM time sharing).

    Call it exactly like the wrapped model: ``wrapped(x, t, ...)``, ``wrapped(x, t=t)`` or
    ``wrapped(x, timestep=t)`` (diffusers); everything else is forwarded unchanged. t may
    be a number, a 0-d or a [B] tensor, integer or float. For float t the map stays
    differentiable with f's own derivative (0 below t_tilde, 1 above), so
    ``torch.func.jvp`` through the wrapper sees exactly 0 inside shared sub-intervals.
    """

    def __init__(self, model: nn.Module, sharing: TimeSharing):
        super().__init__()
        if not callable(model):
            raise TypeError(f"etsdm: model must be callable, got {type(model).__name__}")
        if not isinstance(sharing, TimeSharing):
            raise TypeError(f"etsdm: sharing must be a fastdiff.TimeSharing, got "
                            f"{type(sharing).__name__}")
        self.model = model
        self.time_sharing = sharing

    def forward(self, x, *args, **kwargs):
        for name in _TIME_NAMES:
            if name in kwargs:
                kwargs[name] = _shared(self.time_sharing, kwargs[name])
                return self.model(x, *args, **kwargs)
        if args:
            return self.model(x, _shared(self.time_sharing, args[0]), *args[1:], **kwargs)
        raise TypeError("etsdm: no time argument found; call as model(x, t, ...) or pass one of "
                        f"{', '.join(_TIME_NAMES)} as a keyword")

    def __getattr__(self, name):
        # Attributes of the wrapped model (config, dtype, device, ...) stay reachable.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)


def _shared(sharing: TimeSharing, t):
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        # The value of f, and f's derivative (0 inside shared sub-intervals, 1 elsewhere)
        # under autograd and forward-AD alike; a select, not a blend, so that t = +-inf
        # maps to +-inf as TimeSharing does (inf * 0 would be NaN).
        return torch.where(sharing.is_shared(t), sharing(t.detach()), t)
    return sharing(t)


def etsdm(model: nn.Module, t_tilde: float = 100, n: int = 5) -> ETSDM:
    """Wrap ``model(x, t, ...)`` so that it sees the E-TSDM shared time f(t).

    Args:
        model: any callable ``model(x, t, **kw)`` (an nn.Module, a diffusers UNet, ...).
        t_tilde: end of the shared range, in the model's time units (100 of T = 1000
            integer steps by default; use a float such as 0.1 for continuous time).
        n: number of shared sub-intervals.

    Returns:
        an :class:`ETSDM` module; the original model is ``.model`` (not copied).
    """
    return ETSDM(model, TimeSharing(t_tilde, n))


def model_output(out) -> torch.Tensor:
    """The tensor of a model's output: diffusers returns objects with ``.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor or an object "
                    "with a `.sample` tensor (diffusers)")
