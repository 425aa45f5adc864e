"""Noise schedules and timestep spacings against diffusers and DPM-Solver's formulas.

Random inputs come from conftest's freshly seeded ``gen`` fixture (seed printed on failure).
"""
import json
import math
import warnings

import numpy as np
import pytest
import torch

from fastdiff.schedules import NoiseSchedule, diffusers_timesteps, rescale_zero_terminal_snr

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CONFIGS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": SD,
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
STEPS = (1, 7, 10, 25, 50, 999)
# diffusers' own numpy-2 deprecation noise (np.array on a tensor), not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")


def _quiet(cls, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kw)


# -- betas / alphas_cumprod ------------------------------------------------------------

@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_betas_and_alphas_cumprod_equal_diffusers(name, rescale):
    ref = DDIMScheduler(**CONFIGS[name], rescale_betas_zero_snr=rescale)
    ours = NoiseSchedule.from_diffusers(ref)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    assert torch.equal(ours.betas, ref.betas.double())
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod.double())
    assert ours.zero_terminal_snr == rescale
    named = {
        "linear": lambda: NoiseSchedule.linear(rescale_zero_terminal_snr=rescale),
        "scaled_linear": lambda: NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=rescale),
        "squaredcos_cap_v2": lambda: NoiseSchedule.cosine(rescale_zero_terminal_snr=rescale),
    }[name]()
    assert torch.equal(named.alphas_cumprod, ours.alphas_cumprod)
    assert named.T == 1000 and not named.continuous


def test_zero_snr_rescale_follows_lin_et_al():
    base = NoiseSchedule.scaled_linear()
    z = NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=True)
    s, s_new = base.alphas_cumprod.sqrt(), z.alphas_cumprod.sqrt()
    expected = (s - s[-1]) * s[0] / (s[0] - s[-1])  # docs/singdiffusion.md
    assert (s_new - expected).abs().max() < 1e-6
    assert z.alphas_cumprod[-1] == 0 and z.betas[-1] == 1
    assert torch.equal(z.alphas_cumprod[0], base.alphas_cumprod[0])
    # Sigma-based diffusers schedulers store 2**-24 instead of the exact 0; all else agrees.
    ref = EulerDiscreteScheduler(**SD, rescale_betas_zero_snr=True)
    assert ref.alphas_cumprod[-1].item() == 2.0 ** -24
    assert torch.equal(z.alphas_cumprod[:-1], ref.alphas_cumprod[:-1].double())
    # The public function is dtype-preserving (float64 in, float64 out).
    b64 = rescale_zero_terminal_snr(base.betas)
    assert b64.dtype == torch.float64 and b64[-1] == 1


def test_from_diffusers_accepts_scheduler_config_and_dict():
    ref = DPMSolverMultistepScheduler(**SD)
    a = NoiseSchedule.from_diffusers(ref)
    b = NoiseSchedule.from_diffusers(ref.config)
    c = NoiseSchedule.from_diffusers(dict(ref.config))
    assert a == b == c
    assert torch.equal(a.alphas_cumprod, ref.alphas_cumprod.double())
    trained = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64).numpy()
    ref_t = DDIMScheduler(num_train_timesteps=50, trained_betas=trained)
    t = NoiseSchedule.from_diffusers(ref_t)
    assert t.T == 50 and t.kind == "trained_betas"
    assert torch.equal(t.alphas_cumprod, ref_t.alphas_cumprod.double())


def test_from_betas_and_alphas_cumprod_keep_their_precision(gen):
    ref = DDIMScheduler(**SD)
    # float32 betas are cumprod'ed in float32, like diffusers.
    assert torch.equal(NoiseSchedule.from_betas(ref.betas).alphas_cumprod, ref.alphas_cumprod.double())
    from_np = NoiseSchedule.from_betas(ref.betas.numpy())
    assert torch.equal(from_np.alphas_cumprod, ref.alphas_cumprod.double())
    betas = 1e-4 + 0.02 * torch.rand(200, generator=gen, dtype=torch.float64)
    s = NoiseSchedule.from_betas(betas)
    assert torch.equal(s.alphas_cumprod, torch.cumprod(1 - betas, 0))
    ac = s.alphas_cumprod
    s2 = NoiseSchedule.from_alphas_cumprod(ac)
    assert torch.equal(s2.alphas_cumprod, ac)  # kept as given
    assert (s2.betas - betas).abs().max() < 1e-12
    s3 = NoiseSchedule.from_betas(list(betas.tolist()))
    assert s3.alphas_cumprod.dtype == torch.float64 and torch.equal(s3.alphas_cumprod, ac)


@pytest.mark.parametrize("make", [
    lambda: NoiseSchedule.linear(),
    lambda: NoiseSchedule.cosine(T=37, rescale_zero_terminal_snr=True),
    lambda: NoiseSchedule.from_betas(torch.linspace(1e-3, 0.3, 20, dtype=torch.float64)),
    lambda: NoiseSchedule.vp_linear(0.2, 15.0),
    lambda: NoiseSchedule.vp_cosine(s=0.01, t_max=0.99),
])
def test_dict_round_trip_is_exact(make):
    s = make()
    back = NoiseSchedule.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.kind == s.kind and back.continuous == s.continuous
    assert repr(back) == repr(s) and s.kind in repr(s)
    if not s.continuous:
        assert torch.equal(back.betas, s.betas) and torch.equal(back.alphas_cumprod, s.alphas_cumprod)
    else:
        assert s.T is None
        t = torch.linspace(0.01, 0.99, 11, dtype=torch.float64)
        assert torch.equal(back.alpha(t), s.alpha(t))


# -- timestep spacings -----------------------------------------------------------------

SPACING_CASES = [
    (DDIMScheduler, "ddim"),
    (DDPMScheduler, "ddim"),
    (DPMSolverMultistepScheduler, "dpmsolver"),
    (UniPCMultistepScheduler, "dpmsolver"),
    (DEISMultistepScheduler, "dpmsolver"),
    (EulerDiscreteScheduler, "euler"),
]


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("cls,flavor", SPACING_CASES, ids=[c.__name__ for c, _ in SPACING_CASES])
def test_spacings_equal_diffusers_timesteps(cls, flavor, spacing, offset):
    sched = NoiseSchedule.linear()
    ref = _quiet(cls, timestep_spacing=spacing, steps_offset=offset)
    for steps in STEPS:
        ref.set_timesteps(steps)
        if flavor == "dpmsolver" and spacing == "leading" and offset == 1 and steps == 999:
            # diffusers emits timestep 1000 here (outside [0, 999]); we refuse it.
            assert ref.timesteps.max() == 1000
            with pytest.raises(ValueError, match=r"degenerates.*\[0, 999\]"):
                sched.timesteps(steps, spacing, offset, flavor)
            continue
        ours = sched.timesteps(steps, spacing, offset, flavor)
        assert ours.dtype == (torch.float64 if flavor == "euler" else torch.int64)
        assert torch.equal(ours, ref.timesteps.to(ours.dtype)), (steps, ours[:6], ref.timesteps[:6])
        assert len(ours) == steps and bool((ours[1:] < ours[:-1]).all())


def test_spacing_flavors_really_differ():
    # Guards against the flavors silently collapsing into one formula.
    ddim = diffusers_timesteps(1000, 7, "linspace", flavor="ddim")
    dpm = diffusers_timesteps(1000, 7, "linspace", flavor="dpmsolver")
    euler = diffusers_timesteps(1000, 7, "linspace", flavor="euler")
    # linspace(0, 999, 7) = 0, 166.5, ..., 832.5, 999; numpy rounds halves to even.
    assert ddim.tolist() == [999, 832, 666, 500, 333, 166, 0]
    assert dpm.tolist() == [999, 856, 714, 571, 428, 285, 143]
    assert euler[1].item() != round(euler[1].item())  # Euler keeps fractional linspace steps
    assert diffusers_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))


def test_degenerate_diffusers_spacing_is_refused():
    ref = DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(998)
    assert len(ref.timesteps) == 999 and ref.timesteps[-1] == -1  # np.arange float artifact
    with pytest.raises(ValueError, match="degenerates to 999 timesteps"):
        NoiseSchedule.linear().timesteps(998, "trailing")
    with pytest.raises(ValueError, match="repeats timesteps"):
        NoiseSchedule.linear().timesteps(1000, "linspace", flavor="dpmsolver")


# -- Karras sigmas / sigma_to_t --------------------------------------------------------

@pytest.mark.parametrize("name,rescale", [("linear", False), ("scaled_linear", False),
                                          ("squaredcos_cap_v2", False), ("scaled_linear", True)])
@pytest.mark.parametrize("steps", [7, 10, 25])
def test_karras_sigmas_and_sigma_to_t_equal_euler(name, rescale, steps):
    ref = EulerDiscreteScheduler(**CONFIGS[name], rescale_betas_zero_snr=rescale, use_karras_sigmas=True)
    ref.set_timesteps(steps)
    s = NoiseSchedule.from_diffusers(ref)
    sig = s.karras_sigmas(steps)
    assert sig.dtype == torch.float64 and sig.shape == (steps,)
    assert torch.equal(sig.float(), ref.sigmas[:-1]) and ref.sigmas[-1] == 0
    assert torch.equal(s.sigma_to_t(sig).float(), ref.timesteps)


@pytest.mark.parametrize("name", ["scaled_linear", "squaredcos_cap_v2"])
def test_karras_timesteps_equal_dpmsolver(name):
    ref = DPMSolverMultistepScheduler(**CONFIGS[name], use_karras_sigmas=True)
    s = NoiseSchedule.from_diffusers(ref)
    for steps in (7, 20):
        ref.set_timesteps(steps)
        sig = s.karras_sigmas(steps)
        t = s.sigma_to_t(sig)
        # DPMSolverMultistep rounds, except for squaredcos_cap_v2 where the int cast truncates.
        t = t.long() if name == "squaredcos_cap_v2" else t.round().long()
        assert torch.equal(sig.float(), ref.sigmas[:-1])
        assert torch.equal(t, ref.timesteps)


def test_karras_with_spaced_range_equals_euler_trailing():
    ref = EulerDiscreteScheduler(**SD, timestep_spacing="trailing", use_karras_sigmas=True)
    ref.set_timesteps(9)
    s = NoiseSchedule.from_diffusers(ref)
    ts = s.timesteps(9, "trailing", flavor="euler").long()
    tab = s.sigma_table()
    sig = s.karras_sigmas(9, sigma_min=tab[ts[-1]], sigma_max=tab[ts[0]])
    assert torch.equal(sig.float(), ref.sigmas[:-1])
    assert torch.equal(s.sigma_to_t(sig).float(), ref.timesteps)


def test_sigma_to_t_inverts_the_table(gen):
    s = NoiseSchedule.scaled_linear()
    idx = torch.randint(0, 1000, (4, 5), generator=gen)
    t = s.sigma_to_t(s.sigma_table(diffusers_compat=False)[idx], diffusers_compat=False)
    assert t.shape == (4, 5) and torch.equal(t, idx.double())
    # diffusers' table holds float32 logs, so float64 queries land within ~1e-4 of the knot.
    t32 = s.sigma_to_t(s.sigma_table()[idx])
    assert (t32 - idx).abs().max() < 1e-3
    assert (s.sigma_table(False) - s.sigma_edm(torch.arange(1000))).abs().max() < 1e-12
    # Clamped to [0, T-1] outside the table.
    assert s.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]


# -- alpha / sigma / lambda ------------------------------------------------------------

@pytest.mark.parametrize("make", [NoiseSchedule.linear, NoiseSchedule.cosine,
                                  lambda: NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=True)])
def test_native_time_functions(make, gen):
    s = make()
    ac = s.alphas_cumprod
    idx = torch.randint(0, s.T, (3, 7), generator=gen)
    assert torch.equal(s.alpha(idx), ac[idx].sqrt())
    assert torch.equal(s.sigma(idx), (1 - ac[idx]).sqrt())
    assert s.alpha(5).shape == () and s.alpha(5).item() == ac[5].sqrt().item()
    # Float times at the knots agree with the table; in between alpha^2 + sigma^2 = 1.
    assert (s.alpha(idx.double()) - ac[idx].sqrt()).abs().max() < 1e-14
    tf = torch.rand(50, generator=gen, dtype=torch.float64) * (s.T - 1)
    a, sg, lam = s.alpha(tf), s.sigma(tf), s.lambda_(tf)
    assert a.dtype == torch.float64 and a.shape == (50,)
    assert (a ** 2 + sg ** 2 - 1).abs().max() < 1e-14
    assert (lam - torch.log(a / sg)).abs().max() < 1e-10
    assert (s.sigma_edm(tf) - sg / a).abs().max() / (sg / a).max() < 1e-12
    assert (s.alpha(tf) - s.marginal_alpha(s.t_to_cont(tf))).abs().max() < 1e-13
    i = int(torch.randint(0, s.T - 1, (1,), generator=gen))
    lo, hi = s.alpha(i), s.alpha(i + 1)
    mid = s.alpha(i + 0.5)
    assert hi < mid < lo


def test_discrete_continuous_view_matches_dpm_solver_reference(gen):
    """NoiseScheduleVP('discrete'): t_array = linspace(0, 1, T+1)[1:], log alpha piecewise
    linear in between (reference written with np.interp inside the range)."""
    s = NoiseSchedule.cosine()
    t_array = np.linspace(0.0, 1.0, s.T + 1)[1:]
    log_alpha = 0.5 * np.log(s.alphas_cumprod.numpy())
    t = torch.rand(300, generator=gen, dtype=torch.float64) * (1 - 1e-3) + 1e-3
    ref = np.interp(t.numpy(), t_array, log_alpha)
    assert np.abs(s.marginal_log_mean_coeff(t).numpy() - ref).max() < 1e-12
    ref_std = np.sqrt(1 - np.exp(2 * ref))
    assert np.abs(s.marginal_std(t).numpy() - ref_std).max() < 1e-12
    assert np.abs(s.marginal_lambda(t).numpy() - (ref - np.log(ref_std))).max() < 1e-9
    # DPM-Solver extends the end segments linearly.
    slope = (log_alpha[1] - log_alpha[0]) / (t_array[1] - t_array[0])
    assert abs(s.marginal_log_mean_coeff(0.0).item() - (log_alpha[0] - slope * t_array[0])) < 1e-12


def test_continuous_closed_forms_match_dpm_solver(gen):
    t = torch.rand(200, generator=gen, dtype=torch.float64) * 0.99 + 0.005
    v = NoiseSchedule.vp_linear(0.1, 20.0)
    assert torch.allclose(v.marginal_log_mean_coeff(t), -0.25 * t ** 2 * 19.9 - 0.05 * t, rtol=0, atol=1e-14)
    lam = v.lambda_(t)
    tmp = 2.0 * 19.9 * torch.logaddexp(-2.0 * lam, torch.zeros(1, dtype=torch.float64))
    dpm_inverse = tmp / (torch.sqrt(0.1 ** 2 + tmp) + 0.1) / 19.9
    assert (v.inverse_lambda(lam) - dpm_inverse).abs().max() < 1e-12
    c = NoiseSchedule.vp_cosine()
    s = 0.008
    ref = torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2))
    ref = ref - math.log(math.cos(s / (1 + s) * math.pi / 2))
    assert (c.marginal_log_mean_coeff(t) - ref).abs().max() < 1e-14
    assert abs(c.cosine_t_max - 0.99799800449) < 1e-9 and c.t_max == 0.9946
    assert c.alpha(0.0).item() == 1.0 and c.sigma(0.0).item() == 0.0


@pytest.mark.parametrize("make", [NoiseSchedule.linear, NoiseSchedule.cosine,
                                  lambda: NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=True),
                                  NoiseSchedule.vp_linear, NoiseSchedule.vp_cosine])
def test_inverse_lambda_round_trip(make, gen):
    s = make()
    hi = s.t_max if s.continuous else 1.0
    t = torch.rand(500, generator=gen, dtype=torch.float64) * (hi - 2e-3) + 1e-3
    assert (s.inverse_lambda(s.marginal_lambda(t)) - t).abs().max() < 1e-9
    if s.continuous:
        assert (s.inverse_lambda(s.lambda_(t)) - t).abs().max() < 1e-9
    else:
        ti = torch.rand(500, generator=gen, dtype=torch.float64) * (s.T - 1)
        assert (s.cont_to_t(s.inverse_lambda(s.lambda_(ti))) - ti).abs().max() < 1e-9
    if s.zero_terminal_snr:
        # The last segment ends at alpha = 0: alpha is linear there, finite and invertible.
        tl = 998 + torch.rand(50, generator=gen, dtype=torch.float64) * 0.999
        lam = s.lambda_(tl)
        assert torch.isfinite(lam).all() and s.lambda_(999).item() == -math.inf
        assert (s.cont_to_t(s.inverse_lambda(lam)) - tl).abs().max() < 1e-9


@pytest.mark.parametrize("make", [NoiseSchedule.vp_linear, NoiseSchedule.vp_cosine,
                                  lambda: NoiseSchedule.vp_linear(0.5, 0.5)])
def test_derivatives_match_finite_differences(make, gen):
    s = make()
    t = torch.rand(100, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    for f, df in ((s.alpha, s.d_alpha_dt), (s.sigma, s.d_sigma_dt)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        exact = df(t)
        assert ((fd - exact).abs() / exact.abs().clamp_min(1e-3)).max() < 1e-6
    assert s.d_sigma_dt(0.0).item() == math.inf  # the t -> 0 singularity (docs/etsdm.md)
    assert s.d_alpha_dt(0.0).item() < 0


def test_time_grids_follow_dpm_solver(gen):
    s = NoiseSchedule.linear()
    n = int(torch.randint(3, 40, (1,), generator=gen))
    tu = s.time_uniform(n)
    assert torch.equal(tu, torch.linspace(1.0, 1e-3, n + 1, dtype=torch.float64))
    tq = s.time_quadratic(n)
    assert torch.equal(tq, torch.linspace(1.0, 1e-3 ** 0.5, n + 1, dtype=torch.float64) ** 2)
    tl = s.logSNR_uniform(n)
    assert tl.shape == (n + 1,) and abs(tl[0] - 1.0) < 1e-12 and abs(tl[-1] - 1e-3) < 1e-12
    d = torch.diff(s.marginal_lambda(tl))
    assert (d - d.mean()).abs().max() < 1e-9 and (d > 0).all()
    c = NoiseSchedule.vp_cosine()
    assert c.time_uniform(4)[0] == 0.9946 and c.time_uniform(4)[-1] == 1e-3
    custom = c.time_uniform(4, t_start=0.5, t_end=0.1)
    assert torch.equal(custom, torch.linspace(0.5, 0.1, 5, dtype=torch.float64))
    z = NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=True)
    assert torch.isfinite(z.logSNR_uniform(5, t_start=0.999)).all()


# -- errors ----------------------------------------------------------------------------

LIN = NoiseSchedule.linear()
VP = NoiseSchedule.vp_linear()
ZSNR = NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=True)

BAD = [
    (lambda: NoiseSchedule.from_betas([0.1, float("nan")]), ValueError, r"finite.*betas\[1\]"),
    (lambda: NoiseSchedule.from_betas([0.1, 1.5]), ValueError, r"betas must lie in \(0, 1\).*betas\[1\]"),
    (lambda: NoiseSchedule.from_betas([0.0, 0.1]), ValueError, r"betas\[0\] = 0.0"),
    (lambda: NoiseSchedule.from_betas([0.1, 1.0, 0.2]), ValueError, r"only the last may be exactly 1"),
    (lambda: NoiseSchedule.from_betas(torch.tensor([1, 2])), TypeError, "floating-point tensor"),
    (lambda: NoiseSchedule.from_betas("0.1"), TypeError, "betas must be a tensor"),
    (lambda: NoiseSchedule.from_betas([0.1, "x"]), TypeError, "only real numbers"),
    (lambda: NoiseSchedule.from_betas([]), ValueError, "T must be >= 1"),
    (lambda: NoiseSchedule.from_betas(torch.full((2, 2), 0.1)), ValueError, "1-D"),
    (lambda: NoiseSchedule.from_alphas_cumprod([0.9, 0.95]), ValueError, "strictly decreasing"),
    (lambda: NoiseSchedule.from_alphas_cumprod([0.9, 0.0, 0.0]), ValueError, "strictly decreasing"),
    (lambda: NoiseSchedule.from_alphas_cumprod([1.0, 0.5]), ValueError, r"alphas_cumprod\[0\] must lie in"),
    (lambda: NoiseSchedule.from_alphas_cumprod([0.9, math.inf]), ValueError, "finite"),
    (lambda: NoiseSchedule.linear(T=0), ValueError, "T must be >= 1"),
    (lambda: NoiseSchedule.linear(T=10.0), TypeError, "T must be an int"),
    (lambda: NoiseSchedule.linear(beta_end=1.5), ValueError, r"betas must lie in \(0, 1\)"),
    (lambda: NoiseSchedule.linear(beta_start=math.nan), ValueError, "beta_start must be finite"),
    (lambda: NoiseSchedule.linear(rescale_zero_terminal_snr=1), TypeError, "must be a bool"),
    (lambda: NoiseSchedule.linear(T=1, rescale_zero_terminal_snr=True), ValueError, "T >= 2"),
    (lambda: NoiseSchedule.from_diffusers(42), TypeError, "diffusers scheduler"),
    (lambda: NoiseSchedule.from_diffusers({"beta_schedule": "sigmoid"}), ValueError,
     "'sigmoid' is not supported"),
    (lambda: NoiseSchedule.from_diffusers({"num_train_timesteps": 10}), ValueError, "neither beta_schedule"),
    (lambda: NoiseSchedule.from_dict([1]), TypeError, "expects a dict"),
    (lambda: NoiseSchedule.from_dict({"kind": "linear"}), ValueError, "missing keys"),
    (lambda: NoiseSchedule.vp_linear(beta_0=-1.0), ValueError, "beta_0 >= 0"),
    (lambda: NoiseSchedule.vp_cosine(t_max=1.0), ValueError, r"t_max in \(0, 1\)"),
    (lambda: LIN.timesteps(0), ValueError, r"steps must be in \[1, 1000\], got 0"),
    (lambda: LIN.timesteps(1001, "trailing"), ValueError, r"steps must be in \[1, 1000\], got 1001"),
    (lambda: LIN.timesteps(10, spacing="uniform"), ValueError, "spacing must be one of"),
    (lambda: LIN.timesteps(10, flavor="pndm"), ValueError, "flavor must be one of"),
    (lambda: LIN.timesteps(10.0), TypeError, "steps must be an int"),
    (lambda: LIN.timesteps(10, steps_offset=-1), ValueError, "steps_offset must be >= 0"),
    (lambda: LIN.alpha(1000), ValueError, r"\[0, 999\]"),
    (lambda: LIN.sigma(torch.tensor([-0.5, 3.0])), ValueError, r"\[0, 999\]"),
    (lambda: LIN.lambda_(math.nan), ValueError, "NaN"),
    (lambda: LIN.alpha("3"), TypeError, "t must be a number"),
    (lambda: LIN.alpha(True), TypeError, "got bool"),
    (lambda: VP.alpha(1.5), ValueError, r"continuous time\) must lie in \[0.0, 1.0\]"),
    (lambda: VP.timesteps(10), ValueError, "needs a discrete schedule"),
    (lambda: VP.betas, ValueError, "needs a discrete schedule"),
    (lambda: VP.sigma_to_t(1.0), ValueError, "needs a discrete schedule"),
    (lambda: LIN.d_alpha_dt(1), NotImplementedError, "continuous schedules only"),
    (lambda: LIN.cosine_t_max, ValueError, "vp_cosine only"),
    (lambda: LIN.karras_sigmas(0), ValueError, "steps must be >= 1"),
    (lambda: LIN.karras_sigmas(5, sigma_min=10.0, sigma_max=1.0), ValueError, "sigma_max must exceed"),
    (lambda: LIN.karras_sigmas(5, rho=0.0), ValueError, "rho must be > 0"),
    (lambda: LIN.time_uniform(5, t_start=1.5), ValueError, r"t_start must lie in \(0, 1\]"),
    (lambda: LIN.time_quadratic(5, t_start=0.5, t_end=0.5), ValueError, "must differ"),
    (lambda: ZSNR.logSNR_uniform(5), ValueError, "finite lambda"),
    (lambda: LIN.sigma_to_t("a"), TypeError, "sigmas must be a number"),
    (lambda: rescale_zero_terminal_snr([0.1, 0.2]), TypeError, "floating-point tensor"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_inputs_raise_informative_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
