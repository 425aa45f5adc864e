"""The prepared run (fastdiff.samplers.program): a step that follows it is one fused op
call on slots chosen once, with the same results as the general step (which chooses its
buffers per step, by names), in every mode a run can be in and across the switches
between them."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff import SAMPLERS, Sampler, sample
from fastdiff.gaussian import GaussianData
from fastdiff.samplers.sampler import _Run

from test_samplers_api import _model_for, _schedule_for

F64 = torch.float64


def _general(s):
    """A copy of ``s`` that never follows a prepared run."""
    g = copy.copy(s)
    g.__dict__.update(s.__dict__)
    g._programs = None
    g._local = type(s._local)()
    return g


def _model(schedule, gen, dim=6):
    """The closed-form denoiser plus a small nonlinear term (so every history term matters)."""
    base = _model_for(GaussianData(torch.randn(dim, generator=gen, dtype=F64) * 0.5, s=0.4), schedule)

    def model(x, t):
        return base(x, t) + 0.05 * torch.tanh(x.flip(-1))
    model.prediction_type = base.prediction_type
    return model


def _seeded(name, schedule, seed, model, **kw):
    return Sampler(name, schedule, 7, seeds=[seed, seed + 1], prediction_type=model.prediction_type, **kw)


@pytest.mark.parametrize("name", SAMPLERS)
def test_prepared_runs_equal_the_general_step_bitwise(name, gen):
    _check_prepared(name, gen)


@pytest.mark.parametrize("name", ["unipc", "sa-solver"])
def test_prepared_runs_keeping_the_last_sample_equal_the_general_step_bitwise(name, gen):
    _check_prepared(name, gen, keep_last_sample=True)


def _check_prepared(name, gen, **kw):
    schedule = _schedule_for(name, __import__("fastdiff").schedules.NoiseSchedule.linear())
    model = _model(schedule, gen)
    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    s = _seeded(name, schedule, seed, model, **kw)
    if s._programs is None:
        pytest.fail(f"{name}: no prepared run")  # every family in SAMPLERS has one by default
    ref = _seeded(name, schedule, seed, model, **kw)
    want = sample(model, x_T=x_T, sampler=_general(ref), progress=False)
    # fastdiff.sample (owned states, updated in place) ...
    got = sample(model, x_T=x_T, sampler=s, progress=False)
    assert torch.equal(got, want), name
    # ... and the step API (every state a new tensor), which must not touch the caller's.
    s2, keep = _seeded(name, schedule, seed, model, **kw), x_T.clone()
    x, states = s2.init_noise(x_T), []
    for t in s2.timesteps:
        x = s2.step(model(s2.scale_model_input(x, t), t), t, x)
        states.append((x, x.clone()))
    assert s2._run.prog is not None, f"{name}: the step API left its prepared run"
    assert torch.equal(x, want), name
    assert torch.equal(x_T, keep) and all(torch.equal(a, b) for a, b in states), \
        f"{name}: a state returned earlier was overwritten"


@pytest.mark.parametrize("name,kw", [("dpm++2m", {}), ("unipc", {"order": 3}), ("euler", {}),
                                     ("heun", {}), ("ddim", {"eta": 0.7}), ("dpm++2m-sde", {})])
def test_prepared_runs_with_guidance_in_float32(name, kw, gen):
    schedule = __import__("fastdiff").schedules.NoiseSchedule.linear()
    B = 3
    x_T = torch.randn(B, 4, 5, 5, generator=gen)
    cond, uncond = torch.randn(B, 1, 1, 1, generator=gen), torch.randn(1, 1, 1, 1, generator=gen)

    def model(x, t, c):
        return 0.6 * x + 0.3 * torch.sin(x + c)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    runs = []
    for general in (False, True):
        s = Sampler(name, schedule, 6, guidance_scale=4.0, seeds=range(seed, seed + B), **kw)
        runs.append(sample(model, x_T=x_T, sampler=_general(s) if general else s, cond=cond,
                           uncond=uncond, progress=False))
    assert torch.equal(*runs)


class _Ops(TorchDispatchMode):
    """Records every op dispatched (model calls included)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["dpm++2m", "ddim", "euler", "unipc", "heun", "pndm", "lms", "euler-ancestral"])
def test_a_prepared_step_is_one_op_call_on_a_fixed_set_of_buffers(name, gen):
    # After the first step nothing but the fused step runs (a stochastic sampler also
    # draws its noise; the run's own buffers come from the op's first writes); then the
    # loop's states and model inputs cycle through a few buffers.
    s = Sampler(name, steps=12)
    outs = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(len(s))]
    calls = iter(range(len(s)))
    seen = set()

    def model(x, t):
        seen.add(x.data_ptr())
        return outs[next(calls)]
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    run = _Run(donating=True)
    x = s._init_noise(x_T)
    per_step = []
    with torch.no_grad():
        for k in range(len(s)):
            inp = s._model_input(run, x, trusted=True)
            out = model(inp, None)
            if not per_step or per_step[-1] != ["fastdiff.sampler_step.out"]:
                seen.clear()  # the caller's x_T, or the run's own memory being first allocated
            with _Ops() as mode:
                x = s._step(run, out, None, x, generator=None, donate=x is not x_T)
            per_step.append([op for op in mode.ops if not op.startswith(("aten.randn", "aten.normal"))])
            seen.add(x.data_ptr())
    assert run.prog is not None
    # one op per step: the first writes of the run's own buffers get the op's new outputs
    # (recycled memory), every later step writes into them
    n_new = sum(ops == ["fastdiff.sampler_step.default"] for ops in per_step[1:])
    assert all(ops in (["fastdiff.sampler_step.out"], ["fastdiff.sampler_step.default"])
               for ops in per_step[1:]), per_step
    assert n_new <= 5 and per_step[-1] == ["fastdiff.sampler_step.out"], per_step
    own = {t.data_ptr() for t, internal in zip(run.prog.slots(), s._program(True)[1]) if internal}
    assert seen <= own and len(own) < len(s) // 2, (name, len(seen), len(own))


def test_runs_leave_and_switch_their_prepared_form_without_changing_results(gen):
    schedule = __import__("fastdiff").schedules.NoiseSchedule.linear()
    model = _model(schedule, gen)
    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    s, ref = Sampler("dpm++3m", schedule, 9), _general(Sampler("dpm++3m", schedule, 9))
    want = sample(model, x_T=x_T, sampler=ref, progress=False)

    def loop(edit):
        x = s.init_noise(x_T)
        for k, t in enumerate(s.timesteps):
            x = s.step(model(s.scale_model_input(x, t), t), t, x, **edit(k, x))
        return x
    # donating from the second step (shown -> owned), then keeping one state (owned -> shown)
    got = loop(lambda k, x: {"donate": k not in (0, 5)})
    assert torch.equal(got, want) and s._run.prog is not None
    # a state replaced by a new, non-contiguous tensor of equal values: the run continues by names
    x = s.init_noise(x_T)
    for k, t in enumerate(s.timesteps):
        if k == 4:
            x = x.t().contiguous().t()
        x = s.step(model(s.scale_model_input(x, t), t), t, x)
    assert torch.equal(x, want) and s._run.prog is None
    # autograd from the middle of a run on: left for the general (differentiable) step
    x = s.init_noise(x_T)
    for k, t in enumerate(s.timesteps):
        if k == 3:
            x = x.detach().requires_grad_()
            leaf = x
        x = s.step(model(s.scale_model_input(x, t), t), t, x)
    assert torch.equal(x.detach(), want) and x.requires_grad
    x.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("name", ["lms", "euler", "ddim", "dpm++2m"])
def test_begin_at_takes_its_zero_history_into_the_prepared_run(name, gen):
    schedule = __import__("fastdiff").schedules.NoiseSchedule.linear()
    model = _model(schedule, gen)
    x_T = torch.randn(2, 6, generator=gen, dtype=F64)
    results = []
    for s in (Sampler(name, schedule, 8), _general(Sampler(name, schedule, 8))):
        s.begin_at(3, x_T)
        x = x_T
        for t in s.timesteps[3:]:
            x = s.step(model(s.scale_model_input(x, t), t), t, x)
        results.append(x)
        assert (s._run.prog is not None) == (s._programs is not None), name
    assert torch.equal(*results)


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "euler-ancestral", "ddim"])
def test_prepare_and_the_fused_start_change_nothing(name, gen):
    # prepare() builds up front what the first step builds; a run that starts scaled
    # (Euler family: x_T * init_noise_sigma, then its first model input c_in x) makes both
    # in one fused pass, equal to the unfused product and the model input made from it.
    schedule = __import__("fastdiff").schedules.NoiseSchedule.linear()
    model = _model(schedule, gen)
    x_T = torch.randn(3, 6, generator=gen, dtype=F64)
    s = Sampler(name, schedule, 6, seeds=[1, 2, 3])
    fresh = _general(Sampler(name, schedule, 6, seeds=[1, 2, 3]))
    want = sample(model, x_T=x_T, sampler=fresh, progress=False)
    assert s.prepare("cpu", F64, 3) is s
    assert torch.equal(sample(model, x_T=x_T, sampler=s, progress=False), want)
    x = s.init_noise(x_T)
    torch.testing.assert_close(x, x_T * s.init_noise_sigma, rtol=2 ** -52, atol=0)
    c_in = s.plan.calls[0].c_in
    if c_in is not None:
        want_in = x_T * float(s.init_noise_sigma * c_in[0])  # the folded scale, one rounding
        assert torch.equal(s.scale_model_input(x, s.timesteps[0]), want_in)
    with pytest.raises(TypeError, match="dtype must be one of"):
        s.prepare("cpu", torch.int32)


class _Out:
    """A diffusers-style model output (``.sample``)."""

    def __init__(self, sample):
        self.sample = sample


@pytest.mark.parametrize("name", ["dpm++2m", "euler-ancestral"])
def test_what_the_compiled_step_hands_back_is_done_as_the_general_step_does(name, gen):
    # Later steps of a prepared run meet inputs the compiled step leaves to Python: a
    # model output object, another dtype, learned-variance channels, timesteps as numpy
    # scalars or Python numbers, explicit noise of another dtype. The results stay those
    # of the general step, the run stays in its prepared form, and bad input still raises.
    import numpy as np
    from fastdiff import _ops
    assert _ops.extension() is not None  # the compiled step is what this tests
    s = Sampler(name, steps=6)
    ref = _general(s)
    x_T = torch.randn(2, 3, 5, 4, generator=gen)
    outs = [torch.randn(2, 6, 5, 4, generator=gen, dtype=F64) for _ in range(len(s))]
    noises = [torch.randn(2, 3, 5, 4, generator=gen, dtype=F64) for _ in range(len(s))]
    forms = [lambda m, t: (m[:, :3].float(), t), lambda m, t: (_Out(m.float()), np.float32(t)),
             lambda m, t: (m, float(t)), lambda m, t: (_Out(m), torch.tensor([t])),
             lambda m, t: (m[:, :3].contiguous(), torch.tensor(t, dtype=F64)), lambda m, t: (m.float(), np.float64(t))]
    xs = {}
    for sampler in (s, ref):
        x = sampler.init_noise(x_T)
        for k, t in enumerate(sampler.timesteps.tolist()):
            m, tt = forms[k](outs[k], t)
            with torch.no_grad():
                x = sampler.step(m, tt, x, noise=noises[k])
            if sampler is s and k:
                assert s._run.prog is not None, (name, k)
        xs[sampler is s] = x
    assert torch.equal(xs[True], xs[False])
    # the checks of a later step still raise, with the general step's messages
    x = s.init_noise(x_T)
    with torch.no_grad():
        x = s.step(outs[0][:, :3].float(), s.timesteps[0], x, noise=noises[0])
        assert s._run.prog is not None
        with pytest.raises(ValueError, match="expects model time"):
            s.step(outs[1][:, :3].float(), float(s.timesteps[0]) + 7, x)
        with pytest.raises(ValueError, match="expected x's shape"):
            s.step(torch.randn(2, 3, 5, 5, generator=gen), s.timesteps[1], x)
        with pytest.raises(ValueError, match="no guidance_scale"):
            s.step(outs[1][:, :3].float(), s.timesteps[1], x, model_out_cond=outs[1][:, :3].float())
        if s.plan.calls[1].op.noise:  # (a sampler without noise ignores it)
            with pytest.raises(ValueError, match="noise must be a tensor"):
                s.step(outs[1][:, :3].float(), s.timesteps[1], x, noise=torch.randn(3, generator=gen))
        for k in range(1, len(s)):
            x = s.step(outs[k][:, :3].float(), s.timesteps[k], x)
        assert s._run.prog is not None
        with pytest.raises(ValueError, match="the run is finished"):
            s.step(outs[0][:, :3].float(), s.timesteps[0], x)


def test_the_reference_backend_keeps_the_general_step(gen):
    from fastdiff import _ops
    s = Sampler("dpm++2m", steps=5)
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    outs = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(len(s))]
    got = {}
    old = _ops.get_backend()
    for backend in ("reference", old):
        _ops.set_backend(backend)
        try:
            x = s.init_noise(x_T)
            for k, t in enumerate(s.timesteps):
                x = s.step(outs[k], t, x)
            got[backend] = x
            assert (s._run.prog is None) == (backend == "reference")
        finally:
            _ops.set_backend(old)
    torch.testing.assert_close(got["reference"], got[old], rtol=1e-6, atol=1e-6)


def test_programs_of_earlier_backends_are_dropped(gen):
    # Each backend switch makes the prepared programs stale; switching back and forth many
    # times keeps only the current one, not one per switch.
    from fastdiff import _ops
    old = _ops.get_backend()
    s = Sampler("dpm++2m", steps=3)
    x_T = torch.randn(1, 3, 4, 4, generator=gen)
    outs = [torch.randn(1, 3, 4, 4, generator=gen) for _ in range(3)]
    try:
        for _ in range(5):
            _ops.set_backend("reference")
            _ops.set_backend(old)
            x = s.init_noise(x_T)
            for k, t in enumerate(s.timesteps):
                x = s.step(outs[k], t, x)
            assert s._run.prog is not None
            assert len([k for k in s._tables if k[0] == "program"]) == 1
    finally:
        _ops.set_backend(old)


def test_a_backend_switch_mid_run_reaches_the_steps_after_it(gen):
    # The compiled step holds the op its backend chose; set_backend between two steps
    # must still reach the later steps of a running run, as it does for the general step
    # (which resolves its op per step), and a run begun after switching back is prepared.
    from fastdiff import _ops
    old = _ops.get_backend()
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    outs = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(6)]
    got = []
    for s in (Sampler("dpm++2m", steps=6), _general(Sampler("dpm++2m", steps=6))):
        try:
            x = s.init_noise(x_T)
            for k, t in enumerate(s.timesteps):
                if k == 3:
                    assert (s._run.prog is not None) == (len(got) == 0)
                    _ops.set_backend("reference")
                x = s.step(outs[k], t, x)
            assert s._run.prog is None
        finally:
            _ops.set_backend(old)
        got.append(x)
        x = s.init_noise(x_T)
        for k, t in enumerate(s.timesteps):
            x = s.step(outs[k], t, x)
        assert (s._run.prog is not None) == (len(got) == 1)
    assert torch.equal(*got)
