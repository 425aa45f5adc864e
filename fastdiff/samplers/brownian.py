"""Brownian-tree noise for DPM-Solver++ SDE (k-diffusion's ``BrownianTreeNoiseSampler``).

A Brownian-tree sampler draws the increments of one Brownian path W(sigma) per sample, so
the noise of a step from sigma to sigma' is (W(sigma') - W(sigma)) / sqrt(|sigma' - sigma|)
and overlapping steps (a step and its midpoint sub-step) get consistently correlated noise.
The paths are torchsde's ``BrownianInterval`` with diffusers' parameters, so the same seed
gives the same noise as ``diffusers.DPMSolverSDEScheduler`` (whose own noise source it is);
torchsde is imported only when such a sampler draws noise (``pip install torchsde``).

One path per seed: with ``seeds=`` (one per sample) sample i's noise depends only on seed
i, not on the rest of the batch; a single seed draws one path for the whole batch tensor,
as diffusers' ``noise_sampler_seed``.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["BrownianNoise"]


class BrownianNoise:
    """Brownian paths over [t0, t1] (sigma units) shaped like x.

    seeds: an int (one path for the whole batch) or a list of ints (one path per sample).
    t0, t1: floats, or [n_paths] arrays (per-sample grids).
    """

    def __init__(self, x: torch.Tensor, t0, t1, seeds):
        try:
            import torchsde
        except ImportError:
            raise ImportError("the Brownian-tree noise of 'dpm++sde' (diffusers' DPMSolverSDEScheduler) "
                              "needs torchsde: pip install torchsde") from None
        self.batched = isinstance(seeds, (list, tuple))
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {x.shape[0]}")
        shape = tuple(x.shape[1:]) if self.batched else tuple(x.shape)
        seeds = list(seeds) if self.batched else [seeds]
        t0, t1 = np.broadcast_to(t0, (len(seeds),)), np.broadcast_to(t1, (len(seeds),))
        self.trees = [torchsde.BrownianInterval(t0=float(a), t1=float(b), size=shape, dtype=x.dtype,
                                                device=x.device, entropy=int(s), tol=1e-6, pool_size=24,
                                                halfway_tree=True)
                      for s, a, b in zip(seeds, t0, t1)]

    def __call__(self, sa, sb) -> torch.Tensor:
        """Standardised increment between the levels sa and sb (floats, or [R] arrays with
        one entry per path)."""
        sa, sb = np.broadcast_to(sa, (len(self.trees),)), np.broadcast_to(sb, (len(self.trees),))
        out = []
        for tree, a, b in zip(self.trees, sa, sb):
            lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
            out.append(tree(float(lo), float(hi)) * (sign / np.sqrt(abs(float(b) - float(a)))))
        return torch.stack(out) if self.batched else out[0]
