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
        seeds = [int(s) for s in seeds] if self.batched else [int(seeds)]
        t0, t1 = np.broadcast_to(t0, (len(seeds),)), np.broadcast_to(t1, (len(seeds),))
        self._made = (shape, x.dtype, x.device, [float(a) for a in t0], [float(b) for b in t1], seeds)
        self._asked = []  # the increments drawn so far, in order (see __getstate__)
        self._grow()

    def _grow(self):
        import torchsde
        shape, dtype, device, t0, t1, seeds = self._made
        self.trees = [torchsde.BrownianInterval(t0=a, t1=b, size=shape, dtype=dtype, device=device,
                                                entropy=s, tol=1e-6, pool_size=24, halfway_tree=True)
                      for s, a, b in zip(seeds, t0, t1)]

    def __getstate__(self):
        # torchsde's trees neither pickle (a lambda) nor deep-copy (their cache is keyed by
        # the identity of their nodes): a copy (a Sampler copied mid-run) grows its own
        # from the same seeds and draws the increments drawn so far again, which leaves
        # its trees as the original's are, so it goes on drawing the same noise.
        return {"batched": self.batched, "made": self._made, "asked": list(self._asked)}

    def __setstate__(self, state):
        self.batched, self._made = state["batched"], state["made"]
        self._asked = []
        self._grow()
        for sa, sb in state["asked"]:
            self(sa, sb)

    def __call__(self, sa, sb) -> torch.Tensor:
        """Standardised increment between the levels sa and sb (floats, or [R] arrays with
        one entry per path)."""
        self._asked.append((sa, sb))
        sa, sb = np.broadcast_to(sa, (len(self.trees),)), np.broadcast_to(sb, (len(self.trees),))
        out = []
        for tree, a, b in zip(self.trees, sa, sb):
            lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
            out.append(tree(float(lo), float(hi)) * (sign / np.sqrt(abs(float(b) - float(a)))))
        return torch.stack(out) if self.batched else out[0]
