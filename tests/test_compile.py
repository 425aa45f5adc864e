"""The sampling loop under torch.compile(fullgraph=True): the README's hand-written
``Sampler.step`` loop and ``fastdiff.sample(compile=...)`` trace into one graph (no graph
break), do not recompile across steps or on a second call with the same Sampler, and
equal the eager loop."""
import pytest
import torch
import torch._dynamo
from torch import nn

import fastdiff


class Net(nn.Module):
    """A contraction plus a small conv term: a non-chaotic model."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, t, labels=None):
        out = 0.5 * x + 0.1 * torch.tanh(self.conv(x))
        return out if labels is None else out + 0.01 * labels.view(-1, 1, 1, 1)


@pytest.fixture
def no_recompile():
    torch._dynamo.reset()
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    yield
    torch._dynamo.config.error_on_recompile = old
    torch._dynamo.reset()


def hand_loop(s, model, x_T):
    x = s.init_noise(x_T)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x)
    return x


@pytest.mark.slow
def test_readme_loop_compiles_with_inductor(gen, no_recompile):
    model, s = Net(int(torch.randint(0, 2 ** 31, (1,), generator=gen))), fastdiff.Sampler("dpm++2m", steps=8)
    x_T = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        ref = hand_loop(s, model, x_T)
        loop = torch.compile(lambda x: hand_loop(s, model, x), fullgraph=True)
        got = loop(x_T)
        again = loop(torch.randn(2, 4, 8, 8, generator=gen))  # no recompilation
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert again.shape == ref.shape


@pytest.mark.parametrize("name", ["dpm++2m", "euler", "unipc", "ddim", "heun", "dpm++3m"])
def test_hand_loop_one_graph_equals_eager(gen, no_recompile, name):
    model, s = Net(int(torch.randint(0, 2 ** 31, (1,), generator=gen))), fastdiff.Sampler(name, steps=7)
    x_T = torch.randn(3, 4, 5, 6, generator=gen)
    with torch.no_grad():
        ref = hand_loop(s, model, x_T)
        loop = torch.compile(lambda x: hand_loop(s, model, x), fullgraph=True, backend="aot_eager")
        got = loop(x_T)
        x2 = torch.randn(3, 4, 5, 6, generator=gen)
        got2 = loop(x2)
    # aot_eager runs the same kernels; the Euler family's compiled model input is c_in x
    # afresh (not the fused step's folded copy): the same value up to rounding
    tol = dict(rtol=1e-6, atol=1e-6) if s.plan.sigma_space else dict(rtol=0, atol=0)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got2, hand_loop(s, model, x2), **tol)


@pytest.mark.parametrize("name", ["dpm++2m", "euler-ancestral", "unipc"])
def test_sample_compile_equals_eager(gen, no_recompile, name):
    model = Net(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    s = fastdiff.Sampler(name, steps=6, guidance_scale=3.0)
    x_T = torch.randn(2, 4, 6, 6, generator=gen)
    labels, null = torch.tensor([1.0, 2.0]), torch.zeros(2)
    kw = dict(sampler=s, progress=False, cond=labels, uncond=null)
    with torch.no_grad():
        ref = fastdiff.sample(model, x_T=x_T, seeds=[3, 4], **kw)
        got = fastdiff.sample(model, x_T=x_T, seeds=[3, 4], compile="aot_eager", **kw)
        fastdiff.sample(model, x_T=x_T, seeds=[5, 6], compile="aot_eager", **kw)  # reused graph
    tol = dict(rtol=1e-5, atol=1e-5) if s.plan.sigma_space else dict(rtol=0, atol=0)
    torch.testing.assert_close(got, ref, **tol)


def test_sample_compile_refuses_brownian_noise():
    with pytest.raises(ValueError, match="Brownian"):
        fastdiff.sample(Net(0), (1, 4, 4, 4), sampler="dpm++sde", steps=3, compile="aot_eager",
                        progress=False)


def test_sample_compile_bad_arguments():
    model = Net(0)
    with pytest.raises(ValueError, match="no callback"):
        fastdiff.sample(model, (1, 4, 4, 4), steps=2, compile=True, callback=lambda *a: None, progress=False)
    with pytest.raises(TypeError, match="compile must be"):
        fastdiff.sample(model, (1, 4, 4, 4), steps=2, compile=1, progress=False)
