"""Flow matching, EDM, consistency (LCM, TCD, CM), inversion and parallel samplers against
the diffusers classes (same model, noise and timesteps), per-sample grids and seeds, and
convergence to the exact flow ODE solution of closed-form Gaussian models."""
import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import diffusers
import fastdiff
from fastdiff import NoiseSchedule, Sampler, invert, sample
from fastdiff.gaussian import GaussianData, GaussianMixture
from fastdiff.samplers.registry import FAMILIES, OWN_SCHEDULE, default_schedule
from test_samplers import Denoiser, unet  # noqa: F401  (the UNet fixture)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TOL = 2e-4  # max abs difference relative to max(1, the sample's scale)
F64 = torch.float64


# -- models: exact predictions of x0 ~ N(0, 0.5^2) plus a nonlinear term (and a UNet) -------

def _bview(t, x):
    return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _exact(x, a, s):
    """(eps, x0) of N(0, 0.25) data at x = a x0 + s eps (any path)."""
    v = 0.25 * a * a + s * s
    return s * x / v, 0.25 * a * x / v


class FlowModel(torch.nn.Module):
    """Velocity eps - x0 (or eps, or x0) on the flow path (model time s * T)."""

    def __init__(self, net=None, T=1000, pred="flow_prediction"):
        super().__init__()
        self.net, self.T, self.pred = net, T, pred

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=F64).reshape(-1).expand(x.shape[0])
        s = _bview(t / self.T, x)
        eps, x0 = _exact(x, 1 - s, s)
        out = {"flow_prediction": eps - x0, "epsilon": eps, "sample": x0}[self.pred] + 0.05 * torch.sin(3 * x)
        if self.net is not None:
            out = out + 0.1 * self.net(x, t.float()).sample
        return out


class EDMModel(torch.nn.Module):
    """EDM's preconditioned output F for an input c_in x at model time scale * log sigma,
    so that c_skip x + c_out F is the exact x0 (plus the nonlinear term)."""

    def __init__(self, sigma_data=0.5, pred="epsilon", scale=0.25, sigma_min=0.0, net=None):
        super().__init__()
        self.sd, self.sign, self.scale, self.smin, self.net = sigma_data, 1 if pred == "epsilon" else -1, scale, \
            sigma_min, net

    def forward(self, inp, t):
        t = torch.as_tensor(t, dtype=F64).reshape(-1).expand(inp.shape[0])
        sig = _bview(torch.exp(t / self.scale), inp)
        x = inp * torch.sqrt(sig ** 2 + self.sd ** 2)
        _, x0 = _exact(x, torch.ones_like(sig), sig)
        c_skip = self.sd ** 2 / ((sig - self.smin) ** 2 + self.sd ** 2)
        c_out = self.sign * (sig - self.smin) * self.sd / torch.sqrt(sig ** 2 + self.sd ** 2)
        out = (x0 - c_skip * x) / c_out + 0.05 * torch.sin(3 * inp)
        if self.net is not None:
            out = out + 0.1 * self.net(inp, t.float()).sample
        return out


def _vp(cls, config, net=None):
    return Denoiser(getattr(diffusers, cls)(**config).alphas_cumprod, config.get("prediction_type", "epsilon"), net)


def _model(cls, config, net=None):
    if cls.startswith("FlowMatch") or config.get("use_flow_sigmas"):
        return FlowModel(net, pred="flow_prediction" if cls.startswith("FlowMatch") else config["prediction_type"])
    if cls.startswith("EDM"):
        return EDMModel(config.get("sigma_data", 0.5), config.get("prediction_type", "epsilon"), net=net)
    if cls == "CMStochasticIterativeScheduler":
        return EDMModel(config.get("sigma_data", 0.5), scale=250.0, sigma_min=config.get("sigma_min", 0.002), net=net)
    return _vp(cls, config, net)


def _both(cls, config, steps, model, x_T, *, set_kw=None, step_kw=None, seed=None, over=None):
    """diffusers' loop and the fused Sampler's on the same model, noise and generator
    seed; returns (max abs diff over all states, scale of the diffusers sample)."""
    set_kw, step_kw, over = set_kw or {}, step_kw or {}, over or {}
    sched = getattr(diffusers, cls)(**config)
    sched.set_timesteps(steps, **set_kw)
    if "generator" not in inspect.signature(sched.step).parameters:
        seed = None  # a deterministic scheduler
    s = Sampler.from_diffusers(sched, steps, **set_kw, **over,
                               generator=None if seed is None else torch.Generator().manual_seed(seed))
    torch.testing.assert_close(s.timesteps.double(), sched.timesteps.double(), rtol=1e-6, atol=1e-5)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    x_ref = x_T * getattr(sched, "init_noise_sigma", 1.0)
    x = s.init_noise(x_T)
    worst = (x - x_ref).abs().max().item()
    with torch.no_grad():
        for t in sched.timesteps:
            inp_ref = sched.scale_model_input(x_ref, t) if hasattr(sched, "scale_model_input") else x_ref
            worst = max(worst, (s.scale_model_input(x, t) - inp_ref).abs().max().item())
            out = model(inp_ref, t)
            kw = dict(step_kw, generator=g) if g is not None else dict(step_kw)
            x_ref = sched.step(out, t, x_ref, **kw).prev_sample
            x = s.step(out, t, x)
            worst = max(worst, (x - x_ref).abs().max().item())
    assert torch.isfinite(x_ref).all()
    return worst, max(1.0, x_ref.abs().max().item())


FM, FH = "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"
DPM, DPMS, UNI = "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
MU = {"mu": 0.83}
# (class, config, set_timesteps kwargs, step kwargs, generator seed or None)
CASES = [
    (FM, {}, {}, {}, None),
    (FM, {"shift": 3.0}, {}, {}, None),
    (FM, {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, MU, {}, None),
    (FM, {"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.7}, {}, None),
    (FM, {"shift": 3.0, "use_karras_sigmas": True}, {}, {}, None),
    (FM, {"shift": 3.0, "use_exponential_sigmas": True}, {}, {}, None),
    (FM, {"shift": 3.0, "use_beta_sigmas": True}, {}, {}, None),
    (FM, {"shift": 2.0, "shift_terminal": 0.1}, {}, {}, None),
    (FM, {"use_dynamic_shifting": True, "shift_terminal": 0.05, "use_karras_sigmas": True}, MU, {}, None),
    (FM, {"invert_sigmas": True}, {}, {}, None),
    (FM, {"stochastic_sampling": True, "shift": 3.0}, {}, {}, 11),
    (FH, {}, {}, {}, None),
    (FH, {"shift": 3.0}, {}, {}, None),
    (FH, {"shift": 3.0}, {}, {"s_churn": 4.0, "s_tmin": 0.3, "s_tmax": 0.95, "s_noise": 1.02}, 21),
    (DPM, {**FLOW, "flow_shift": 3.0}, {}, {}, None),
    (DPM, {**FLOW, "flow_shift": 3.0, "solver_order": 3, "solver_type": "heun"}, {}, {}, None),
    (DPM, {**FLOW, "use_dynamic_shifting": True}, MU, {}, None),
    (DPM, {**FLOW, "flow_shift": 5.0, "algorithm_type": "sde-dpmsolver++"}, {}, {}, 12),
    (DPM, {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "sample"}, {}, {}, None),
    (DPMS, {**FLOW, "flow_shift": 3.0}, {}, {}, None),
    (UNI, {**FLOW, "flow_shift": 3.0}, {}, {}, None),
    (UNI, {**FLOW, "flow_shift": 3.0, "solver_order": 3}, {}, {}, None),
    (UNI, {"use_flow_sigmas": True, "prediction_type": "sample", "flow_shift": 3.0, "solver_type": "bh1",
           "final_sigmas_type": "sigma_min"}, {}, {}, None),
    (UNI, {**FLOW, "use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 2.0}, {}, None),
    (UNI, {**FLOW, "flow_shift": 3.0, "final_sigmas_type": "sigma_min", "shift_terminal": 0.05}, {}, {}, None),
    ("EDMEulerScheduler", {}, {}, {}, None),
    ("EDMEulerScheduler", {"sigma_schedule": "exponential", "sigma_data": 1.0}, {}, {}, None),
    ("EDMEulerScheduler", {"prediction_type": "v_prediction", "final_sigmas_type": "sigma_min", "rho": 5.0},
     {}, {}, None),
    ("EDMEulerScheduler", {}, {}, {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}, 13),
    ("EDMDPMSolverMultistepScheduler", {}, {}, {}, None),
    ("EDMDPMSolverMultistepScheduler", {"solver_order": 3, "sigma_schedule": "exponential"}, {}, {}, None),
    ("EDMDPMSolverMultistepScheduler", {"solver_type": "heun", "prediction_type": "v_prediction",
                                        "final_sigmas_type": "sigma_min"}, {}, {}, None),
    ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}, {}, 14),
    ("EulerDiscreteScheduler", {}, {}, {"s_churn": 3.0, "s_tmin": 0.2, "s_tmax": 8.0, "s_noise": 1.01}, 15),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction", "use_karras_sigmas": True}, {},
     {"s_churn": 1.0}, 16),
    ("CMStochasticIterativeScheduler", {}, {}, {}, 17),
    ("CMStochasticIterativeScheduler", {"clip_denoised": False, "num_train_timesteps": 18, "s_noise": 0.8},
     {}, {}, 17),
    ("LCMScheduler", {}, {}, {}, 18),
    ("LCMScheduler", {"prediction_type": "v_prediction", "original_inference_steps": 30,
                      "clip_sample": True, "clip_sample_range": 0.9}, {}, {}, 18),
    ("TCDScheduler", {}, {}, {}, 19),
    ("TCDScheduler", {"prediction_type": "sample"}, {}, {"eta": 0.0}, 19),
    ("TCDScheduler", {"original_inference_steps": 40}, {}, {"eta": 0.8}, 19),
    ("DDIMInverseScheduler", {"clip_sample": False}, {}, {}, None),
    ("DDIMInverseScheduler", {"timestep_spacing": "trailing", "clip_sample": False,
                              "prediction_type": "v_prediction", "set_alpha_to_one": False}, {}, {}, None),
    ("DPMSolverMultistepInverseScheduler", {}, {}, {}, None),
    ("DPMSolverMultistepInverseScheduler", {"timestep_spacing": "trailing", "solver_order": 3}, {}, {}, None),
    ("DPMSolverMultistepInverseScheduler", {"algorithm_type": "dpmsolver", "timestep_spacing": "leading",
                                            "steps_offset": 1}, {}, {}, None),
    ("DDIMParallelScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}, {}, None),
    ("DDPMParallelScheduler", {}, {}, {}, 20),
]
_STEP_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise", "eta")  # step() kwargs -> Sampler options


@pytest.mark.parametrize("steps", [4, 9])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parity_with_diffusers(case, steps, gen):
    cls, config, set_kw, step_kw, seed = CASES[case]
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    over = {k: v for k, v in step_kw.items() if k in _STEP_OPTIONS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err, scale = _both(cls, config, steps, _model(cls, config), x_T, set_kw=set_kw, step_kw=step_kw,
                           seed=seed, over=over)
    assert err <= TOL * scale, f"{cls} {config}: max abs diff {err:.3g} (scale {scale:.3g})"


UNET_CASES = [(FM, {"shift": 3.0}, {}), (FM, {"use_dynamic_shifting": True}, MU), (FH, {"shift": 3.0}, {}),
              (DPM, {**FLOW, "flow_shift": 3.0}, {}), (UNI, {**FLOW, "flow_shift": 3.0}, {}),
              ("EDMEulerScheduler", {}, {}), ("EDMDPMSolverMultistepScheduler", {"solver_order": 3}, {}),
              ("LCMScheduler", {}, {}), ("DDIMInverseScheduler", {"clip_sample": False}, {})]


@pytest.mark.parametrize("cls,config,set_kw", UNET_CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(UNET_CASES)])
def test_parity_with_diffusers_on_a_unet(cls, config, set_kw, unet, gen):
    x_T = torch.randn(2, 3, 8, 8, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen)) if cls == "LCMScheduler" else None
        err, scale = _both(cls, config, 5, _model(cls, config, unet), x_T, set_kw=set_kw, seed=seed)
    assert err <= TOL * scale, f"{cls} {config}: max abs diff {err:.3g} (scale {scale:.3g})"


# -- per-sample timesteps and seeds -------------------------------------------------------

def _loop(s, model, x_T, **kw):
    x = s.init_noise(x_T)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x, **kw)
    return x


@pytest.mark.parametrize("name,schedule,rows,pred", [
    ("flow-euler", NoiseSchedule.flow(), [[1000.0, 700.0, 420.5, 100.0], [990.0, 650.0, 300.0, 20.0]],
     "flow_prediction"),
    ("flow-heun", NoiseSchedule.flow(), [[1000.0, 700.0, 420.5, 100.0], [990.0, 650.0, 300.0, 20.0]],
     "flow_prediction"),
    ("dpm++2m", NoiseSchedule.flow(), [[999, 700, 420, 100], [990, 651, 300, 20]], "flow_prediction"),
    ("unipc", NoiseSchedule.flow(), [[999, 700, 420, 100], [990, 651, 300, 20]], "flow_prediction"),
    ("edm-euler", NoiseSchedule.edm(), [[1.09, 0.5, -0.3, -1.5], [1.0, 0.2, -0.6, -1.2]], "epsilon"),
    ("edm-dpm++2m", NoiseSchedule.edm(), [[1.09, 0.5, -0.3, -1.5], [1.0, 0.2, -0.6, -1.2]], "epsilon"),
    ("lcm", NoiseSchedule.scaled_linear(), [[999, 759, 499, 259], [979, 700, 459, 19]], "epsilon"),
    ("tcd", NoiseSchedule.scaled_linear(), [[999, 759, 499, 259], [979, 700, 459, 19]], "epsilon"),
])
def test_per_sample_timesteps_rows_equal_single_runs(name, schedule, rows, pred, gen):
    """A [B, N] timestep table gives each sample what it gets alone (same noise)."""
    if schedule.kind == "flow":
        model = FlowModel()
    elif schedule.kind == "edm":
        model = EDMModel()
    else:
        model = Denoiser(schedule.alphas_cumprod.numpy(), pred)
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    batch = Sampler(name, schedule, timesteps=torch.tensor(rows), prediction_type=pred)
    with torch.no_grad():
        both = _loop(batch, model, x_T, generator=[torch.Generator().manual_seed(seed + i) for i in range(2)])
        for i in range(2):
            alone = Sampler(name, schedule, timesteps=torch.tensor(rows[i]), prediction_type=pred)
            one = _loop(alone, model, x_T[i:i + 1], generator=[torch.Generator().manual_seed(seed + i)])
            torch.testing.assert_close(both[i:i + 1], one, rtol=1e-6, atol=1e-6, msg=f"{name} row {i}")


@pytest.mark.parametrize("name,schedule,kw", [
    ("flow-euler", NoiseSchedule.flow(shift=3.0), {"stochastic_sampling": True, "prediction_type": "flow_prediction"}),
    ("lcm", NoiseSchedule.scaled_linear(), {}), ("tcd", NoiseSchedule.scaled_linear(), {"eta": 0.5}),
    ("cm", default_schedule("cm"), {}), ("edm-dpm++sde-2m", NoiseSchedule.edm(), {}),
    ("edm-euler", NoiseSchedule.edm(), {"s_churn": 5.0}),
])
def test_seeds_give_batch_independent_samples(name, schedule, kw, gen):
    if schedule.kind == "flow":
        model = FlowModel()
    elif schedule.kind == "edm":
        model = EDMModel(scale=schedule.params["time_scale"],
                         sigma_min=schedule.params["sigma_min"] if name == "cm" else 0.0)
    else:
        model = Denoiser(schedule.alphas_cumprod.numpy())
    seeds = [int(v) for v in torch.randint(0, 2 ** 31, (3,), generator=gen)]
    with torch.no_grad():
        full = sample(model, (3, 2, 4, 4), schedule=schedule, sampler=name, steps=5, seeds=seeds, progress=False, **kw)
        one = sample(model, (1, 2, 4, 4), schedule=schedule, sampler=name, steps=5, seeds=seeds[1:2],
                     progress=False, **kw)
        other = sample(model, (1, 2, 4, 4), schedule=schedule, sampler=name, steps=5, seeds=[seeds[1] + 1],
                       progress=False, **kw)
    torch.testing.assert_close(full[1:2], one, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(one, other)  # the noise really comes from the seed


def test_new_samplers_run_on_their_default_schedules(gen):
    """Every flow / EDM / consistency name builds on its default schedule and samples finitely."""
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    for name, fam in FAMILIES.items():
        if fam.flavor not in OWN_SCHEDULE:
            continue
        sch = default_schedule(name)
        model = FlowModel() if sch.kind == "flow" else EDMModel(scale=sch.params["time_scale"])
        out = sample(model, x_T=x_T, sampler=name, steps=6, progress=False,
                     prediction_type="flow_prediction" if sch.kind == "flow" else "epsilon",
                     generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all(), name


# -- convergence to the exact flow ODE solution -------------------------------------------

def _flow_run(name, steps, model, x_T, shift=3.0):
    s = Sampler(name, NoiseSchedule.flow(shift=shift), steps, prediction_type="flow_prediction")
    return _loop(s, model, x_T), s.grid


@pytest.mark.parametrize("name,order", [("flow-euler", 1), ("flow-heun", 2)])
def test_flow_convergence_order_on_gaussian_data(name, order, gen):
    """Against the exact affine ODE map of Gaussian data (GaussianData.ode_map holds for any
    path x = a x0 + s eps)."""
    sch = NoiseSchedule.flow()
    g = GaussianData(torch.randn(4, generator=gen, dtype=F64) * 0.5, s=0.5)
    model = g.as_model(sch, "flow_prediction")
    x_T = torch.randn(16, 4, generator=gen, dtype=F64)
    Ns, errs = [10, 20, 40, 80], []
    for N in Ns:
        x, gr = _flow_run(name, N, model, x_T)
        exact = g.ode_map(x_T, (gr.alpha[0, 0], gr.sigma[0, 0]), (gr.alpha[0, -1], gr.sigma[0, -1]))
        errs.append((x - exact).abs().max().item())
    slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert slope < -(order - 0.2), f"{name}: errors {errs}, fitted order {-slope:.2f} < {order}"


@pytest.mark.parametrize("name,order", [("flow-euler", 1), ("flow-heun", 2)])
def test_flow_convergence_order_on_a_gaussian_mixture(name, order, gen):
    """Against a tight DOP853 solution of the mixture's exact velocity field dx/ds = v(x, s)."""
    mix = GaussianMixture(torch.randn(3, 2, generator=gen, dtype=F64), [0.3, 0.5, 0.4])
    sch = NoiseSchedule.flow()
    model = mix.as_model(sch, "flow_prediction")
    x_T = torch.randn(6, 2, generator=gen, dtype=F64)

    def rhs(s, y):
        x = torch.from_numpy(y).reshape(x_T.shape)
        return model(x, torch.full((x.shape[0],), s * sch.T, dtype=F64)).reshape(-1).numpy()

    # The order is the best one observed between successive grids: at the coarse end a
    # mixture's curved paths are not yet in the asymptotic range (Heun's successive error
    # ratios 2.4, 3.0 in some draws), and at the fine end the error can reach a floor of
    # ~3e-4 (ratio 3.1 from 40 to 80 steps in one draw), but a first-order method never
    # shows a ratio near 4.
    Ns, errs = [10, 20, 40, 80], []
    ref = None
    for N in Ns:
        x, gr = _flow_run(name, N, model, x_T)
        if ref is None:  # every grid starts at s = 1 and ends at s = 0
            sol = solve_ivp(rhs, (gr.sigma[0, 0], gr.sigma[0, -1]), x_T.reshape(-1).numpy(), method="DOP853",
                            rtol=1e-12, atol=1e-12)
            ref = torch.from_numpy(sol.y[:, -1]).reshape(x_T.shape)
        errs.append((x - ref).abs().max().item())
    observed = max(np.log(a / b) / np.log(m / n) for a, b, n, m in zip(errs, errs[1:], Ns, Ns[1:]))
    assert observed > order - 0.2, f"{name}: errors {errs}, best observed order {observed:.2f} < {order}"
    assert errs[-1] < errs[0] / 2 ** (2 * order), f"{name}: errors {errs} do not fall with the order"


def test_flow_prediction_conversions_are_exact(gen):
    """flow_prediction, epsilon and sample models of the same data give the same flow
    trajectory (x0 = x - s v, eps = x + (1 - s) v on the flow path)."""
    sch = NoiseSchedule.flow(shift=2.0)
    g = GaussianData(0.3, 0.6, dim=3)
    x_T = torch.randn(5, 3, generator=gen, dtype=F64)
    outs = []
    for p in ("flow_prediction", "epsilon", "sample"):
        # epsilon is undefined at s = 1 (alpha = 0): start just below it
        s = Sampler("flow-heun", sch, timesteps=torch.linspace(990, 10, 12, dtype=F64), prediction_type=p)
        outs.append(_loop(s, g.as_model(sch, p), x_T))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)  # float64 rounding, amplified near s = 1


# -- inversion ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls,config", [("DDIMInverseScheduler", {"clip_sample": False}),
                                        ("DPMSolverMultistepInverseScheduler", {"solver_order": 3})])
def test_invert_equals_diffusers_inversion(cls, config, gen):
    sched = getattr(diffusers, cls)(**config)
    model = _vp(cls, config)
    x0 = torch.randn(2, 3, 4, 4, generator=gen) * 0.5
    sched.set_timesteps(10)
    x = x0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        got = invert(model, x0, scheduler=sched, steps=10)
    assert (got - x).abs().max() <= TOL * max(1.0, x.abs().max().item())


def test_invert_then_sample_returns_the_data(gen):
    """DDIM inversion followed by DDIM sampling on the same grid recovers x0, better with
    more steps (the exact model: the ODE is then inverted up to discretisation error)."""
    sch = NoiseSchedule.linear()
    g = GaussianData(0.2, 0.5, dim=6)
    model = g.as_model(sch)
    x0 = g.sample(8, gen)
    errs = []
    for steps in (25, 100):
        z = invert(model, x0, schedule=sch, steps=steps, spacing="leading", steps_offset=1)
        back = sample(model, x_T=z, schedule=sch, sampler="ddim", steps=steps, spacing="leading", steps_offset=1,
                      progress=False)
        errs.append((back - x0).abs().max().item())
    # fresh data each run: 100 steps at least halve the 25-step error (measured 4x)
    assert errs[1] < errs[0] / 2 and errs[1] < 0.1, errs


# -- errors ---------------------------------------------------------------------------------

def test_bad_combinations_are_refused():
    flow, vp = NoiseSchedule.flow(), NoiseSchedule.linear()
    with pytest.raises(ValueError, match="need a flow schedule"):
        Sampler("flow-euler", vp, 5)
    with pytest.raises(ValueError, match="not defined on a flow-matching schedule"):
        Sampler("euler", flow, 5)
    with pytest.raises(ValueError, match="needs mu"):
        Sampler("flow-euler", NoiseSchedule.flow(use_dynamic_shifting=True), 5)
    with pytest.raises(ValueError, match="mu .* need a flow schedule"):
        Sampler("dpm++2m", vp, 5, mu=0.5)
    with pytest.raises(ValueError, match="NoiseSchedule.edm"):
        Sampler("edm-euler", vp, 5)
    with pytest.raises(ValueError, match="s_churn cannot be combined"):
        Sampler("euler", vp, 5, s_churn=1.0, clip_sample=True)
    with pytest.raises(ValueError, match="invert: sampler must be one of"):
        invert(lambda x, t: x, torch.randn(2, 3), sampler="ddim")
    with pytest.raises(ValueError, match="invert needs an inverse scheduler"):
        invert(lambda x, t: x, torch.randn(2, 3), scheduler=diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="shift must be a positive"):
        NoiseSchedule.flow(shift=0.0)
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min' with flow sigmas"):
        Sampler.from_diffusers(diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True,
                                                                     final_sigmas_type="sigma_min"), 5)
    with pytest.raises(ValueError, match="UniPCMultistepScheduler: config option use_karras_sigmas"):
        Sampler.from_diffusers(diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, use_karras_sigmas=True), 5)
    with pytest.raises(ValueError, match="TCDScheduler: config option clip_sample"):
        Sampler.from_diffusers(diffusers.TCDScheduler(clip_sample=True), 5)


def test_flow_and_edm_schedules_round_trip_and_describe_their_path(gen):
    for sch in (NoiseSchedule.flow(shift=3.0, use_dynamic_shifting=True, shift_terminal=0.1),
                NoiseSchedule.edm(0.01, 50.0, 5.0, "exponential")):
        assert NoiseSchedule.from_dict(sch.to_dict()) == sch
    sch = NoiseSchedule.flow()
    t = torch.rand(7, generator=gen, dtype=F64) * 1000
    torch.testing.assert_close(sch.alpha(t) + sch.sigma(t), torch.ones(7, dtype=F64))
    torch.testing.assert_close(sch.lambda_(t), torch.log(sch.alpha(t) / sch.sigma(t)))
    # Flux's mu is linear in the token count between the configured end points
    assert math.isclose(sch.mu_for(256), 0.5) and math.isclose(sch.mu_for(4096), 1.15)
    edm = NoiseSchedule.edm()  # model time 0.25 log sigma
    assert math.isclose(edm.sigma_edm(0.3).item(), math.exp(1.2)) and math.isclose(edm.lambda_(0.3).item(), -1.2)


@pytest.mark.parametrize("name", ["lcm", "tcd", "ddim-inverse", "dpm++2m-inverse"])
def test_time_sharing_on_the_discrete_vp_families(name, gen):
    """E-TSDM: the network's time input is f(t) on these VP-time samplers, the update keeps t."""
    sch = NoiseSchedule.scaled_linear()
    ts = fastdiff.TimeSharing(100, 5)
    model = Denoiser(sch.alphas_cumprod.numpy())
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    shared = Sampler(name, sch, 12, time_sharing=ts)
    plain = Sampler(name, sch, 12)
    seen = []
    x, y = shared.init_noise(x_T), plain.init_noise(x_T)
    for k, t in enumerate(shared.timesteps):
        tt = shared.model_time(2)
        seen.append(tt[0].item())
        assert torch.equal(tt, ts(t.expand(2)))
        out = model(x, t)  # the same model output: only the network's time input differs
        g1, g2 = torch.Generator().manual_seed(k), torch.Generator().manual_seed(k)
        x, y = shared.step(out, t, x, generator=g1), plain.step(out, t, y, generator=g2)
    assert torch.equal(x, y)
    assert any(v != t for v, t in zip(seen, shared.timesteps.tolist()))  # some time was shared


def _random_case(gen):
    """A configuration no test names: random class, shift / mu / options, step count."""
    r = lambda: torch.rand(1, generator=gen).item()  # noqa: E731
    pick = lambda xs: xs[int(torch.randint(0, len(xs), (1,), generator=gen))]  # noqa: E731
    cls = pick([FM, FH, DPM, UNI, "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "LCMScheduler",
                "TCDScheduler"])
    set_kw, step_kw, seed = {}, {}, int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    if cls == FM:
        config = {"shift": 0.5 + 5 * r(), pick(["use_karras_sigmas", "use_exponential_sigmas", "invert_sigmas",
                                                  "stochastic_sampling", "none"]): True}
        config.pop("none", None)
        if r() < 0.4:
            config = {"use_dynamic_shifting": True, "time_shift_type": pick(["exponential", "linear"])}
            set_kw = {"mu": 0.3 + r() if config["time_shift_type"] == "exponential" else 0.5 + 3 * r()}
    elif cls == FH:
        config = {"shift": 0.5 + 5 * r()}
    elif cls in (DPM, UNI):
        config = {**FLOW, "flow_shift": 0.5 + 5 * r(), "solver_order": pick([1, 2, 3])}
    elif cls.startswith("EDM"):
        config = {"sigma_min": 0.001 + 0.01 * r(), "sigma_max": 20 + 80 * r(), "rho": 3 + 6 * r(),
                  "sigma_data": 0.3 + r(), "sigma_schedule": pick(["karras", "exponential"])}
        if cls == "EDMEulerScheduler" and r() < 0.5:
            step_kw = {"s_churn": 5 * r(), "s_tmin": 0.01, "s_tmax": 30.0}
    else:
        config = {"original_inference_steps": pick([20, 50, 100]), "prediction_type": pick(["epsilon",
                                                                                               "v_prediction"])}
        if cls == "TCDScheduler":
            step_kw = {"eta": r()}
    return cls, config, set_kw, step_kw, seed, pick([3, 6, 11])


def test_parity_on_random_configurations(gen):
    """Three configurations drawn fresh each run (printed on failure with the seed)."""
    for _ in range(3):
        cls, config, set_kw, step_kw, seed, steps = _random_case(gen)
        x_T = torch.randn(2, 3, 4, 4, generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            err, scale = _both(cls, config, steps, _model(cls, config), x_T, set_kw=set_kw, step_kw=step_kw,
                               seed=seed, over={k: v for k, v in step_kw.items() if k in _STEP_OPTIONS})
        assert err <= TOL * scale, f"{cls} {config} {set_kw} {step_kw} {steps} steps: max abs diff {err:.3g}"


@pytest.mark.parametrize("cls,config", [(FM, {"use_dynamic_shifting": True}), (FM, {"shift": 3.0, "shift_terminal": 0.1}),
                                        (UNI, {**FLOW, "use_dynamic_shifting": True})])
def test_explicit_sigmas_as_flux_pipelines_pass_them(cls, config, gen):
    """FluxPipeline calls set_timesteps(sigmas=linspace(1, 1/N, N), mu=...): the same sigmas
    through ``sigmas=`` give diffusers' trajectory."""
    N = 7
    set_kw = {"sigmas": np.linspace(1.0, 1 / N, N), "mu": 0.4 + torch.rand(1, generator=gen).item()}
    if not config.get("use_dynamic_shifting"):
        del set_kw["mu"]
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    err, scale = _both(cls, config, N, _model(cls, config), x_T, set_kw=set_kw)
    assert err <= TOL * scale, f"{cls} {config}: max abs diff {err:.3g}"
