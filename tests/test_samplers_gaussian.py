"""Samplers against closed-form Gaussian models (docs/gaussian.md): exact scores, the
exact probability-flow ODE solution, convergence orders, and the stationary statistics of
the stochastic samplers."""
import math

import numpy as np
import pytest
import torch

from fastdiff.gaussian import GaussianData, GaussianMixture, sliced_wasserstein
from fastdiff.samplers import Sampler, sample
from fastdiff.schedules import NoiseSchedule

F64 = torch.float64


# -- the closed-form models themselves ----------------------------------------------------

def test_gaussian_eps_is_minus_sigma_times_score(gen):
    mu = torch.randn(5, generator=gen, dtype=F64)
    g = GaussianData(mu, s=0.3 + torch.rand(1, generator=gen).item())
    x = torch.randn(7, 5, generator=gen, dtype=F64, requires_grad=True)
    a = torch.rand(7, generator=gen, dtype=F64) * 0.9 + 0.05
    s = (1 - a * a).sqrt()
    var = (a * a * g.s ** 2 + s * s)[:, None]
    logp = torch.distributions.Normal(a[:, None] * mu, var.sqrt()).log_prob(x).sum()
    score, = torch.autograd.grad(logp, x)
    torch.testing.assert_close(g.eps(x.detach(), a, s), -s[:, None] * score, rtol=1e-12, atol=1e-12)


def test_mixture_eps_is_minus_sigma_times_score(gen):
    K, D = 4, 3
    means = torch.randn(K, D, generator=gen, dtype=F64) * 2
    stds = torch.rand(K, generator=gen, dtype=F64) * 0.5 + 0.1
    w = torch.rand(K, generator=gen, dtype=F64) + 0.1
    mix = GaussianMixture(means, stds, w)
    x = torch.randn(6, D, generator=gen, dtype=F64, requires_grad=True)
    a = torch.rand(6, generator=gen, dtype=F64) * 0.9 + 0.05
    s = (1 - a * a).sqrt()
    comp = torch.distributions.Independent(torch.distributions.Normal(
        a[:, None, None] * means[None], (a[:, None] ** 2 * stds[None] ** 2 + s[:, None] ** 2).sqrt()[..., None]
        .expand(6, K, D)), 1)
    logp = torch.logsumexp(comp.log_prob(x[:, None]) + torch.log(w / w.sum())[None], dim=1).sum()
    score, = torch.autograd.grad(logp, x)
    torch.testing.assert_close(mix.eps(x.detach(), a, s), -s[:, None] * score, rtol=1e-10, atol=1e-10)


def test_x0_is_the_posterior_mean(gen):
    """x0(x) = (x - sigma eps(x)) / alpha (Tweedie), also for the mixture."""
    mix = GaussianMixture(torch.randn(3, 2, generator=gen, dtype=F64), [0.3, 0.5, 0.2])
    g = GaussianData(torch.randn(2, generator=gen, dtype=F64), 0.7)
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    a = torch.rand(5, generator=gen, dtype=F64) * 0.9 + 0.05
    s = (1 - a * a).sqrt()
    for data in (g, mix):
        torch.testing.assert_close(data.x0(x, a, s), (x - s[:, None] * data.eps(x, a, s)) / a[:, None])
    torch.testing.assert_close(g.x0(x, 0.0, 1.0), g.mu.expand(5, 2))  # finite at alpha = 0


def test_ode_map_composes_and_transports_the_marginal(gen):
    g = GaussianData(torch.randn(3, generator=gen, dtype=F64), s=0.4)
    p = [(0.1, math.sqrt(0.99)), (0.6, 0.8), (0.99, math.sqrt(1 - 0.99 ** 2))]
    x = g.noised(20000, *p[0], generator=gen)
    via = g.ode_map(g.ode_map(x, p[0], p[1]), p[1], p[2])
    torch.testing.assert_close(via, g.ode_map(x, p[0], p[2]), rtol=1e-12, atol=1e-12)
    y = g.ode_map(x, p[0], p[2])
    a, s = p[2]
    assert torch.allclose(y.mean(0), a * g.mu, atol=0.03)
    assert torch.allclose(y.std(0), g.marginal_std(a, s).expand(3), rtol=0.03)


def test_closed_form_model_prediction_types_agree(gen):
    schedule = NoiseSchedule.linear()
    g = GaussianData(0.5, 0.5, dim=4)
    x = torch.randn(3, 4, generator=gen, dtype=F64)
    t = torch.tensor([10, 500, 990])
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    eps = g.as_model(schedule)(x, t)
    torch.testing.assert_close(g.as_model(schedule, "sample")(x, t), (x - s * eps) / a)
    torch.testing.assert_close(g.as_model(schedule, "v_prediction")(x, t), a * eps - s * (x - s * eps) / a)


def test_data_samples_have_the_right_moments(gen):
    mix = GaussianMixture.ring(4, radius=3.0, std=0.2)
    x = mix.sample(8000, gen)
    assert x.shape == (8000, 2)
    assert x.mean(0).abs().max() < 0.15
    assert abs(x.norm(dim=1).mean().item() - 3.0) < 0.05
    assert sliced_wasserstein(x[:4000], x[4000:], generator=gen) < 0.15


# -- convergence to the exact ODE solution --------------------------------------------------

# Measured global order on a uniform-in-log-SNR grid. Multistep methods that start with a
# first-order step are limited to order 2 by that step (dpm++3m, dpm-solver order 3); UniPC
# gains one order from its corrector; PLMS/PNDM's fixed Adams weights assume equal steps,
# so on a non-uniform grid they are second order.
ORDERS = [
    ("ddim", {}, 1), ("euler", {}, 1),
    ("dpm++2m", {}, 2), ("dpm-solver", {}, 2), ("dpm++2s", {}, 2), ("heun", {}, 2),
    ("dpm++3m", {}, 2), ("dpm-solver", {"order": 3}, 2), ("plms", {}, 2), ("pndm", {}, 2),
    ("dpm++3s", {}, 3), ("dpm-solver-single", {"order": 3}, 3), ("unipc", {}, 3),
    ("unipc-bh1", {}, 3), ("unipc", {"order": 3}, 3), ("lms", {}, 3),
]


def _run(name, schedule, steps, model, x_T, **kw):
    # "logSNR_flat": every point uniform in lambda (singlestep DPM-Solver's "logSNR" spaces its
    # solver steps instead, so a final Euler group spans a whole step: order 2 when steps % 3 == 1)
    s = Sampler(name, schedule, steps, spacing="logSNR_flat", final_sigmas_type="sigma_min", **kw)
    x = s.init_noise(x_T)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x)
    return x, s


@pytest.mark.parametrize("name,kw,order", ORDERS, ids=[f"{n}{kw or ''}" for n, kw, _ in ORDERS])
def test_convergence_order_on_gaussian(name, kw, order, gen):
    """Error against the exact probability-flow ODE solution shrinks like steps^-order."""
    schedule = NoiseSchedule.vp_linear()
    g = GaussianData(torch.randn(4, generator=gen, dtype=F64) * 0.5, s=0.5)
    model = g.as_model(schedule)
    x_T = torch.randn(16, 4, generator=gen, dtype=F64)
    Ns, errs = [20, 40, 80, 160], []
    for N in Ns:
        x, s = _run(name, schedule, N, model, x_T, **kw)
        gr = s.grid
        exact = g.ode_map(x_T, (gr.alpha[0, 0], gr.sigma[0, 0]), (gr.alpha[0, -1], gr.sigma[0, -1]))
        if s.plan.sigma_space:
            exact = exact / gr.alpha[0, -1]  # the Euler family's state is x / alpha
        errs.append((x - exact).abs().max().item())
    slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert errs[-1] < errs[0]
    assert slope < -(order - 0.3), f"{name} {kw}: errors {errs}, fitted order {-slope:.2f} < {order}"


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "dpm++3s", "unipc", "euler", "heun", "lms", "dpm-solver"])
def test_prediction_types_are_equivalent_on_the_exact_model(name, gen):
    """epsilon / v / sample prediction of the same exact model give the same trajectory
    (the conversions are exact algebra)."""
    schedule = NoiseSchedule.vp_cosine()
    g = GaussianData(0.3, 0.6, dim=3)
    x_T = torch.randn(5, 3, generator=gen, dtype=F64)
    outs = [_run(name, schedule, 12, g.as_model(schedule, p), x_T, prediction_type=p)[0]
            for p in ("epsilon", "v_prediction", "sample")]
    for o in outs[1:]:  # float64 rounding, amplified where alpha is small
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


# -- stochastic samplers: statistics --------------------------------------------------------

# Ancestral samplers lose the posterior variance Var(x0 | x_t) of every skipped stretch
# (std 0.445 instead of 0.5 at 50 steps, 0.48 at 200), so they get 250 steps; the SDE
# solvers are accurate at 50.
@pytest.mark.parametrize("name,kw,steps", [("ddpm", {}, 250), ("ddim", {"eta": 1.0}, 250),
                                           ("euler-ancestral", {}, 250), ("dpm++sde-2m", {}, 50),
                                           ("dpm-solver-sde", {"final_sigmas_type": "sigma_min"}, 50)])
def test_stochastic_samplers_reach_the_data_distribution(name, kw, steps, gen):
    """Many samples from x ~ N(0, I) end with the data's mean and std (1-D Gaussian)."""
    schedule = NoiseSchedule.linear()
    mu, s_data = 1.0, 0.5
    g = GaussianData(mu, s_data, dim=1)
    n = 4000
    x = sample(g.as_model(schedule), (n, 1), schedule=schedule, sampler=name, steps=steps, generator=gen,
               progress=False, dtype=F64, **kw)
    se = s_data / math.sqrt(n)
    assert abs(x.mean().item() - mu) < 5 * se + 0.01, (x.mean(), x.std())
    assert abs(x.std().item() - s_data) < 0.035, (x.mean(), x.std())
    assert not torch.equal(x[0], x[1])


def test_mixture_sampled_by_every_ode_sampler_is_close(gen):
    """All modes hit, sliced W1 to the data near the finite-sample floor (2-D ring)."""
    mix = GaussianMixture.ring(8, 2.0, 0.15)
    schedule = NoiseSchedule.linear()
    n = 800
    x_T = torch.randn(n, 2, generator=gen)
    ref, ref2 = mix.sample(n, gen), mix.sample(n, gen)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    floor = sliced_wasserstein(ref2, ref, generator=torch.Generator().manual_seed(seed))
    for name in ("dpm++2m", "unipc", "heun", "euler-ancestral"):
        x = sample(mix.as_model(schedule), x_T=x_T, schedule=schedule, sampler=name, steps=25,
                   generator=gen, progress=False)
        sw = sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(seed))
        modes = torch.cdist(x.double(), mix.means).argmin(1).bincount(minlength=8)
        assert (modes > n / 8 * 0.6).all(), (name, modes)
        assert sw < 3 * floor + 0.03, (name, sw, floor)
