"""``fastdiff info``'s self-check: every op's kernel against its pure-torch reference, and a
short sampler run through the compiled step against the same run on the reference ops.

Fresh random inputs each run (never zeros); prints one line per op and backend.
"""
from __future__ import annotations

import torch

from . import _ops
from .embedding import embedding_frequencies

__all__ = ["selfcheck"]


def _embedding_args(device):
    t = torch.randint(0, 1000, (37,), device=device)
    tf = torch.rand(37, device=device, dtype=torch.float32) * 1000
    freqs = embedding_frequencies(320, 1.0, 10000.0, device)
    return [(t, freqs, None, 320, True, 1.0, 20.0, 100.0, False),
            (tf, freqs, None, 321, False, 1.0, 20.0, 100.0, True)]


def _step_args(device):
    x = torch.randn(3, 4, 9, 7, device=device)
    hist = [torch.randn_like(x) for _ in range(2)]
    nb = _ops.step_n_basis(len(hist))
    coeffs = torch.randn(3, _ops.STEP_HEAD + 2 * nb, device=device)
    coeffs[:, 3] = coeffs[:, 3].abs() + 0.5  # clamp range s > 0
    coeffs[:, 4] = coeffs[:, 4].abs() + 0.5  # s_div > 0
    return [(x, torch.randn_like(x), torch.randn_like(x), torch.randn_like(x), hist,
             torch.randn_like(x), coeffs, True, 2)]


def _diff_norm_args(device):
    a = torch.randn(5, 3, 17, device=device)
    return [(a, torch.randn_like(a))]


def _sdpa_jvp_args(device):
    q, dq = (torch.randn(1, 3, 37, 8, device=device) for _ in range(2))
    k, v, dk, dv = (torch.randn(1, 3, 70, 8, device=device) for _ in range(4))
    return [(q, k, v, dq, dk, dv, 0.35)]


def _group_norm_tangent_args(device):
    x, dx = (torch.randn(3, 8, 5, 7, device=device) for _ in range(2))
    _, mean, rstd = torch.native_group_norm(x, None, None, 3, 8, 35, 4, 1e-5)
    return [(x, dx, mean, rstd, torch.randn(8, device=device), 4)]


CASES = {"timestep_embedding": _embedding_args, "sampler_step": _step_args,
         "sampler_step.out": _step_args, "diff_norm": _diff_norm_args,
         "sdpa_jvp": _sdpa_jvp_args, "group_norm_tangent": _group_norm_tangent_args}


def _run(name, fn, args):
    """Call ``fn`` (an op or its reference) on ``args``. The out form runs in place on
    copies: the state and the first history tensor receive the two outputs."""
    if not name.endswith(".out"):
        return fn(*args)
    x, x_base, m, mc, hist, noise, coeffs, clamp, n_out = args
    x, hist = x.clone(), [h.clone() for h in hist]
    out = [x, hist[0]][:n_out]
    fn(x, x_base, m, mc, hist, noise, coeffs, clamp, out=out)
    return out


def _close(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max(_close(x, y) for x, y in zip(a, b))
    return (a.double() - b.double()).abs().max().item()


def _prepared_run(device):
    """(max difference, whether the compiled step ran) of a short Sampler.step loop whose
    later steps go through the compiled step (csrc/program.cpp) against the same loop on
    the reference ops."""
    from .samplers.sampler import Sampler
    x_T = torch.randn(2, 4, 9, 7, device=device)
    outs = [torch.randn_like(x_T) for _ in range(6)]
    got, used = [], False
    old = _ops.get_backend()
    try:
        for backend in (old, "reference"):
            _ops.set_backend(backend)
            s = Sampler("dpm++2m", steps=len(outs))
            x = s.init_noise(x_T)
            for k, t in enumerate(s.timesteps):
                x = s.step(outs[k] + 0.1 * x, t, x)
                used |= backend == old and s._run.prog is not None
            got.append(x)
    finally:
        _ops.set_backend(old)
    return _close(got[0], got[1]), used


def selfcheck(verbose: bool = True, tol: float = 1e-5) -> bool:
    """Compare each available backend of each op with the reference, and the compiled
    step of a sampler run with the same run on the reference; True if all agree."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ok = True
    for name, make in CASES.items():
        for device in devices:
            if not _ops.has_kernel(name, device):
                if verbose:
                    print(f"  {name:<20} {device:<5} no compiled kernel (reference in use)")
                continue
            for args in make(device):
                err = _close(_run(name, _ops.op(name), args), _run(name, _ops.REFERENCE[name], args))
                good = err <= tol
                ok &= good
                if verbose:
                    print(f"  {name:<20} {device:<5} max|kernel - reference| = {err:.2e} "
                          f"{'ok' if good else 'MISMATCH'}")
    for device in devices:
        if _ops.extension() is None or not _ops.has_kernel("sampler_step", device):
            continue
        err, used = _prepared_run(device)
        good = used and err <= tol
        ok &= good
        if verbose:
            print(f"  {'compiled step':<20} {device:<5} max|run - reference run| = {err:.2e} "
                  f"{'ok' if good else ('MISMATCH' if used else 'NOT USED')}")
    return ok
