"""The small default UNet: shapes, conditioning, time input forms, forward-AD in t,
attention under forward-AD, torch.compile."""
import pytest
import torch

from fastdiff.nets import SelfAttention, UNet
from fastdiff.schedules import TimeSharing


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kw):
    cfg = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
               num_classes=10, heads=2)
    cfg.update(kw)
    return UNet(**cfg)


def _randomize(model, seed=0):
    # Residual branches and the output conv are zero-initialised (the net starts as a
    # constant); give every parameter random values so outputs depend on all inputs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_output_shape_8_and_16():
    x = torch.randn(3, 1, 8, 8)
    t = torch.randint(0, 1000, (3,))
    m = _tiny().eval()
    assert m(x, t).shape == x.shape
    assert m(x, t, torch.randint(0, 10, (3,))).shape == x.shape
    m16 = _tiny(channel_mult=(1, 2, 2), attention_levels=(2,), in_channels=3).eval()
    x16 = torch.randn(2, 3, 16, 16)
    assert m16(x16, torch.rand(2) * 999).shape == x16.shape


def test_param_count_of_default_digits_config():
    m = UNet(channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(1,),
             num_classes=10)
    n = sum(p.numel() for p in m.parameters())
    assert 0.5e6 <= n <= 2e6


def test_class_conditioning_changes_output_and_none_is_null_class():
    torch.manual_seed(0)
    m = _randomize(_tiny()).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
    y1 = torch.randint(0, 10, (4,))
    y2 = (y1 + 1 + torch.randint(0, 9, (4,))) % 10  # a different class for every row
    with torch.no_grad():
        o1, o2 = m(x, t, y1), m(x, t, y2)
        o_none = m(x, t)
        o_null = m(x, t, torch.full((4,), m.null_class))
    assert m.null_class == 10
    diff = (o1 - o2).flatten(1).norm(dim=1)
    assert (diff > 1e-3 * o1.flatten(1).norm(dim=1)).all()
    torch.testing.assert_close(o_none, o_null)


def test_time_input_forms_agree():
    torch.manual_seed(1)
    m = _randomize(_tiny(num_classes=None)).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = m(x, torch.full((3,), 417))
        torch.testing.assert_close(m(x, 417), ref)
        torch.testing.assert_close(m(x, torch.tensor(417)), ref)
        torch.testing.assert_close(m(x, torch.tensor([417])), ref)
        torch.testing.assert_close(m(x, torch.full((3,), 417.0)), ref)


def test_time_sharing_is_metadata_only():
    # The net is plain in t: E-TSDM is applied by the loss / samplers, not inside forward.
    torch.manual_seed(2)
    plain = _randomize(_tiny(num_classes=None)).eval()
    shared = _tiny(num_classes=None, time_sharing=TimeSharing(100, 5)).eval()
    shared.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([13, 57])
    with torch.no_grad():
        torch.testing.assert_close(shared(x, t), plain(x, t))
    assert shared.time_sharing == TimeSharing(100, 5)


def test_jvp_in_t_matches_central_difference():
    torch.manual_seed(3)
    m = _randomize(_tiny()).double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    t = torch.rand(3, dtype=torch.float64) * 900 + 50

    def f(tt):
        return m(x, tt, y)

    _, d = torch.func.jvp(f, (t,), (torch.ones_like(t),))
    h = 1e-3
    with torch.no_grad():
        fd = (f(t + h) - f(t - h)) / (2 * h)
    assert d.abs().max() > 0
    torch.testing.assert_close(d, fd, rtol=1e-5, atol=1e-7)


def test_attention_forward_ad_matches_finite_difference():
    torch.manual_seed(4)
    att = SelfAttention(8, heads=2, groups=4).double()
    _randomize(att)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    v = torch.randn_like(x)
    _, d = torch.func.jvp(att, (x,), (v,))
    h = 1e-6
    with torch.no_grad():
        fd = (att(x + h * v) - att(x - h * v)) / (2 * h)
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-8)


def test_attention_matches_multihead_reference():
    # Independent reference: torch.nn.functional.scaled_dot_product_attention.
    torch.manual_seed(5)
    att = _randomize(SelfAttention(8, heads=2, groups=4)).eval()
    x = torch.randn(2, 8, 4, 4)
    B, C, H, W = x.shape
    q, k, v = att.qkv(att.norm(x)).reshape(B, 3, 2, 4, H * W).unbind(1)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    ref = x + att.proj(o.transpose(-1, -2).reshape(B, C, H, W))
    with torch.no_grad():
        torch.testing.assert_close(att(x), ref, rtol=1e-5, atol=1e-5)


def test_vmap_over_t():
    torch.manual_seed(6)
    m = _randomize(_tiny(num_classes=None)).eval()
    x = torch.randn(2, 1, 8, 8)
    ts = torch.rand(3, 2) * 999
    with torch.no_grad():
        out = torch.func.vmap(lambda tt: m(x, tt))(ts)
        ref = torch.stack([m(x, tt) for tt in ts])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="prediction_type"):
        UNet(prediction_type="score")
    with pytest.raises(TypeError, match="time_sharing"):
        UNet(time_sharing=(100, 5))
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(channel_mult=(1, 2), attention_levels=(2,))
    m = _tiny(num_classes=None)
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        m(torch.randn(1, 8, 8), 3)
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 1, 7, 7), 3)
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="number or a tensor"):
        m(torch.randn(2, 1, 8, 8), "10")


def test_torch_compile_traces_fullgraph():
    # Dynamo capture without codegen (backend="eager"): no graph breaks anywhere in the
    # net, the fused embedding op included. The inductor run is the slow test below.
    torch.manual_seed(7)
    m = _randomize(_tiny()).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), m(x, t, y))
        torch.testing.assert_close(compiled(x, t.float() + 0.5, None), m(x, t.float() + 0.5))


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    torch.manual_seed(7)
    m = _randomize(_tiny()).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), m(x, t, y), rtol=1e-4, atol=1e-5)
