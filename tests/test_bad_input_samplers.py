"""Bad input to the sampler API (fused_step, Sampler, fastdiff.sample): each row is a call
and the exception type and message fragment it must raise, before any work; then the
unusual-but-valid inputs (numpy scalars) that must be accepted."""
import numpy as np
import pytest
import torch

from fastdiff import Sampler, sample
from fastdiff._ops import STEP_HEAD, step_n_basis
from fastdiff.samplers.grid_families import lcm_timesteps
from fastdiff.step import fused_step


def _x():
    return torch.randn(2, 3, 4)


def _c(n_out=1, n_hist=0):
    return torch.randn(1, STEP_HEAD + n_out * step_n_basis(n_hist))


def _model(x, t):
    return 0.1 * x


def _finished():
    s = Sampler("ddim", steps=2)
    x = s.init_noise(_x())
    for t in s.timesteps:
        x = s.step(_model(x, t), t, x)
    return s, x


def _step_after_last():
    s, x = _finished()
    s.step(_model(x, None), None, x)


def _input_after_last():
    s, x = _finished()
    s.scale_model_input(x)


def _step(t, **kw):
    s = Sampler(kw.pop("name", "ddim"), steps=3, **kw.pop("build", {}))
    x = s.init_noise(_x())
    s.step(_model(x, None), t, x, **kw)


BAD = [
    # fused_step
    ("coeffs numpy", lambda: fused_step(_x(), _x(), _c().numpy()), TypeError, "coeffs must be a tensor"),
    ("coeffs None", lambda: fused_step(_x(), _x(), None), TypeError, "coeffs must be a tensor"),
    ("model_out None", lambda: fused_step(_x(), None, _c()), TypeError, "model_out must be a tensor"),
    ("history [None]", lambda: fused_step(_x(), _x(), _c(1, 1), history=[None]), TypeError,
     r"history\[0\] must be a tensor"),
    ("history tensor", lambda: fused_step(_x(), _x(), _c(1, 1), history=_x()), TypeError,
     "history must be a list"),
    ("n_out True", lambda: fused_step(_x(), _x(), _c(), n_out=True), TypeError, "n_out must be an int"),
    ("n_out float", lambda: fused_step(_x(), _x(), _c(), n_out=1.0), TypeError, "n_out must be an int"),
    ("n_out 2**62", lambda: fused_step(_x(), _x(), _c(), n_out=2 ** 62), ValueError,
     r"coeffs must have shape .* for n_out=4611686018427387904"),
    ("out tensor", lambda: fused_step(_x(), _x(), _c(), out=torch.empty(2, 3, 4)), TypeError,
     "out must be a list"),
    # Sampler
    ("init_noise_sigma nan", lambda: Sampler("euler", steps=4, init_noise_sigma=float("nan")), ValueError,
     "init_noise_sigma must be None, 'diffusers' or a finite positive number"),
    ("init_noise_sigma < 0", lambda: Sampler("lms", steps=4, init_noise_sigma=-2.0), ValueError,
     "finite positive number"),
    ("guidance_scale str", lambda: Sampler("ddim", steps=4, guidance_scale="7.5"), TypeError,
     "guidance_scale must be a finite number"),
    ("guidance_scale inf", lambda: Sampler("ddim", steps=4, guidance_scale=np.float32("inf")), TypeError,
     "guidance_scale must be a finite number"),
    ("generator int", lambda: Sampler("ddpm", steps=4, generator=5), TypeError,
     "generator must be a torch.Generator or a list of them"),
    ("generator list of ints", lambda: Sampler("ddpm", steps=4, generator=[1, 2]), TypeError,
     "generator must be a torch.Generator"),
    ("seed 2**70", lambda: Sampler("ddpm", steps=4, seeds=[2 ** 70]), ValueError, r"seeds must be in \[-2\*\*63"),
    ("seed bool", lambda: Sampler("ddpm", steps=4, seeds=[True]), TypeError, "seeds must be ints"),
    ("steps bool", lambda: Sampler("ddim", steps=True), TypeError, "steps must be an int"),
    ("pndm resumed with prk", lambda: Sampler("pndm", steps=6, resumed=True), ValueError,
     r"resumed is a PLMS \(skip_prk_steps=True\) option"),
    ("lcm strength 0", lambda: lcm_timesteps(1000, 4, 50, strength=0.0), ValueError,
     r"strength must be a number in \(0, 1\]"),
    ("lcm strength too low", lambda: lcm_timesteps(1000, 4, 50, strength=0.05), ValueError,
     r"steps \(4\) must not exceed int\(original_inference_steps \* strength\) \(2\)"),
    ("step after the last", _step_after_last, ValueError, "the run is finished"),
    ("model input after the last", _input_after_last, ValueError, "the run is finished"),
    ("t too long", lambda: _step(torch.full((3,), 666)), ValueError, r"t must be a number or a \[1\] or \[2\] tensor"),
    ("t 2-d", lambda: _step(torch.full((2, 1), 666)), ValueError, r"\[1\] or \[2\] tensor"),
    ("t string", lambda: _step("666"), TypeError, "t must be a number or a tensor"),
    ("step generator int", lambda: _step(None, name="ddpm", generator=5), TypeError,
     "generator must be a torch.Generator"),
    # fastdiff.sample
    ("shape int", lambda: sample(_model, 5, progress=False), TypeError, "shape must be a tuple of positive ints"),
    ("shape float", lambda: sample(_model, (2, 3.0), progress=False), TypeError, "shape must be a tuple"),
    ("shape zero", lambda: sample(_model, (2, 0), progress=False), ValueError, "shape must be a tuple of positive"),
    ("dtype int64", lambda: sample(_model, (2, 3), dtype=torch.int64, progress=False), TypeError,
     "dtype must be a floating-point torch.dtype"),
    ("dtype str", lambda: sample(_model, (2, 3), dtype="float32", progress=False), TypeError,
     "dtype must be a floating-point torch.dtype"),
    ("generator int", lambda: sample(_model, (2, 3), generator=5, progress=False), TypeError,
     "generator must be a torch.Generator"),
    ("seed 2**70", lambda: sample(_model, (1, 3), seeds=[2 ** 70], progress=False), ValueError, "seeds must be in"),
    ("prebuilt steps", lambda: sample(_model, (2, 3), sampler=Sampler(steps=10), steps=20, progress=False),
     ValueError, "steps=20 but the prebuilt Sampler has 10 steps"),
    ("guidance_scale str", lambda: sample(_model, (2, 3), guidance_scale="7", progress=False), TypeError,
     "guidance_scale must be a finite number"),
]


@pytest.mark.parametrize("call,exc,match", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_numpy_scalars_are_accepted_like_python_numbers():
    x, c = _x(), _c(2)
    assert all(torch.equal(a, b) for a, b in zip(fused_step(x, x.cos(), c, n_out=np.int64(2)),
                                                 fused_step(x, x.cos(), c, n_out=2)))
    for kw in (dict(steps=np.int64(5), steps_offset=np.int32(1)), dict(order=np.int64(2))):
        a = Sampler("lms" if "order" in kw else "ddim", **({"steps": 5} | kw))
        b = Sampler("lms" if "order" in kw else "ddim", **({"steps": 5} | {k: int(v) for k, v in kw.items()}))
        assert all(torch.equal(a.coeffs(k), b.coeffs(k)) for k in range(len(a)))
    s = Sampler("ddim", steps=4, guidance_scale=np.float32(7.5), seeds=np.array([1, 2]))
    assert s.guidance_scale == 7.5 and isinstance(s.guidance_scale, float)
    x_T = torch.randn(2, 3)
    cond = {"scale": torch.tensor([1.0, 2.0])}
    got = sample(lambda x, t, scale: 0.1 * x * scale.view(-1, 1), x_T=x_T, steps=np.int64(4),
                 guidance_scale=np.float32(7.5), cond=cond, uncond={"scale": torch.zeros(2)},
                 progress=False)
    want = sample(lambda x, t, scale: 0.1 * x * scale.view(-1, 1), x_T=x_T, steps=4, guidance_scale=7.5,
                  cond=cond, uncond={"scale": torch.zeros(2)}, progress=False)
    assert torch.equal(got, want)
    assert sample(_model, (np.int64(2), np.int32(3)), steps=3, progress=False).shape == (2, 3)
    s = Sampler("ddim", steps=3)
    s.init_noise(x_T)
    assert s.model_time(np.int64(2)).shape == (2,)
