"""Forward-mode dual tensors, read and built in one place for fastdiff's forward-AD rules.

A rule that sees ``(primal, tangent)`` directly can form the output and its tangent in one
pass and hand both back, instead of having autograd run the primal and then ask a
separate ``jvp`` for the tangent (which, for fused kernels, computes the primal again).
:func:`split` and :func:`join` work the same under ``torch.func.jvp`` (whose tensors are
functorch-wrapped duals; nested jvp levels included) and under
``torch.autograd.forward_ad.dual_level``.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD


def split(x):
    """``(primal, tangent)`` of ``x``; tangent None when ``x`` carries none (a plain
    tensor, a parameter, a non-tensor argument)."""
    if not isinstance(x, torch.Tensor):
        return x, None
    p, t = fwAD.unpack_dual(x)
    return p, t


def has_tangent(x) -> bool:
    return split(x)[1] is not None


def join(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """The dual tensor ``primal + eps * tangent`` at the current forward-AD level."""
    return fwAD.make_dual(primal, tangent)


def nested_derivatives() -> bool:
    """Whether more than one differentiating functorch transform is active (jvp of jvp,
    grad of jvp, hessian, ...): a rule that hands back a tangent computed by a kernel
    without derivatives of its own would give a wrong higher-order derivative there.
    vmap levels (``jacfwd``) do not count."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    diff = (torch._C._functorch.TransformType.Jvp, torch._C._functorch.TransformType.Grad)
    return sum(ci.key() in diff for ci in stack) > 1
