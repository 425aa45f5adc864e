"""Dropping fastdiff into diffusers UNets: ``patch_time_embedding`` and ``etsdm``.

Oracle: the unmodified diffusers UNet (a deep copy taken before patching), called with t
or with the shared time f(t); tiny random-weight models so that this runs in seconds.
"""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

import fastdiff
from fastdiff import SinusoidalEmbedding, TimeSharing

SHARING = TimeSharing(100, 5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Hundreds of tiny ops per UNet call: on a busy 2-core machine, waking a second OpenMP
    # thread for each costs milliseconds (measured 10x slower); the kernels' threading is
    # covered in test_embedding.py.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet():
    # add_attention=False and plain blocks: forward-mode AD cannot pass through diffusers'
    # CPU attention kernel.
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, norm_num_groups=8, add_attention=False,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def tiny_cond_unet():
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def random_times(kind, B, gen):
    """[B] timesteps: half inside the shared range [0, 100) but off its grid 0, 20, ..., 80
    (so that f(t) != t there), half above it."""
    lo = 20 * torch.randint(0, 5, (B // 2,), generator=gen) + 1 + torch.rand(B // 2, generator=gen) * 18
    hi = 100 + torch.rand(B - B // 2, generator=gen) * 899
    t = torch.cat([lo, hi])
    return t.long() if kind == "int" else t


def max_diff(a, b):
    return (a - b).abs().max().item()


# The fused embedding matches diffusers' to ~1 ulp (6e-8; checked to 1e-6 below and in
# test_embedding.py); a random UNet's float32 forward amplifies that ~20x (measured: up to
# 1.07e-6 on outputs of size ~1), so whole-UNet comparisons allow a few 1e-6.
UNET_TOL = 5e-6


def check_projection(unet_a, unet_b, t, sharing=None):
    """The patched time projection itself: within 1e-6 of diffusers' on f(t)."""
    ft = t if sharing is None else sharing(t)
    assert max_diff(unet_a.time_proj(t), unet_b.time_proj(ft)) <= 1e-6


@pytest.fixture(scope="module")
def unets():
    """(original, patched without sharing, patched with sharing) tiny UNet2DModels."""
    torch.seed()  # fresh random weights each run
    base = tiny_unet()
    return base, fastdiff.patch_time_embedding(copy.deepcopy(base)), \
        fastdiff.patch_time_embedding(copy.deepcopy(base), sharing=SHARING)


@pytest.fixture(scope="module")
def cond_unets():
    torch.seed()
    base = tiny_cond_unet()
    return base, fastdiff.patch_time_embedding(copy.deepcopy(base)), \
        fastdiff.patch_time_embedding(copy.deepcopy(base), sharing=SHARING)


def test_patch_replaces_projection_in_place(gen):
    unet = tiny_unet()
    old = unet.time_proj
    out = fastdiff.patch_time_embedding(unet, sharing=SHARING)
    assert out is unet and isinstance(unet.time_proj, SinusoidalEmbedding)
    assert unet.time_proj.num_channels == old.num_channels
    assert unet.time_proj.flip_sin_to_cos == old.flip_sin_to_cos
    assert unet.time_proj.downscale_freq_shift == old.downscale_freq_shift
    # patching again only changes the sharing
    fastdiff.patch_time_embedding(unet, sharing=None)
    assert unet.time_proj.sharing is None


@pytest.mark.parametrize("kind", ["int", "float"])
def test_unet2d_unchanged_without_sharing(gen, unets, kind):
    base, plain, _ = unets
    x = torch.randn(4, 3, 8, 8, generator=gen)
    t = random_times(kind, 4, gen)
    with torch.no_grad():
        check_projection(plain, base, t)
        assert max_diff(plain(x, t).sample, base(x, t).sample) <= UNET_TOL


@pytest.mark.parametrize("kind", ["int", "float"])
def test_unet2d_sharing_equals_original_at_shared_time(gen, unets, kind):
    base, _, shared = unets
    x = torch.randn(4, 3, 8, 8, generator=gen)
    t = random_times(kind, 4, gen)
    with torch.no_grad():
        check_projection(shared, base, t, SHARING)
        got = shared(x, t).sample
        assert max_diff(got, base(x, SHARING(t)).sample) <= UNET_TOL
        # the test has teeth: below t_tilde, f(t) != t changes the output
        assert max_diff(got[:2], base(x, t).sample[:2]) > 1e-4


@pytest.mark.parametrize("kind", ["int", "float"])
def test_cond_unet_patched(gen, cond_unets, kind):
    base, plain, shared = cond_unets
    x = torch.randn(4, 4, 8, 8, generator=gen)
    ctx = torch.randn(4, 5, 16, generator=gen)
    t = random_times(kind, 4, gen)
    with torch.no_grad():
        check_projection(plain, base, t)
        check_projection(shared, base, t, SHARING)
        want = base(x, t, encoder_hidden_states=ctx).sample
        assert max_diff(plain(x, t, encoder_hidden_states=ctx).sample, want) <= UNET_TOL
        want_shared = base(x, SHARING(t), encoder_hidden_states=ctx).sample
        assert max_diff(shared(x, t, encoder_hidden_states=ctx).sample, want_shared) <= UNET_TOL


# ---------------------------------------------------------------------------------------
# Forward-mode derivative in t through a patched UNet
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unets64(unets):
    base, _, _ = unets
    return (fastdiff.patch_time_embedding(copy.deepcopy(base).double()),
            fastdiff.patch_time_embedding(copy.deepcopy(base).double(), sharing=SHARING))


def _jvp_t(unet, x, t):
    return torch.func.jvp(lambda t: unet(x, t).sample, (t,), (torch.ones_like(t),))


def test_jvp_through_unet_equals_finite_difference(gen, unets64):
    plain, shared = unets64
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    # above t_tilde (and not within h of it), so both models are smooth there
    t = 101 + torch.rand(2, generator=gen, dtype=torch.float64) * 800
    h = 1e-4
    for unet in (plain, shared):
        with torch.no_grad():
            fd = (unet(x, t + h).sample - unet(x, t - h).sample) / (2 * h)
        value, tangent = _jvp_t(unet, x, t)
        assert tangent.abs().max().item() > 1e-6  # a real, nonzero derivative
        torch.testing.assert_close(tangent, fd, atol=1e-7, rtol=1e-5)


def test_jvp_through_unet_zero_inside_shared_interval(gen, unets64):
    plain, shared = unets64
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    t = 20.5 + torch.rand(2, generator=gen, dtype=torch.float64) * 19  # inside [20, 40)
    _, tangent = _jvp_t(shared, x, t)
    assert torch.equal(tangent, torch.zeros_like(tangent))
    _, tangent_plain = _jvp_t(plain, x, t)
    assert tangent_plain.abs().max().item() > 1e-6


# ---------------------------------------------------------------------------------------
# fastdiff.etsdm: the call-site wrapper
# ---------------------------------------------------------------------------------------

class Recorder(nn.Module):
    """Records the arguments it was called with; returns x."""

    def forward(self, x, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return x


@pytest.mark.parametrize("kind", ["int", "float"])
def test_etsdm_passes_shared_time(gen, kind):
    model = Recorder()
    wrapped = fastdiff.etsdm(model, t_tilde=100, n=5)
    x = torch.randn(4, 3, generator=gen)
    t = random_times(kind, 4, gen)
    want = SHARING(t)
    extra, flag = torch.randn(4, 2, generator=gen), object()

    assert wrapped(x, t, extra, flag=flag) is x
    assert torch.equal(model.args[0], want) and model.args[0].dtype == t.dtype
    assert model.args[1] is extra and model.kwargs == {"flag": flag}

    for name in ("t", "timestep"):  # ours, and diffusers' keyword
        wrapped(x, encoder_hidden_states=extra, **{name: t})
        assert model.args == ()
        assert torch.equal(model.kwargs[name], want)
        assert model.kwargs["encoder_hidden_states"] is extra

    # scalar and 0-d t
    wrapped(x, 57)
    assert model.args[0] == 40
    wrapped(x, torch.tensor(57.5))
    assert model.args[0].shape == () and model.args[0].item() == 40.0
    wrapped(x, 357)
    assert model.args[0] == 357


def test_etsdm_unet_equals_original_at_shared_time(gen, unets, cond_unets):
    base, _, _ = unets
    x = torch.randn(4, 3, 8, 8, generator=gen)
    for kind in ("int", "float"):
        t = random_times(kind, 4, gen)
        with torch.no_grad():
            want = base(x, SHARING(t)).sample
            assert max_diff(fastdiff.etsdm(base)(x, t).sample, want) == 0
            assert max_diff(fastdiff.etsdm(base)(x, timestep=t).sample, want) == 0
    cbase = cond_unets[0]
    xc, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)
    t = random_times("int", 2, gen)
    with torch.no_grad():
        got = fastdiff.etsdm(cbase)(xc, t, encoder_hidden_states=ctx).sample
        assert max_diff(got, cbase(xc, SHARING(t), encoder_hidden_states=ctx).sample) == 0


def test_etsdm_jvp_zero_inside_shared_interval(gen, unets64):
    plain, _ = unets64
    wrapped = fastdiff.etsdm(plain)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    t = 60.5 + torch.rand(2, generator=gen, dtype=torch.float64) * 19  # inside [60, 80)
    _, tangent = torch.func.jvp(lambda t: wrapped(x, t).sample, (t,), (torch.ones_like(t),))
    assert torch.equal(tangent, torch.zeros_like(tangent))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_errors():
    with pytest.raises(TypeError, match="time_proj"):
        fastdiff.patch_time_embedding(nn.Linear(3, 3))
    fourier = UNet2DModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                          norm_num_groups=8, add_attention=False, time_embedding_type="fourier",
                          down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError, match="sinusoidal"):
        fastdiff.patch_time_embedding(fourier)
    with pytest.raises(TypeError, match="callable"):
        fastdiff.etsdm("not a model")
    with pytest.raises(ValueError, match="divisible"):
        fastdiff.etsdm(Recorder(), t_tilde=100, n=3)
    with pytest.raises(TypeError, match="no time argument"):
        fastdiff.etsdm(Recorder())(torch.randn(2, 3))
