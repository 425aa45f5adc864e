"""The DEIS, SA-Solver, KDPM2 (+ ancestral), DPM-Solver++ SDE, IPNDM and cosine DPM-Solver
samplers, the exponential / beta / lu noise-level grids and DPM-Solver's own time grids:
parity with diffusers' classes (same model, noise and timesteps), per-sample timesteps and
seeds, and convergence orders on a Gaussian mixture against a tight ODE reference."""
import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import diffusers
from fastdiff import TimeSharing
from fastdiff.gaussian import GaussianMixture
from fastdiff.samplers import SAMPLERS, Sampler, sample
from fastdiff.samplers.dpm import singlestep_orders
from fastdiff.samplers.from_diffusers import SUPPORTED
from fastdiff.schedules import NoiseSchedule
from test_samplers import Denoiser, diffusers_loop, fastdiff_loop

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

RTOL = 2e-4  # of the sample's scale (max(1, max |x|)), the bar


class AngleDenoiser(torch.nn.Module):
    """Denoiser's exact-plus-nonlinear prediction on the angle schedule alpha = cos(pi t / 2)
    (the model time of IPNDM and of the cosine DPM-Solver)."""

    def __init__(self, prediction_type="v_prediction"):
        super().__init__()
        self.prediction_type = prediction_type

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        a = torch.cos(t * math.pi / 2).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        s = torch.sin(t * math.pi / 2).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        v = 0.25 * a * a + s * s
        eps, x0 = s * x / v, 0.25 * a * x / v
        pred = {"epsilon": eps, "v_prediction": a * eps - s * x0}[self.prediction_type]
        return pred + 0.05 * torch.sin(3 * x)


def _model(sched, pred):
    if hasattr(sched, "alphas_cumprod"):
        return Denoiser(sched.alphas_cumprod, pred)
    return AngleDenoiser(pred)


def _parity(cls, config, steps, gen):
    sched = getattr(diffusers, cls)(**config)
    pred = config.get("prediction_type", {"IPNDMScheduler": "v_prediction",
                                          "CosineDPMSolverMultistepScheduler": "v_prediction"}.get(cls, "epsilon"))
    model = _model(sched, pred)
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    g1 = g2 = None
    if "generator" in inspect.signature(sched.step).parameters:
        seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_t = diffusers_loop(sched, steps, model, x_T, g1)
        out, out_t = fastdiff_loop(sched, steps, model, x_T, g2)
    # Fractional midpoint times are float64 in diffusers' KDPM2 / SDE, float32 here.
    torch.testing.assert_close(out_t.double(), ref_t.double(), rtol=1e-6, atol=2e-4)
    assert torch.isfinite(ref).all()
    err, scale = (out - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert err <= RTOL * scale, f"{cls} {config} {steps} steps: max abs diff {err:.3g} (scale {scale:.3g})"


def _zero_tau(t):
    return 0.0


PARITY = [
    ("DEISMultistepScheduler", {}),
    ("DEISMultistepScheduler", {"solver_order": 3}),
    ("DEISMultistepScheduler", {"solver_order": 1, "prediction_type": "v_prediction"}),
    ("DEISMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True, "timestep_spacing": "trailing"}),
    ("DEISMultistepScheduler", {"use_exponential_sigmas": True, "prediction_type": "sample"}),
    ("DEISMultistepScheduler", {"thresholding": True, "sample_max_value": 1.2, "lower_order_final": False,
                                "timestep_spacing": "leading", "steps_offset": 1}),
    ("SASolverScheduler", {}),
    ("SASolverScheduler", {"tau_func": _zero_tau, "predictor_order": 3, "corrector_order": 4}),
    ("SASolverScheduler", {"predictor_order": 1, "corrector_order": 1, "prediction_type": "v_prediction"}),
    ("SASolverScheduler", {"algorithm_type": "noise_prediction", "tau_func": _zero_tau, "predictor_order": 3,
                           "corrector_order": 3}),
    ("SASolverScheduler", {"predictor_order": 4, "use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    # (beta sigmas and thresholding apart: together, the per-sample quantile clamp near
    # beta sigmas' crowded levels amplified rounding to 3e-4 of the scale in one draw)
    ("SASolverScheduler", {"use_beta_sigmas": True}),
    ("SASolverScheduler", {"thresholding": True, "sample_max_value": 1.5}),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    ("KDPM2DiscreteScheduler", {"use_beta_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {"use_exponential_sigmas": True, "prediction_type": "v_prediction",
                                         "timestep_spacing": "trailing"}),
    ("DPMSolverSDEScheduler", {"noise_sampler_seed": 123}),
    ("DPMSolverSDEScheduler", {"noise_sampler_seed": 7, "use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    ("DPMSolverSDEScheduler", {"noise_sampler_seed": 5, "use_exponential_sigmas": True,
                               "timestep_spacing": "trailing"}),
    ("IPNDMScheduler", {}),
    ("CosineDPMSolverMultistepScheduler", {}),
    ("CosineDPMSolverMultistepScheduler", {"sigma_schedule": "karras", "solver_type": "heun",
                                           "prediction_type": "epsilon"}),
    ("CosineDPMSolverMultistepScheduler", {"solver_order": 1, "sigma_data": 0.5, "sigma_max": 80.0}),
    # the noise-level options the existing classes gained
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True, "solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True, "prediction_type": "v_prediction"}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True, "beta_schedule": "squaredcos_cap_v2"}),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverSinglestepScheduler", {"use_exponential_sigmas": True}),
    ("DPMSolverSinglestepScheduler", {"use_beta_sigmas": True, "solver_order": 3}),
    ("UniPCMultistepScheduler", {"use_exponential_sigmas": True}),
    ("UniPCMultistepScheduler", {"use_beta_sigmas": True, "solver_order": 3}),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    ("EulerDiscreteScheduler", {"use_beta_sigmas": True, "timestep_spacing": "trailing"}),
    ("HeunDiscreteScheduler", {"use_exponential_sigmas": True, "prediction_type": "v_prediction"}),
    ("LMSDiscreteScheduler", {"use_beta_sigmas": True}),
]


@pytest.mark.parametrize("cls,config", PARITY, ids=[f"{c}-{i}" for i, (c, _) in enumerate(PARITY)])
def test_parity_with_diffusers(cls, config, gen):
    for steps in (6, 13):
        _parity(cls, config, steps, gen)


# -- which diffusers classes are supported -------------------------------------------------

def _scheduler_classes():
    # Only "*Scheduler" names: getattr on every name would import every pipeline.
    names = [n for n in dir(diffusers) if n.endswith("Scheduler")]
    return sorted((n, getattr(diffusers, n)) for n in names
                  if inspect.isclass(getattr(diffusers, n)) and issubclass(getattr(diffusers, n), diffusers.SchedulerMixin))


def test_supported_diffusers_scheduler_count():
    """Sampler.from_diffusers on every diffusers scheduler class's default config: the
    supported ones build and run, every other one raises a ValueError naming the class and
    saying why (classes that need constructor arguments are checked without a config)."""
    supported, refused = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in _scheduler_classes():
            try:
                sched = cls()
            except TypeError:  # required constructor arguments: the class name decides
                sched = cls.__new__(cls)
            try:
                s = Sampler.from_diffusers(sched, 4)
            except ValueError as e:
                msg = str(e)
                assert name in msg and "not supported:" in msg, msg
                assert len(msg.split("not supported:")[1].split(". Supported")[0].strip()) > 10, msg
                refused.append(name)
                continue
            x = s.init_noise(torch.randn(1, 2, 3))
            for t in s.timesteps:
                x = s.step(torch.randn(1, 2, 3), t, x)
            assert torch.isfinite(x).all(), name
            supported.append(name)
    print(f"\nsupported diffusers scheduler classes: {len(supported)} of {len(supported) + len(refused)}: "
          f"{', '.join(supported)}\nrefused: {', '.join(refused)}")
    assert set(supported) == set(SUPPORTED) & {n for n, _ in _scheduler_classes()}
    assert len(supported) >= 28


@pytest.mark.parametrize("cls,config,key", [
    ("DPMSolverSDEScheduler", {"prediction_type": "sample"}, "prediction_type"),
    ("UniPCMultistepScheduler", {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
     "final_sigmas_type"),
    ("KDPM2DiscreteScheduler", {"prediction_type": "sample"}, "prediction_type"),
    ("IPNDMScheduler", {"trained_betas": [0.5] * 5}, "trained_betas"),
    ("CosineDPMSolverMultistepScheduler", {"rho": 5.0}, "rho"),
])
def test_options_that_cannot_be_honoured_are_refused(cls, config, key):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = getattr(diffusers, cls)(**config)
    with pytest.raises(ValueError, match=f"{cls}: config option {key}"):
        Sampler.from_diffusers(sched, 6)


# -- per-sample timesteps and seeds; time sharing ------------------------------------------

NEW = ["deis", "deis-3", "sa-solver", "kdpm2", "kdpm2-ancestral", "dpm++sde", "ipndm", "cosine-dpm"]
STOCHASTIC = ["sa-solver", "kdpm2-ancestral", "dpm++sde", "cosine-dpm"]


def _run(s, model, x_T, generator=None):
    x = s.init_noise(x_T)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x, generator=generator)
    return x


def test_every_new_name_is_registered():
    assert set(NEW) <= set(SAMPLERS)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seeds_give_batch_independent_noise(name, gen):
    """With seeds= sample i's noise (normal or Brownian-tree) depends only on seed i."""
    schedule = NoiseSchedule.linear()
    model = _model(diffusers.DDPMScheduler(), "v_prediction" if name == "cosine-dpm" else "epsilon")
    x_T = torch.randn(3, 2, 4, 4, generator=gen)
    seeds = [int(v) for v in torch.randint(0, 2 ** 31, (3,), generator=gen)]
    kw = dict(prediction_type="v_prediction") if name == "cosine-dpm" else {}
    with torch.no_grad():
        full = _run(Sampler(name, schedule, 7, seeds=seeds, **kw), model, x_T)
        alone = _run(Sampler(name, schedule, 7, seeds=seeds[1:2], **kw), model, x_T[1:2])
        again = _run(Sampler(name, schedule, 7, seeds=seeds, **kw), model, x_T)
        other = _run(Sampler(name, schedule, 7, seeds=[seeds[0] + 1] + seeds[1:], **kw), model, x_T)
    torch.testing.assert_close(full[1:2], alone, rtol=0, atol=1e-6)
    assert torch.equal(full, again)
    assert not torch.allclose(full[0], other[0])  # the noise does enter
    # sample() with seeds= draws the same (one generator per sample)
    out = sample(model, x_T=x_T, schedule=schedule, sampler=name, steps=7, seeds=seeds, progress=False, **kw)
    torch.testing.assert_close(out[1:2], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["deis-3", "sa-solver", "kdpm2", "kdpm2-ancestral", "dpm++sde", "ipndm"])
def test_per_sample_timesteps_match_single_rows(name, gen):
    """A [B, N] timestep grid gives each sample what its own row gives alone."""
    schedule = NoiseSchedule.linear()
    if name == "ipndm":
        rows = [np.linspace(1.0, 0.02, 6), np.linspace(0.9, 0.05, 6) ** 1.3]
        model = AngleDenoiser("epsilon")
    else:
        rows = [np.linspace(999, 10, 6).round(), np.linspace(950.5, 3.25, 6)]
        model = _model(diffusers.DDPMScheduler(), "epsilon")
    x_T = torch.randn(2, 2, 4, 4, generator=gen)
    seeds = [int(v) for v in torch.randint(0, 2 ** 31, (2,), generator=gen)]
    with torch.no_grad():
        both = _run(Sampler(name, schedule, timesteps=np.stack(rows), seeds=seeds), model, x_T)
        for r in range(2):
            one = _run(Sampler(name, schedule, timesteps=rows[r], seeds=seeds[r:r + 1]), model, x_T[r:r + 1])
            torch.testing.assert_close(both[r:r + 1], one, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["deis", "sa-solver", "kdpm2", "dpm++sde"])
def test_time_sharing_feeds_the_shared_time(name):
    """E-TSDM: the network sees f(t), the update keeps the true schedule."""
    ts = TimeSharing(t_tilde=300, n=3)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return 0.1 * x
    s = Sampler(name, NoiseSchedule.linear(), 8, time_sharing=ts)
    sample(model, x_T=torch.randn(2, 3), sampler=s, progress=False, generator=torch.Generator().manual_seed(0))
    want = ts(s.timesteps.reshape(len(s), -1))
    assert len(seen) == len(s)
    for k, t in enumerate(seen):
        torch.testing.assert_close(t.double(), want[k].double().expand(2))
    assert (s.timesteps < 300).any() and not torch.equal(want[:, 0].double(), s.timesteps.double())


@pytest.mark.parametrize("name", ["pndm", "dpm-solver-sde", "dpm++sde-2m", "dpm++2m", "ddpm"])
def test_an_integer_row_gets_what_it_gets_alone(name, gen):
    """Mixing an all-integer timestep row with a fractional one must not change the integer
    row (the integer / fractional decision is made per row)."""
    schedule = NoiseSchedule.linear()
    model = _model(diffusers.DDPMScheduler(), "epsilon")
    rows = np.stack([np.linspace(999, 20, 6).round(), np.linspace(990.5, 10.25, 6)])
    x_T = torch.randn(2, 2, 4, 4, generator=gen)
    seeds = [int(v) for v in torch.randint(0, 2 ** 31, (2,), generator=gen)]
    with torch.no_grad():
        both = _run(Sampler(name, schedule, timesteps=rows, seeds=seeds), model, x_T)
        alone = _run(Sampler(name, schedule, timesteps=rows[0], seeds=seeds[:1]), model, x_T[:1])
    torch.testing.assert_close(both[:1], alone, rtol=0, atol=1e-6)


# -- DPM-Solver's own time grids -------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["time_uniform", "time_quadratic", "logSNR"])
def test_dpm_solver_time_grids_on_a_discrete_schedule(spacing):
    """The official DPM-Solver's grids on a discrete schedule: continuous time
    t = (index + 1) / T from 1 to 1 / T, spaced uniformly in t, sqrt(t) or lambda, with
    log alpha piecewise linear in t; the network gets the fractional index."""
    schedule = NoiseSchedule.scaled_linear()
    s = Sampler("dpm++2m", schedule, 9, spacing=spacing, final_sigmas_type="sigma_min")
    g = s.grid
    t_cont = torch.from_numpy(np.append(g.t[0], g.t_end[0]) + 1) / schedule.T
    assert t_cont[0].item() == pytest.approx(1.0) and t_cont[-1].item() == pytest.approx(1 / schedule.T)
    if spacing == "time_uniform":
        np.testing.assert_allclose(np.diff(t_cont.numpy()), -(1 - 1 / schedule.T) / 9, rtol=1e-9)
    elif spacing == "time_quadratic":
        np.testing.assert_allclose(np.diff(t_cont.sqrt().numpy()), np.diff(t_cont.sqrt().numpy())[0], rtol=1e-9)
    else:
        np.testing.assert_allclose(np.diff(g.lam[0]), np.diff(g.lam[0])[0], rtol=1e-9)
    np.testing.assert_allclose(g.alpha[0], schedule.marginal_alpha(t_cont).numpy(), rtol=1e-12)
    assert s.timesteps.dtype == torch.float32  # fractional indices in general (not for time_uniform here)
    torch.testing.assert_close(s.timesteps.double(), torch.from_numpy(g.t[0]).float().double())


def test_singlestep_logsnr_grid_is_built_as_the_official_code():
    """K solver steps uniform in lambda, each group's points uniform inside it; the old
    grid (all points uniform) stays available as "logSNR_flat"."""
    schedule = NoiseSchedule.vp_linear()
    for name, order, N in (("dpm++3s", 3, 7), ("dpm++2s", 2, 9), ("dpm-solver-single", 3, 8)):
        s = Sampler(name, schedule, N, spacing="logSNR", order=order, final_sigmas_type="sigma_min")
        flat = Sampler(name, schedule, N, spacing="logSNR_flat", order=order, final_sigmas_type="sigma_min")
        lam = s.grid.lam[0]
        np.testing.assert_allclose(np.diff(flat.grid.lam[0]), np.diff(flat.grid.lam[0])[0], rtol=1e-9)
        orders = singlestep_orders(N, order, True, False)
        starts = [k for k, o in enumerate(orders) if o == 1] + [N]
        outer = lam[starts]
        np.testing.assert_allclose(np.diff(outer), np.diff(outer)[0], rtol=1e-9)
        for a, b in zip(starts[:-1], starts[1:]):
            np.testing.assert_allclose(np.diff(lam[a:b + 1]), (outer[1] - outer[0]) / (b - a), rtol=1e-9)
        assert lam[0] == pytest.approx(flat.grid.lam[0, 0]) and lam[-1] == pytest.approx(flat.grid.lam[0, -1])
        assert len({len(range(a, b)) for a, b in zip(starts[:-1], starts[1:])}) > 1  # groups differ: grids differ
        assert not np.allclose(lam, flat.grid.lam[0])


@pytest.mark.parametrize("name", ["dpm++2m", "dpm++3m", "dpm-solver", "dpm++2s", "dpm++3s", "dpm-solver-single"])
def test_taylor_is_heun(name, gen):
    """The official code's solver_type "taylor" is the same update as "heun" everywhere."""
    schedule = NoiseSchedule.linear()
    kw = dict(final_sigmas_type="sigma_min")
    a = Sampler(name, schedule, 9, solver_type="heun", **kw)
    b = Sampler(name, schedule, 9, solver_type="taylor", **kw)
    for ca, cb in zip(a.plan.calls, b.plan.calls):
        assert np.array_equal(ca.op.coeffs.array, cb.op.coeffs.array)


# -- convergence orders on a Gaussian mixture ----------------------------------------------

def _mixture_reference(mix, x, lam0, lam1):
    """The probability-flow ODE dx/dlambda = alpha (x0(x) - alpha x) (VP, lambda = log
    alpha / sigma) solved to 1e-12 by scipy's DOP853: the exact solution for this test."""
    n = x.shape[0]

    def f(lam, y):
        a = 1.0 / math.sqrt(1.0 + math.exp(-2.0 * lam))
        xx = torch.from_numpy(y.reshape(x.shape))
        x0 = mix.x0(xx, torch.full((n,), a, dtype=torch.float64), torch.full((n,), a * math.exp(-lam),
                                                                               dtype=torch.float64))
        return (a * (x0 - a * xx)).reshape(-1).numpy()
    sol = solve_ivp(f, (lam0, lam1), x.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    return torch.from_numpy(sol.y[:, -1].reshape(x.shape))


# Measured global orders (logSNR grid; IPNDM on its own grid; the existing DPM-Solver++ and
# UniPC as a check of the reference, with UniPC's corrector adding one order): DEIS k has order k (its
# first steps ramp up, the asymptotic rate is k); SA-Solver's corrector adds one order to a
# predictor of order p up to the corrector's order; IPNDM's Adams-Bashforth weights assume
# equal steps, so on its grid (quadratic in t near t = 0) it is about second order: the
# fitted order ranged 1.6-3.1 over random mixtures, so the test asks for 1.5.
CONVERGENCE = [
    ("deis", {"order": 1}, 1), ("deis", {"order": 2}, 2), ("deis", {"order": 3}, 3),
    ("sa-solver", {"tau": 0.0, "predictor_order": 2, "corrector_order": 2}, 2),
    ("sa-solver", {"tau": 0.0, "predictor_order": 3, "corrector_order": 3}, 3),
    ("kdpm2", {}, 2), ("ipndm", {}, 1.5),
    ("dpm++2m", {}, 2), ("unipc", {}, 3),
]


@pytest.mark.parametrize("name,kw,order", CONVERGENCE, ids=[f"{n}{kw}" for n, kw, _ in CONVERGENCE])
def test_convergence_order_on_a_gaussian_mixture(name, kw, order, gen, one_thread):
    """Error against the exact ODE solution shrinks like steps^-order as steps double. The
    mixture is centred: IPNDM (as diffusers) takes the data estimate at alpha = 0 as 0."""
    means = 0.6 * torch.randn(3, 2, generator=gen, dtype=torch.float64)
    mix = GaussianMixture(means - means.mean(0), [0.6, 0.7, 0.8])
    schedule = NoiseSchedule.vp_linear()
    x_T = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    if name == "ipndm":
        def model(x, t):
            t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
            return mix.eps(x, torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2))
    else:
        model = mix.as_model(schedule)
    # IPNDM's error reaches a ~3e-5 floor (its last steps into sigma = 0) past 64 steps
    Ns, errs, ref = ([8, 16, 32, 64] if name == "ipndm" else [20, 40, 80, 160]), [], None
    for N in Ns:
        if name == "ipndm":
            s = Sampler(name, schedule, N)
        else:
            # all points uniform in lambda (singlestep's "logSNR" would end some N on an Euler group)
            s = Sampler(name, schedule, N, spacing="logSNR_flat", final_sigmas_type="sigma_min", **kw)
        x = _run(s, model, x_T)
        if ref is None:  # the same end points for every N
            lam = s.grid.lam[0]
            ref = _mixture_reference(mix, x_T, max(lam[0], -30.0), min(lam[-1], 30.0))
            if s.plan.sigma_space:
                ref = ref / s.grid.alpha[0, -1]
        errs.append((x - ref).abs().max().item())
    slope = np.polyfit(np.log(Ns[1:]), np.log(errs[1:]), 1)[0]  # the asymptotic rate
    assert errs[-1] < errs[0] / 2 ** order
    assert slope < -(order - 0.3), f"{name} {kw}: errors {errs}, fitted order {-slope:.2f} < {order}"
