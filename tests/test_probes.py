"""Lipschitz probes against closed forms, autodiff cross-checks and diffusers' UNet.

Oracle: the Gaussian data model of docs/gaussian.md. For x0 ~ N(mu, s^2 I),
eps*(x, t) = sigma (x - alpha mu) / D with D = alpha^2 s^2 + sigma^2, so with x held fixed

    d eps*/dt = [sigma' (x - alpha mu) - sigma alpha' mu] / D - sigma (x - alpha mu) D' / D^2,
    D' = 2 s^2 alpha alpha' + 2 sigma sigma',   sigma' = -(alpha / sigma) alpha'  (VP).

alpha' comes from the schedule's own closed form (continuous VP) or, for a discrete
schedule evaluated at float t, from its interpolation: log alpha is piecewise linear
between integer steps, so at integer t (right-hand segment) alpha' = alpha (la[t+1] - la[t]).
"""
import json
import math

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import lipschitz_t, lipschitz_x, LipschitzResult, TimeSharing
from fastdiff.gaussian import GaussianData
from fastdiff.schedules import NoiseSchedule

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------
# closed-form Gaussian model (differentiable in t through the schedule's own formulas)
# ---------------------------------------------------------------------------------------

class GaussianEps:
    """eps*(x, t) of N(mu, s^2 I) data (fastdiff.gaussian's closed form) with alpha(t)
    computed in torch from the schedule's own formulas, so autodiff sees its t-dependence."""

    def __init__(self, mu, s, sched):
        self.data = GaussianData(mu.flatten(), s)
        self.sched = sched
        if not sched.continuous:
            self.la = 0.5 * torch.log(sched.alphas_cumprod)

    def log_alpha(self, t):
        if self.sched.continuous:  # vp_linear: log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2
            p = self.sched.params
            return -0.25 * t ** 2 * (p["beta_1"] - p["beta_0"]) - 0.5 * t * p["beta_0"]
        i = torch.floor(t.detach()).clamp(0, self.la.numel() - 2).long()
        return self.la[i] + (t - i) * (self.la[i + 1] - self.la[i])

    def __call__(self, x, t):
        la = self.log_alpha(t.to(F64))
        return self.data.eps(x, la.exp(), torch.sqrt(-torch.expm1(2 * la))).to(x.dtype)


def analytic_k(x, mu, s, alpha, sigma, d_alpha):
    """|| d eps*/dt ||_2 per sample; x [B, ...], the rest broadcastable [B, 1, ...]."""
    d_sigma = -alpha * d_alpha / sigma
    r = x - alpha * mu
    D = alpha ** 2 * s ** 2 + sigma ** 2
    dD = 2 * s ** 2 * alpha * d_alpha + 2 * sigma * d_sigma
    d = (d_sigma * r - sigma * d_alpha * mu) / D - sigma * r * dD / D ** 2
    return torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)


def _x_t(sched, t, x0, noise):
    view = (1,) * x0.dim()
    a, s = sched.alpha(t).reshape(view).to(x0.dtype), sched.sigma(t).reshape(view).to(x0.dtype)
    return a * x0 + s * noise


def _mean(gen, shape=(1, 3, 4, 4)):
    return torch.randn(shape, generator=gen, dtype=F64)


def _gaussian_case(gen, sched, s, B):
    """The closed-form model N(mu, s^2 I) on ``sched``, B clean samples of it, fixed noise."""
    mu = _mean(gen)
    x0 = mu + s * torch.randn((B,) + mu.shape[1:], generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    return mu, GaussianEps(mu, s, sched), x0, noise


# ---------------------------------------------------------------------------------------
# small differentiable nets
# ---------------------------------------------------------------------------------------

class SmoothNet(nn.Module):
    """x and the fused sinusoidal embedding of t into a tanh MLP; smooth in t."""

    def __init__(self, shape, dim=32, hidden=64, num_classes=None):
        super().__init__()
        d = math.prod(shape)
        self.lin_t = nn.Linear(dim, hidden)
        self.lin_x = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, d)
        self.cls = nn.Embedding(num_classes, hidden) if num_classes else None
        self.dim = dim

    def forward(self, x, t, class_labels=None):
        emb = fastdiff.timestep_embedding(t, self.dim).to(x.dtype)
        h = self.lin_t(emb) + self.lin_x(x.flatten(1))
        if self.cls is not None:
            h = h + self.cls(class_labels)
        return self.out(torch.tanh(h)).reshape(x.shape)


def _smooth(gen, shape=(2, 3, 3), **kw):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    return SmoothNet(shape, **kw).to(F64).eval()


def central_k(model, sched, x0, noise, ts, h):
    """(eps(x_t, t + h) - eps(x_t, t - h)) / 2h per sample and timestep -> [K, B]."""
    out = []
    with torch.no_grad():
        for t in ts.tolist():
            x = _x_t(sched, torch.tensor(t, dtype=F64), x0, noise)
            tt = torch.full((x0.shape[0],), t, dtype=x0.dtype)
            d = (fastdiff.wrappers.model_output(model(x, tt + h))
                 - fastdiff.wrappers.model_output(model(x, tt - h))) / (2 * h)
            out.append(torch.linalg.vector_norm(d.reshape(d.shape[0], -1).double(), dim=1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------
# closed form
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["jvp", "vjp", "auto"])
def test_continuous_gaussian_matches_analytic(gen, method):
    sched = NoiseSchedule.vp_linear()
    s = 0.05
    B = 5
    mu, model, x0, noise = _gaussian_case(gen, sched, s, B)
    ts = torch.cat([torch.rand(6, generator=gen, dtype=F64) * 0.98 + 0.01,
                    torch.tensor([1e-4, 1e-3], dtype=F64)])
    # the oracle's alpha(t) is the schedule's (else the comparison below means nothing)
    torch.testing.assert_close(model.log_alpha(ts).exp(), sched.alpha(ts), rtol=1e-12, atol=0)

    res = lipschitz_t(model, x0, sched, ts, method=method, noise=noise, progress=False,
                      batch_size=7)
    assert res.method == ("jvp" if method == "auto" else method)
    want = torch.stack([
        analytic_k(_x_t(sched, t, x0, noise), mu, s, sched.alpha(t), sched.sigma(t),
                   sched.d_alpha_dt(t)) for t in ts])
    assert res.values.shape == (ts.numel(), B)
    rel = ((res.values - want).abs() / want).max().item()
    assert rel <= 1e-3, rel  # float64: expect ~1e-12


def test_discrete_gaussian_matches_analytic_and_fd(gen):
    sched = NoiseSchedule.linear(1000)
    s = 0.1
    B = 4
    mu, model, x0, noise = _gaussian_case(gen, sched, s, B)
    ts = torch.cat([torch.tensor([0, 1, 2, 998, 999]), torch.randint(3, 998, (5,), generator=gen)])
    la = 0.5 * torch.log(sched.alphas_cumprod)

    jvp = lipschitz_t(model, x0, sched, ts, method="jvp", noise=noise, progress=False)
    fd = lipschitz_t(model, x0, sched, ts, method="fd", noise=noise, progress=False)
    for k, t in enumerate(ts.tolist()):
        x = _x_t(sched, torch.tensor(t), x0, noise)
        a, sg = sched.alpha(torch.tensor(t)), sched.sigma(torch.tensor(t))
        seg = min(t, 998)  # right-hand segment; the last step uses the last segment
        want = analytic_k(x, mu, s, a, sg, a * (la[seg + 1] - la[seg]))
        rel = ((jvp.values[k] - want).abs() / want).max().item()
        assert rel <= 1e-3, (t, rel)
        # the paper's finite difference, from the closed form at t and its neighbour
        t2 = t + 1 if t < 999 else t - 1
        a2, s2 = sched.alpha(torch.tensor(t2)), sched.sigma(torch.tensor(t2))
        e1 = sg * (x - a * mu) / (a ** 2 * s ** 2 + sg ** 2)
        e2 = s2 * (x - a2 * mu) / (a2 ** 2 * s ** 2 + s2 ** 2)
        want_fd = torch.linalg.vector_norm((e1 - e2).reshape(B, -1), dim=1)
        torch.testing.assert_close(fd.values[k], want_fd, rtol=1e-9, atol=0)


def test_singularity_grows_without_bound_near_zero(gen):
    sched = NoiseSchedule.vp_linear()
    s = 1e-7  # a nearly deterministic data point: the singular case
    mu, model, x0, noise = _gaussian_case(gen, sched, s, 3)
    ts = torch.logspace(-7, -1, 7, dtype=F64)
    res = lipschitz_t(model, x0, sched, ts, method="jvp", noise=noise, progress=False)
    m = res.mean
    assert (m[:-1] > m[1:]).all(), m  # larger as t decreases
    assert m[0] > 1e4 * m[-1], m
    # While s << sigma_t << 1, d eps*/dt ~ -(sigma'/sigma) noise = -noise / (2t): a 1/t law.
    asym = torch.linalg.vector_norm(noise.reshape(3, -1), dim=1) / (2 * ts[0])
    torch.testing.assert_close(res.values[0], asym, rtol=1e-2, atol=0)
    # broad data (s = 1) stays tame over the same range: the blow-up is the small scale's
    broad = GaussianEps(mu, 1.0, sched)
    x1 = mu + torch.randn((3,) + mu.shape[1:], generator=gen, dtype=F64)
    tame = lipschitz_t(broad, x1, sched, ts, method="jvp", generator=gen, progress=False).mean
    assert tame.max() < 1e-3 * m[0]


# ---------------------------------------------------------------------------------------
# E-TSDM: exact zero inside sub-intervals, jumps at their ends
# ---------------------------------------------------------------------------------------

def test_etsdm_jvp_zero_inside_fd_jumps_at_ends(gen):
    sched = NoiseSchedule.linear(1000)
    net = _smooth(gen)
    x0 = torch.randn(3, 2, 3, 3, generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    ts = torch.arange(0, 121)
    share = TimeSharing(100, 5)
    kw = dict(noise=noise, progress=False, time_sharing=share)
    jvp = lipschitz_t(net, x0, sched, ts, method="jvp", **kw).values
    fd = lipschitz_t(net, x0, sched, ts, method="fd", **kw).values
    inside = ts < 100
    assert (jvp[inside] == 0).all()
    assert (jvp[~inside] > 0).all()
    ends = torch.isin(ts, torch.tensor([19, 39, 59, 79, 99]))
    assert (fd[ends] > 0).all()
    assert (fd[inside & ~ends] == 0).all()
    # above t~ both equal the unshared probe
    plain_jvp = lipschitz_t(net, x0, sched, ts[~inside], method="jvp", noise=noise, progress=False)
    torch.testing.assert_close(jvp[~inside], plain_jvp.values, rtol=1e-12, atol=0)
    # a jump spans one sub-interval: |eps(f(t+1)) - eps(f(t))| with f jumping by 20 steps
    x = _x_t(sched, torch.tensor(39), x0, noise)
    with torch.no_grad():
        jump = net(x, torch.full((3,), 40.0, dtype=F64)) - net(x, torch.full((3,), 20.0, dtype=F64))
    torch.testing.assert_close(fd[39], torch.linalg.vector_norm(jump.reshape(3, -1), dim=1),
                               rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------
# autodiff methods agree
# ---------------------------------------------------------------------------------------

def test_jvp_vjp_and_central_difference_agree(gen):
    sched = NoiseSchedule.linear(1000)
    net = _smooth(gen)
    x0 = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    ts = torch.rand(5, generator=gen, dtype=F64) * 990 + 2  # float timesteps are allowed
    kw = dict(noise=noise, progress=False, batch_size=6)
    jvp = lipschitz_t(net, x0, sched, ts, method="jvp", **kw).values
    vjp = lipschitz_t(net, x0, sched, ts, method="vjp", **kw).values
    cd = central_k(net, sched, x0, noise, ts, h=1e-4)
    torch.testing.assert_close(jvp, vjp, rtol=1e-10, atol=0)
    torch.testing.assert_close(jvp, cd, rtol=1e-6, atol=0)


class _TanhNoJvp(torch.autograd.Function):
    """tanh with a backward but no forward-AD rule (like many custom kernels)."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _NoJvpNet(SmoothNet):
    def forward(self, x, t, class_labels=None):
        emb = fastdiff.timestep_embedding(t, self.dim).to(x.dtype)
        h = _TanhNoJvp.apply(self.lin_t(emb) + self.lin_x(x.flatten(1)))
        return self.out(h).reshape(x.shape)


def test_auto_falls_back_to_vjp_without_forward_rule(gen):
    sched = NoiseSchedule.linear(1000)
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    net = _NoJvpNet((2, 3, 3)).to(F64).eval()
    x0 = torch.randn(3, 2, 3, 3, generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    ts = torch.tensor([3, 50, 700])
    with pytest.raises(NotImplementedError):
        lipschitz_t(net, x0, sched, ts, method="jvp", noise=noise, progress=False)
    with pytest.warns(RuntimeWarning, match="falling back to method='vjp'"):
        res = lipschitz_t(net, x0, sched, ts, method="auto", noise=noise, progress=False,
                          batch_size=2)
    assert res.method == "vjp"
    torch.testing.assert_close(res.values, central_k(net, sched, x0, noise, ts, 1e-4),
                               rtol=1e-6, atol=0)


def _tiny_unet(add_attention=True):
    import diffusers
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, add_attention=add_attention,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def test_auto_on_diffusers_unet_with_default_attention(gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    unet = _tiny_unet()
    sched = NoiseSchedule.linear(1000)
    x0 = torch.randn(3, 3, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ts = torch.tensor([5, 240, 810])
    # Plain forward AD through this UNet fails on CPU (flash attention has no rule)...
    t = torch.tensor([5.0, 6.0, 7.0])
    with pytest.raises((NotImplementedError, RuntimeError)), torch.no_grad():
        torch.func.jvp(lambda tt: unet(noise, tt).sample, (t,), (torch.ones_like(t),))
    # ...the probe runs attention as its math form, so auto stays on forward mode.
    auto = lipschitz_t(unet, x0, sched, ts, noise=noise, progress=False)
    vjp = lipschitz_t(unet, x0, sched, ts, method="vjp", noise=noise, progress=False)
    assert auto.method == "jvp" and vjp.method == "vjp"
    # diffusers embeds t in float32: h = 1e-2 balances truncation and rounding error
    cd = central_k(unet, sched, x0, noise, ts, h=1e-2)
    torch.testing.assert_close(auto.values, cd, rtol=1e-2, atol=0)
    torch.testing.assert_close(vjp.values, auto.values, rtol=1e-4, atol=0)
    # the probe changed nothing global: plain forward AD fails again afterwards
    with pytest.raises((NotImplementedError, RuntimeError)), torch.no_grad():
        torch.func.jvp(lambda tt: unet(noise, tt).sample, (t,), (torch.ones_like(t),))


@pytest.mark.parametrize("case", ["conv", "conv_strided_groups", "conv_nobias", "conv_same", "gn",
                                  "gn_plain", "gn_3d", "gn_channels_last", "gn_offset",
                                  "gn_transposed_tangent", "linear_3d", "linear_nobias",
                                  "linear_transposed", "weight_with_tangent"])
def test_fast_jvp_rules_match_torch(gen, case, monkeypatch):
    """The probe's conv2d / linear / group_norm forward-AD rules against torch's own."""
    from fastdiff import probes
    used = []
    for func, (spec, rule, params) in list(probes._RULES.items()):
        def counted(*a, _rule=rule):
            used.append(1)
            return _rule(*a)
        monkeypatch.setitem(probes._RULES, func, (spec, counted, params))
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    x = torch.randn(3, 8, 6, 6, generator=gen, dtype=F64)
    v = torch.randn(x.shape, generator=gen, dtype=F64)
    conv = nn.Conv2d(8, 6, 3, padding=1).to(F64)
    if case == "conv":
        f = conv
    elif case == "conv_strided_groups":
        f = nn.Conv2d(8, 4, 3, stride=2, padding=2, dilation=2, groups=2).to(F64)
    elif case == "conv_nobias":
        f = nn.Conv2d(8, 6, 1, bias=False).to(F64)
    elif case == "conv_same":
        f = nn.Conv2d(8, 6, 3, padding="same", dilation=2).to(F64)
    elif case in ("gn", "gn_channels_last", "gn_offset"):
        gn = nn.GroupNorm(4, 8).to(F64)
        with torch.no_grad():
            gn.weight.normal_(generator=gen), gn.bias.normal_(generator=gen)
        f = gn
        if case == "gn_channels_last":
            x = x.to(memory_format=torch.channels_last)
        if case == "gn_offset":  # a mean far from 0 against the spread: no cancellation
            x = 40 + 0.1 * x
    elif case == "gn_transposed_tangent":  # as diffusers' attention: [B, HW, C] viewed back
        f = nn.GroupNorm(4, 8).to(F64)
        x = x.flatten(2)
        v = v.flatten(2).transpose(1, 2).contiguous().transpose(1, 2)
    elif case in ("linear_3d", "linear_nobias"):  # [B, L, C] tokens, as in attention blocks
        f = nn.Linear(6, 5, bias=case == "linear_3d").to(F64)
        x, v = x.flatten(1, 2), v.flatten(1, 2)
    elif case == "linear_transposed":  # diffusers' tokens: [B, C, HW] transposed, not foldable
        f = nn.Linear(8, 5).to(F64)
        x, v = x.flatten(2).transpose(1, 2), v.flatten(2).transpose(1, 2)
    elif case == "gn_plain":
        f = nn.GroupNorm(2, 8, affine=False).to(F64)
    elif case == "gn_3d":
        f = nn.GroupNorm(4, 8).to(F64)
        x, v = x.flatten(2), v.flatten(2)
    else:  # a weight computed from the primal has a tangent: torch's rule must serve it
        def f(x):
            return nn.functional.conv2d(x, conv.weight * x.mean(), conv.bias, padding=1)
    with torch.no_grad():
        with probes._FastJvpRules():
            out, tan = torch.func.jvp(f, (x,), (v,))
        ref_out, ref_tan = torch.func.jvp(f, (x.contiguous(),), (v,))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan, ref_tan, rtol=1e-10, atol=1e-10)
    assert bool(used) == (case != "weight_with_tangent")


def test_fast_group_norm_rule_edge_cases(gen):
    """Groups that do not divide the channels are refused as torch refuses them; one
    value per group (a zero tangent) agrees with torch's rule."""
    from fastdiff import probes
    x = torch.randn(3, 4, generator=gen, dtype=F64)
    v = torch.randn(x.shape, generator=gen, dtype=F64)
    with pytest.raises(RuntimeError, match="divisible"), torch.no_grad(), probes._FastJvpRules():
        torch.func.jvp(lambda a: nn.functional.group_norm(a, 3), (x,), (v,))
    with torch.no_grad():
        with probes._FastJvpRules():
            out, tan = torch.func.jvp(lambda a: nn.functional.group_norm(a, 4), (x,), (v,))
        ref_out, ref_tan = torch.func.jvp(lambda a: nn.functional.group_norm(a, 4), (x,), (v,))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(tan, ref_tan, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# model kwargs, output objects
# ---------------------------------------------------------------------------------------

def test_per_sample_model_kwargs_follow_their_sample(gen):
    sched = NoiseSchedule.linear(1000)
    net = _smooth(gen, num_classes=4)
    x0 = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    labels = torch.tensor([3, 0, 2, 1])
    ts = torch.tensor([1, 10, 500])
    both = lipschitz_t(net, x0, sched, ts, noise=noise, progress=False, batch_size=5,
                       model_kwargs={"class_labels": labels}).values
    for b in range(4):
        one = lipschitz_t(net, x0[b:b + 1], sched, ts, noise=noise[b:b + 1], progress=False,
                          model_kwargs={"class_labels": labels[b:b + 1]}).values
        torch.testing.assert_close(both[:, b:b + 1], one, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------
# Lipschitz constant in x
# ---------------------------------------------------------------------------------------

class _XNet(nn.Module):
    """Per-sample net with GroupNorm and a t-dependent bias (Linear layers: float64
    convolutions are slow on a busy CPU)."""

    def __init__(self, d=36):
        super().__init__()
        self.lin1 = nn.Linear(d, 32)
        self.norm = nn.GroupNorm(2, 8)
        self.lin2 = nn.Linear(32, d)
        self.emb = nn.Linear(32, 32)

    def forward(self, x, t):
        e = self.emb(fastdiff.timestep_embedding(t, 32).to(x.dtype))
        h = self.norm(self.lin1(x.flatten(1)).reshape(-1, 8, 4)).flatten(1)
        return self.lin2(torch.tanh(h + e)).reshape(x.shape)


@pytest.mark.parametrize("method", ["auto", "vjp"])
def test_lipschitz_x_matches_jacobian_spectral_norm(gen, method):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    net = _XNet().to(F64).eval()
    x = torch.randn(3, 4, 3, 3, generator=gen, dtype=F64)
    t = torch.tensor([3.0, 400.0, 999.0], dtype=F64)
    got = lipschitz_x(net, x, t, iters=300, generator=gen, method=method)
    want = []
    for b in range(3):
        J = torch.func.jacrev(lambda xb: net(xb[None], t[b:b + 1])[0])(x[b])
        want.append(torch.linalg.matrix_norm(J.reshape(x[b].numel(), -1), ord=2))
    want = torch.stack(want)
    assert got.shape == (3,) and got.dtype == F64
    assert (got <= want * (1 + 1e-9)).all()  # power iteration approaches from below
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------
# results: files and plot
# ---------------------------------------------------------------------------------------

def test_result_files_and_plot(tmp_path, gen):
    sched = NoiseSchedule.linear(1000)
    net = _smooth(gen)
    x0 = torch.randn(3, 2, 3, 3, generator=gen, dtype=F64)
    ts = torch.arange(0, 30)
    shared = lipschitz_t(net, x0, sched, ts, method="fd", generator=gen, progress=False,
                         time_sharing=TimeSharing(20, 2))
    plain = lipschitz_t(net, x0, sched, ts, method="jvp", generator=gen, progress=False)
    torch.testing.assert_close(plain.mean, plain.values.mean(1))
    torch.testing.assert_close(plain.max, plain.values.max(1).values)
    torch.testing.assert_close(plain.median, plain.values.quantile(0.5, dim=1))

    back = LipschitzResult.from_json(plain.to_json(tmp_path / "r.json"))
    assert back.method == "jvp" and torch.equal(back.values, plain.values)
    assert torch.equal(back.timesteps, plain.timesteps)
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw["mean"] == plain.mean.tolist()

    rows = (tmp_path / "r.csv") and plain.to_csv(tmp_path / "r.csv")
    lines = open(rows).read().splitlines()
    assert lines[0].split(",")[:5] == ["t", "mean", "median", "max", "min"]
    assert len(lines) == 31 and len(lines[1].split(",")) == 5 + 3
    assert float(lines[5].split(",")[1]) == plain.mean[4].item()

    import matplotlib
    matplotlib.use("Agg")
    ax = plain.plot(label="plain")
    ax = shared.plot(ax=ax, label="E-TSDM", band="minmax", stat="max")
    assert [ln.get_label() for ln in ax.get_lines()] == ["plain", "E-TSDM"]
    y = ax.get_lines()[1].get_ydata()
    assert y[0] == 0 and y[9] > 0  # exact zeros are drawn (symlog axis); the jump at t=9
    with pytest.raises(ValueError, match="stat"):
        plain.plot(stat="p99")


def test_plot_overlays_with_legend_layout_and_visible_zeros(tmp_path, gen):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    ts = torch.arange(0, 40)
    positive = LipschitzResult(ts, torch.rand(40, 5, generator=gen, dtype=F64) + 0.01, "jvp")
    only_zeros = LipschitzResult(ts, torch.zeros(40, 5, dtype=F64), "jvp")
    some = torch.rand(40, 5, generator=gen, dtype=F64) * 1e-3 + 1e-4
    some[ts % 10 != 9] = 0  # E-TSDM by fd: nonzero only at sub-interval ends
    etsdm = LipschitzResult(ts, some, "fd")

    # all zeros (what jvp gives inside E-TSDM's sharing) used to raise "Data cannot be
    # log-scaled" at savefig
    fig = Figure()
    ax = only_zeros.plot(ax=fig.add_subplot(), label="zeros")
    fig.savefig(tmp_path / "zeros.png")
    assert ax.get_yscale() == "symlog" and ax.get_ylim()[0] < 0 < ax.get_ylim()[1]

    # overlay: one call per result on the same axes; the legend lists both
    fig = Figure()
    ax = positive.plot(ax=fig.add_subplot(), label="baseline")
    assert ax.get_yscale() == "log"  # no zeros: a plain log axis
    assert etsdm.plot(ax=ax, label="E-TSDM") is ax
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "E-TSDM"]
    assert ax.get_yscale() == "symlog"
    # linear up to a decade below the smallest nonzero value: every nonzero point stays
    # on the log part, the zeros on the 0 line, which is inside the view
    thresh = ax.yaxis.get_transform().linthresh
    assert thresh <= some[some > 0].min() < 10 * thresh and ax.get_ylim()[0] < 0
    assert "exact zeros" in ax.get_ylabel() and f"{thresh:.0e}" in ax.get_ylabel()
    ax.axvline(20)  # the user's own lines (y data 0..1) do not count as curves
    assert positive.plot(ax=ax, label="again").yaxis.get_transform().linthresh == thresh
    assert fig.get_layout_engine() is not None  # constrained: y-label and legend not clipped
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # runs the layout engine
    renderer = canvas.get_renderer()
    fb = fig.bbox
    for artist in (ax.yaxis.label, ax.get_legend()):
        bb = artist.get_window_extent(renderer)
        assert fb.x0 <= bb.x0 and bb.x1 <= fb.x1 and fb.y0 <= bb.y0 and bb.y1 <= fb.y1

    # the other order: the larger curve added after the zero floor is set still fits
    fig = Figure()
    ax = etsdm.plot(ax=fig.add_subplot(), label="E-TSDM")
    positive.plot(ax=ax, label="baseline")
    assert ax.get_ylim()[1] >= positive.values.max() and ax.get_ylim()[0] < 0

    # ax=None: pyplot's current axes, so successive calls overlay as plt.plot does
    plt.figure()
    try:
        ax1 = positive.plot(label="a")
        ax2 = etsdm.plot(label="b")
        assert ax1 is ax2 and len(ax1.get_lines()) == 2
    finally:
        plt.close("all")


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(gen):
    sched = NoiseSchedule.linear(1000)
    net = _smooth(gen)
    x0 = torch.randn(2, 2, 3, 3, generator=gen, dtype=F64)
    ts = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="method must be one of"):
        lipschitz_t(net, x0, sched, ts, method="jacfwd", progress=False)
    with pytest.raises(ValueError, match=r"range \[0, 999\]"):
        lipschitz_t(net, x0, sched, torch.tensor([0, 1000]), progress=False)
    with pytest.raises(ValueError, match=r"range \[0, 999\]"):
        lipschitz_t(net, x0, sched, [-1.0], progress=False)
    with pytest.raises(ValueError, match=r"range \[0, 1\]"):
        lipschitz_t(net, x0, NoiseSchedule.vp_linear(), [0.5, 1.5], progress=False)
    with pytest.raises(ValueError, match="NaN|range"):
        lipschitz_t(net, x0, sched, [float("nan")], progress=False)
    with pytest.raises(ValueError, match="empty"):
        lipschitz_t(net, x0, sched, [], progress=False)
    with pytest.raises(ValueError, match="noise must have x0's shape"):
        lipschitz_t(net, x0, sched, ts, noise=torch.randn(3, 2, 3, 3, dtype=F64), progress=False)
    with pytest.raises(TypeError, match="x0 must be a tensor"):
        lipschitz_t(net, x0.numpy(), sched, ts, progress=False)
    with pytest.raises(TypeError, match="x0 must be a floating"):
        lipschitz_t(net, x0.long(), sched, ts, progress=False)
    with pytest.raises(TypeError, match="schedule must be"):
        lipschitz_t(net, x0, "linear", ts, progress=False)
    with pytest.raises(TypeError, match="time_sharing must be"):
        lipschitz_t(net, x0, sched, ts, time_sharing=(100, 5), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        lipschitz_t(net, x0, sched, ts, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="model_kwargs"):
        lipschitz_t(net, x0, sched, ts, model_kwargs=[1], progress=False)
    with pytest.raises(ValueError, match="method must be"):
        lipschitz_x(net, x0, 3.0, method="fd")
    with pytest.raises(ValueError, match="iters"):
        lipschitz_x(net, x0, 3.0, iters=0)
    net.train()
    with pytest.warns(RuntimeWarning, match="training mode"):
        lipschitz_t(net, x0, sched, ts, progress=False)


def test_continuous_fd_uses_next_grid_point(gen):
    sched = NoiseSchedule.vp_linear()
    net = _smooth(gen)
    x0 = torch.randn(2, 2, 3, 3, generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    ts = torch.tensor([0.5, 0.1, 0.3, 1.0], dtype=F64)  # unsorted on purpose
    fd = lipschitz_t(net, x0, sched, ts, method="fd", noise=noise, progress=False).values
    partner = {0.1: 0.3, 0.3: 0.5, 0.5: 1.0, 1.0: 0.5}  # the last steps back by its gap
    for k, t in enumerate(ts.tolist()):
        x = _x_t(sched, torch.tensor(t, dtype=F64), x0, noise)
        with torch.no_grad():
            d = net(x, torch.full((2,), t, dtype=F64)) - net(x, torch.full((2,), partner[t], dtype=F64))
        want = torch.linalg.vector_norm(d.reshape(2, -1), dim=1) / abs(t - partner[t])
        torch.testing.assert_close(fd[k], want, rtol=1e-9, atol=0)


def test_cli_overlays_models_and_writes_plot_and_json(tmp_path, capsys):
    from fastdiff.cli import main
    out, js = tmp_path / "curve.png", tmp_path / "curves.json"
    rc = main(["lipschitz", "--model", "gaussian", "--model", "gaussian+etsdm", "--t-max", "30",
               "--samples", "3", "--out", str(out), "--json", str(js), "--no-progress"])
    assert rc == 0 and out.stat().st_size > 0
    curves = json.loads(js.read_text())["curves"]
    plain = LipschitzResult.from_dict(curves["gaussian"])
    shared = LipschitzResult.from_dict(curves["gaussian+etsdm"])
    assert plain.method == shared.method == "fd" and plain.values.shape == (30, 3)
    assert (plain.values > 0).all()
    assert (shared.values[19] > 0).all()  # the jump from f(19) = 0 to f(20) = 20
    assert (shared.values[torch.arange(30) != 19] == 0).all()
    assert "gaussian+etsdm [fd]" in capsys.readouterr().out
    assert main(["lipschitz", "--model", "nope", "--out", str(out)]) == 2
