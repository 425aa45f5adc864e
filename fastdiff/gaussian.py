"""Closed-form diffusion models (docs/gaussian.md): oracles for samplers and probes.

For data x0 ~ N(mu, s^2 I) the noised marginal at a VP point (alpha, sigma) is
N(alpha mu, (alpha^2 s^2 + sigma^2) I) and the optimal noise prediction is exact:

    eps*(x) = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2).

A mixture of isotropic Gaussians is closed form too: eps* is the posterior-weighted sum
of the components' eps*. For the single Gaussian the probability-flow ODE is affine, so
its solution from one point to another is exact: ``GaussianData.ode_map``.

Samples are [B, ...] tensors; the data dimension D is the product of the trailing dims.
All math runs in the input's dtype (use float64 for oracle-grade accuracy).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GaussianData", "GaussianMixture", "ClosedFormModel", "sliced_wasserstein"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _scales(alpha, sigma, x):
    """alpha, sigma (numbers or [B] tensors) -> tensors [B, 1] in x's dtype/device."""
    out = []
    for name, v in (("alpha", alpha), ("sigma", sigma)):
        v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"{name} must be a number or a [B] tensor with B = {x.shape[0]}, "
                             f"got shape {tuple(v.shape)}")
        out.append(v.reshape(-1, 1))
    return out


def _flat(x):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor [B, ...]")
    return x.reshape(x.shape[0], -1)


class GaussianData:
    """Data x0 ~ N(mu, s^2 I) in D dimensions.

    Args:
        mu: mean, a number or a [D] tensor.
        s: standard deviation per coordinate (> 0).
        dim: D when ``mu`` is a number (default 1).
    """

    def __init__(self, mu=0.0, s: float = 1.0, dim: int | None = None):
        mu = torch.as_tensor(mu, dtype=torch.float64)
        if mu.dim() == 0:
            mu = mu.repeat(dim or 1)
        elif dim is not None and mu.shape != (dim,):
            raise ValueError(f"mu has shape {tuple(mu.shape)}, expected [{dim}]")
        if mu.dim() != 1 or not torch.isfinite(mu).all():
            raise ValueError("mu must be finite, a number or a [D] tensor")
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise ValueError(f"s must be a positive finite number, got {s!r}")
        self.mu, self.s = mu, float(s)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def _mu(self, x):
        return self.mu.to(device=x.device, dtype=x.dtype)

    def eps(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Exact eps*(x) at the VP point (alpha, sigma); x [B, ...] with D entries per sample."""
        xf = _flat(x)
        a, s = _scales(alpha, sigma, x)
        out = s * (xf - a * self._mu(x)) / (a * a * self.s ** 2 + s * s)
        return out.reshape(x.shape)

    def x0(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Exact E[x0 | x] = mu + alpha s^2 (x - alpha mu) / (alpha^2 s^2 + sigma^2)
        (finite at alpha = 0, unlike (x - sigma eps) / alpha)."""
        xf = _flat(x)
        a, s = _scales(alpha, sigma, x)
        mu = self._mu(x)
        return (mu + a * self.s ** 2 * (xf - a * mu) / (a * a * self.s ** 2 + s * s)).reshape(x.shape)

    def marginal_std(self, alpha, sigma):
        """Per-coordinate std of x_t: sqrt(alpha^2 s^2 + sigma^2)."""
        return (torch.as_tensor(alpha, dtype=torch.float64) ** 2 * self.s ** 2
                + torch.as_tensor(sigma, dtype=torch.float64) ** 2).sqrt()

    def ode_map(self, x: torch.Tensor, from_: tuple, to: tuple) -> torch.Tensor:
        """Exact probability-flow ODE solution: x at (alpha, sigma) = ``from_`` mapped to
        ``to``. The flow is affine and carries N(a mu, v) onto N(a' mu, v'):
        x' = a' mu + sqrt(v' / v) (x - a mu)."""
        xf = _flat(x)
        a0, s0 = _scales(*from_, x)
        a1, s1 = _scales(*to, x)
        mu = self._mu(x)
        ratio = torch.sqrt((a1 * a1 * self.s ** 2 + s1 * s1) / (a0 * a0 * self.s ** 2 + s0 * s0))
        return (a1 * mu + ratio * (xf - a0 * mu)).reshape(x.shape)

    def noised(self, n: int, alpha, sigma, generator=None, dtype=torch.float64) -> torch.Tensor:
        """n draws of x_t at (alpha, sigma), [n, D]."""
        x0 = self.sample(n, generator, dtype)
        a, s = _scales(alpha, sigma, x0)
        return a * x0 + s * torch.randn(x0.shape, generator=generator, dtype=dtype)

    def sample(self, n: int, generator=None, dtype=torch.float64) -> torch.Tensor:
        """n draws of the data, [n, D]."""
        z = torch.randn((n, self.dim), generator=generator, dtype=dtype)
        return self.mu.to(dtype) + self.s * z

    def as_model(self, schedule, prediction_type: str = "epsilon") -> "ClosedFormModel":
        """This model as a network ``model(x, t)`` on ``schedule`` (a NoiseSchedule)."""
        return ClosedFormModel(self, schedule, prediction_type)


class GaussianMixture:
    """Data from a mixture of isotropic Gaussians N(means[k], stds[k]^2 I), weights[k].

    Args:
        means: [K, D]; stds: [K] (> 0); weights: [K] (>= 0, normalised here; default
            uniform).
    """

    def __init__(self, means, stds, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[0] < 1:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        if stds.numel() == 1:
            stds = stds.repeat(K)
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if stds.shape != (K,) or weights.shape != (K,):
            raise ValueError(f"stds and weights must have shape [{K}], got {tuple(stds.shape)}, "
                             f"{tuple(weights.shape)}")
        if not (stds > 0).all() or not torch.isfinite(means).all():
            raise ValueError("stds must be > 0 and means finite")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()

    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.15) -> "GaussianMixture":
        """k equal modes on a circle in 2-D (the CLI's default model)."""
        ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        return cls(torch.stack([radius * ang.cos(), radius * ang.sin()], dim=1), std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _log_resp(self, xf, a, s):
        """Log posterior responsibilities [B, K] and per-component variances [B, K]."""
        mu = self.means.to(device=xf.device, dtype=xf.dtype)
        var = a * a * self.stds.to(xf)[None] ** 2 + s * s                     # [B, K]
        d2 = ((xf[:, None, :] - a[:, :, None] * mu[None]) ** 2).sum(-1)      # [B, K]
        D = xf.shape[1]
        logp = torch.log(self.weights.to(xf))[None] - 0.5 * d2 / var - 0.5 * D * torch.log(var)
        return logp - torch.logsumexp(logp, dim=1, keepdim=True), var, mu

    def eps(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Exact eps*(x) = sigma sum_k r_k(x) (x - alpha mu_k) / v_k."""
        xf = _flat(x)
        a, s = _scales(alpha, sigma, x)
        logr, var, mu = self._log_resp(xf, a, s)
        w = logr.exp() / var                                                  # [B, K]
        out = s * (w.sum(1, keepdim=True) * xf - a * (w @ mu))
        return out.reshape(x.shape)

    def x0(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Exact E[x0 | x] = sum_k r_k(x) (mu_k + alpha s_k^2 (x - alpha mu_k) / v_k)."""
        xf = _flat(x)
        a, s = _scales(alpha, sigma, x)
        logr, var, mu = self._log_resp(xf, a, s)
        r = logr.exp()                                                        # [B, K]
        g = r * a * self.stds.to(xf)[None] ** 2 / var                         # [B, K]
        out = r @ mu + g.sum(1, keepdim=True) * xf - a * (g @ mu)
        return out.reshape(x.shape)

    def sample(self, n: int, generator=None, dtype=torch.float64) -> torch.Tensor:
        """n draws of the data, [n, D]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).to(dtype)

    def as_model(self, schedule, prediction_type: str = "epsilon") -> "ClosedFormModel":
        """This model as a network ``model(x, t)`` on ``schedule`` (a NoiseSchedule)."""
        return ClosedFormModel(self, schedule, prediction_type)


class ClosedFormModel(nn.Module):
    """A closed-form data model as a network ``model(x, t) -> prediction``.

    t: the schedule's native time ([B] or a number: a timestep index for a discrete
    schedule, t in [0, 1] for a continuous one, s * T for a flow-matching one); alpha_t,
    sigma_t come from ``schedule`` (any path x = alpha x0 + sigma eps: the formulas here
    do not assume alpha^2 + sigma^2 = 1). ``prediction_type``: "epsilon",
    "v_prediction" (alpha eps - sigma x0), "sample" (x0) or "flow_prediction" (the
    velocity eps - x0). Has no parameters.
    """

    def __init__(self, data, schedule, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.data, self.schedule, self.prediction_type = data, schedule, prediction_type

    def forward(self, x: torch.Tensor, t, *args, **kwargs) -> torch.Tensor:
        tt = torch.as_tensor(t).detach().cpu().reshape(-1)
        # A sampler passes one time per sample, usually all equal: look up each value once.
        uniq, inv = tt.unique(return_inverse=True)
        a, s = self.schedule.alpha(uniq), self.schedule.sigma(uniq)
        if uniq.numel() == 1:
            a, s = a.expand(tt.shape[0]), s.expand(tt.shape[0])
        else:
            a, s = a[inv], s[inv]
        a, s = a.to(device=x.device, dtype=x.dtype), s.to(device=x.device, dtype=x.dtype)
        if self.prediction_type == "epsilon":
            return self.data.eps(x, a, s)
        x0 = self.data.x0(x, a, s)
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == "flow_prediction":
            return self.data.eps(x, a, s) - x0
        view = (-1,) + (1,) * (x.dim() - 1)
        return a.view(view) * self.data.eps(x, a, s) - s.view(view) * x0


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-1 distance between two equal-size point sets [n, D]: the mean
    over random unit directions of the 1-D W1 distance of the projections (sorted
    differences). Same units as the data."""
    if x.dim() != 2 or y.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs two [n, D] sets of equal shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    dirs = torch.randn((x.shape[1], projections), generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = (x.double().cpu() @ dirs).sort(dim=0).values
    py = (y.double().cpu() @ dirs).sort(dim=0).values
    return float((px - py).abs().mean())
