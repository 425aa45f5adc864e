"""Bad input to training, the loss, the probes and every CLI subcommand: each row is an
input and the error it must raise (type and a fragment of the message), raised before
any long work starts."""
import os
import sys

import numpy as np
import pytest
import torch

import fastdiff.cli as cli
import fastdiff.probes as probes
import fastdiff.singular as singular
import fastdiff.train as ftrain
from fastdiff import LipschitzResult, lipschitz_t, lipschitz_x
from fastdiff.nets import UNet
from fastdiff.schedules import NoiseSchedule
from fastdiff.train import diffusion_loss, train

pytestmark = pytest.mark.usefixtures("one_thread")

S = NoiseSchedule.linear(1000)


class Fixed(torch.nn.Module):
    """Returns ``out`` whatever its input (a batch-1 ``out`` is the broadcasting bug)."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, class_labels=None):
        return self.out * self.w


class Smooth(torch.nn.Module):
    """Per-sample eps(x, t), differentiable in t; ``batch1`` returns only the first row."""

    def __init__(self, batch1=False):
        super().__init__()
        self.batch1 = batch1
        self.eval()

    def forward(self, x, t):
        out = x * torch.sin(t.to(x.dtype) / 50).reshape((-1,) + (1,) * (x.dim() - 1))
        return out[:1] if self.batch1 else out


def _tiny():
    torch.manual_seed(0)
    return UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                num_classes=3, heads=2, groups=4)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 1, 4, 4, generator=g) * 2 - 1, torch.randint(0, 3, (16,), generator=g)


def _train(**kw):
    return lambda: train(_tiny(), _data(), S, **{"steps": 1, "batch_size": 8,
                                                 "progress": False, **kw})


X0 = torch.randn(4, 1, 4, 4)


def _loss(model=None, x0=X0, **kw):
    return lambda: diffusion_loss(model or Fixed(torch.zeros(x0.shape)), x0, S, **kw)


X2 = torch.randn(2, 2, 3, 3, dtype=torch.float64)


def _lt(model=None, **kw):
    kw = {"progress": False, "timesteps": torch.tensor([3, 5, 7]), **kw}
    ts = kw.pop("timesteps")
    return lambda: lipschitz_t(model or Smooth(), X2, kw.pop("schedule", S), ts, **kw)


API_CASES = [
    # train
    ("train grad_clip=-1", _train(grad_clip=-1), ValueError, "grad_clip must be None"),
    ("train grad_clip=0", _train(grad_clip=0.0), ValueError, "grad_clip"),
    ("train grad_clip=nan", _train(grad_clip=float("nan")), ValueError, "grad_clip"),
    ("train grad_clip=str", _train(grad_clip="1"), TypeError, "grad_clip"),
    ("train lr=0", _train(lr=0.0), ValueError, "lr must be a finite number > 0"),
    ("train lr=inf", _train(lr=float("inf")), ValueError, "lr"),
    ("train weight_decay<0", _train(weight_decay=-0.1), ValueError, "weight_decay"),
    ("train steps=1.5", _train(steps=1.5), TypeError, "steps must be an int"),
    ("train steps=True", _train(steps=True), TypeError, "steps must be an int, got bool"),
    ("train steps<0", _train(steps=-1), ValueError, "steps"),
    ("train batch_size=0", _train(batch_size=0), ValueError, "batch_size"),
    ("train batch_size>data", _train(batch_size=64), ValueError, "fewer than batch_size"),
    ("train warmup<0", _train(warmup=-1), ValueError, "warmup"),
    ("train ckpt_every=0", _train(ckpt_every=0), ValueError, "ckpt_every"),
    ("train log_every=0", _train(log_every=0), ValueError, "log_every"),
    ("train seed=2**70", _train(seed=2 ** 70), ValueError, "seed"),
    ("train seed<0", _train(seed=-1), ValueError, "seed"),
    ("train p_uncond=1", _train(p_uncond=1.0), ValueError, "p_uncond"),
    ("train p_uncond=nan", _train(p_uncond=float("nan")), ValueError, "p_uncond"),
    ("train ema_decay=1", _train(ema_decay=1.0), ValueError, "ema_decay"),
    ("train prediction", _train(prediction="score"), ValueError, "prediction must be one of"),
    ("train time_sharing", _train(time_sharing=(100, 5)), TypeError, "TimeSharing"),
    ("train schedule", lambda: train(_tiny(), _data(), "linear", steps=1), TypeError,
     "NoiseSchedule"),
    ("loss continuous integer t", lambda: diffusion_loss(Fixed(torch.zeros(X0.shape)), X0,
                                                          NoiseSchedule.vp_linear(),
                                                          t=torch.zeros(4, dtype=torch.long)),
     ValueError, "floating times in [0, 1]"),
    ("train data", lambda: train(_tiny(), [1, 2, 3], S, steps=1), TypeError, "data must be"),
    # diffusion_loss
    ("loss output batch 1", _loss(Fixed(torch.zeros(1, 1, 4, 4))), ValueError,
     "model output has shape (1, 1, 4, 4), expected x0's shape (4, 1, 4, 4)"),
    ("loss output shape", _loss(Fixed(torch.zeros(4, 2, 4, 4))), ValueError, "model output"),
    ("loss output object", _loss(lambda x, t: "eps"), TypeError, "model returned str"),
    ("loss x0 batch 0", _loss(x0=torch.randn(0, 1, 4, 4)), ValueError, "at least one sample"),
    ("loss x0 int", _loss(x0=torch.ones(4, 1, 4, 4, dtype=torch.int64)), ValueError, "floating"),
    ("loss x0 1-d", _loss(x0=torch.randn(4)), ValueError, "x0 must be a floating tensor [B, ...]"),
    ("loss t list", _loss(t=[1, 2, 3, 4]), TypeError, "t must be a torch.Tensor or None, got list"),
    ("loss t float", _loss(t=torch.tensor([1.5, 2.0, 3.0, 4.0])), ValueError, "integer timesteps"),
    ("loss t bool", _loss(t=torch.ones(4, dtype=torch.bool)), ValueError, "integer timesteps"),
    ("loss t length", _loss(t=torch.tensor([1, 2])), ValueError, "shape [4]"),
    ("loss t range", _loss(t=torch.tensor([0, 1, 2, 1000])), ValueError, "[0, 999]"),
    ("loss noise list", _loss(noise=[0.0]), TypeError, "noise must be a torch.Tensor"),
    ("loss noise shape", _loss(noise=torch.randn(4, 1, 4, 5)), ValueError, "noise must have x0's shape"),
    ("loss cond length", _loss(cond=torch.arange(3)), ValueError, "cond must have one row per sample"),
    ("loss cond list", _loss(cond=[0, 1, 2, 3]), TypeError, "cond must be a torch.Tensor"),
    ("loss generator", _loss(generator=5), TypeError, "generator must be a torch.Generator"),
    ("loss prediction", _loss(prediction="score"), ValueError, "prediction must be one of"),
    ("loss sharing", _loss(time_sharing=(100, 5)), TypeError, "TimeSharing"),
    # lipschitz_t: a batch-1 model output, for every method
    *[(f"lipschitz_t batch-1 output {m}", _lt(Smooth(batch1=True), method=m), ValueError,
       "the model returned shape (1, 2, 3, 3) for") for m in ("fd", "jvp", "vjp", "auto")],
    ("lipschitz_t 0-d output", _lt(lambda x, t: x.sum(), method="fd"), ValueError,
     "the model returned shape ()"),
    ("lipschitz_t method", _lt(method="jacfwd"), ValueError, "method must be one of"),
    ("lipschitz_t range", _lt(timesteps=[0, 1000]), ValueError, r"range [0, 999]"),
    ("lipschitz_t empty", _lt(timesteps=[]), ValueError, "empty"),
    ("lipschitz_t bool t", _lt(timesteps=torch.ones(2, dtype=torch.bool)), TypeError, "real numbers"),
    ("lipschitz_t noise", _lt(noise=torch.randn(3, 2, 3, 3, dtype=torch.float64)), ValueError,
     "noise must have x0's shape"),
    ("lipschitz_t schedule", _lt(schedule="linear"), TypeError, "schedule must be"),
    ("lipschitz_t sharing", _lt(time_sharing=(100, 5)), TypeError, "time_sharing must be"),
    ("lipschitz_t batch_size", _lt(batch_size=0), ValueError, "batch_size"),
    ("lipschitz_t model_kwargs", _lt(model_kwargs=[1]), TypeError, "model_kwargs"),
    ("lipschitz_t model", _lt(model=3), TypeError, "model must be callable"),
    ("lipschitz_t x0 int", lambda: lipschitz_t(Smooth(), torch.ones(2, 3, dtype=torch.int64), S, [1],
                                               progress=False), TypeError, "x0 must be a floating"),
    # lipschitz_x
    ("lipschitz_x batch-1 output", lambda: lipschitz_x(Smooth(batch1=True), X2, torch.tensor([3.0, 4.0])),
     ValueError, "model output has batch 1, expected 2"),
    ("lipschitz_x iters", lambda: lipschitz_x(Smooth(), X2, 3.0, iters=0), ValueError, "iters"),
    ("lipschitz_x method", lambda: lipschitz_x(Smooth(), X2, 3.0, method="fd"), ValueError, "method"),
    ("lipschitz_x x list", lambda: lipschitz_x(Smooth(), [1.0], 3.0), TypeError, "x must be a tensor"),
    # LipschitzResult
    ("result shape", lambda: LipschitzResult(torch.arange(3), torch.zeros(4, 2), "fd"), ValueError,
     "values must have shape [K=3, B]"),
    ("result from_dict", lambda: LipschitzResult.from_dict({"values": []}), ValueError,
     "expected a dict with keys"),
    ("result plot stat", lambda: LipschitzResult(torch.arange(3), torch.ones(3, 2), "fd").plot(stat="p99"),
     ValueError, "stat must be one of"),
    ("result plot band", lambda: LipschitzResult(torch.arange(3), torch.ones(3, 2), "fd").plot(band="iqr"),
     ValueError, "band must be"),
]


@pytest.mark.parametrize("call, exc, fragment", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_api_bad_input(call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


def test_numpy_integers_are_accepted_like_ints(tmp_path):
    ema = train(_tiny(), _data(), S, steps=np.int64(1), batch_size=np.int32(8),
                warmup=np.int64(1), seed=np.uint8(3), progress=False)
    assert isinstance(ema, torch.nn.Module)


# ---------------------------------------------------------------------------------------
# the CLI: every subcommand with bad options, in-process
# ---------------------------------------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Any of the long jobs starting fails the test: errors must come before them."""
    def started(*a, **k):
        raise AssertionError("the work started before the bad input was refused")
    monkeypatch.setattr(ftrain, "train", started)
    monkeypatch.setattr(probes, "lipschitz_t", started)
    monkeypatch.setattr(cli, "_sample_digits", started)
    monkeypatch.setattr(cli, "_sample_gaussian", started)
    monkeypatch.setattr(singular, "fit_initial_predictor", started)
    monkeypatch.delenv("FASTDIFF_DEBUG", raising=False)


def _paths(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {"DIR": str(tmp_path), "FILE": str(a_file), "UNDER_FILE": str(a_file / "x.png"),
            "NO_FS": "/proc/fastdiff-no-such-dir/x.png", "OUT": str(tmp_path / "o" / "x.png")}


CLI_CASES = [
    # top level
    (["nope"], "invalid choice: 'nope'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    # train
    (["train"], "fastdiff train: error: the following arguments are required: --out"),
    (["train", "--grad-clip", "-1", "--out", "DIR"], "argument --grad-clip: expected a number >= 0, got '-1'"),
    (["train", "--grad-clip", "nan", "--out", "DIR"], "argument --grad-clip"),
    (["train", "--lr", "0", "--out", "DIR"], "argument --lr: expected a number > 0"),
    (["train", "--lr", "inf", "--out", "DIR"], "argument --lr"),
    (["train", "--steps", "-1", "--out", "DIR"], "argument --steps: expected an integer >= 0"),
    (["train", "--steps", "1.5", "--out", "DIR"], "argument --steps"),
    (["train", "--batch-size", "0", "--out", "DIR"], "argument --batch-size"),
    (["train", "--ema-decay", "1", "--out", "DIR"], "argument --ema-decay: expected a number in [0, 1)"),
    (["train", "--p-uncond", "1.5", "--out", "DIR"], "argument --p-uncond"),
    (["train", "--seed", "-3", "--out", "DIR"], "argument --seed"),
    (["train", "--seed", str(2 ** 70), "--out", "DIR"], "argument --seed"),
    (["train", "--ckpt-every", "0", "--out", "DIR"], "argument --ckpt-every"),
    (["train", "--threads", "0", "--out", "DIR"], "argument --threads"),
    (["train", "--channels", "0", "--out", "DIR"], "argument --channels"),
    (["train", "--t-tilde", "0", "--out", "DIR"], "argument --t-tilde"),
    (["train", "--n", "7", "--out", "DIR"], "fastdiff train: error: TimeSharing: discrete "
     "t_tilde=100 must be divisible by n=7"),
    (["train", "--size", "12", "--out", "DIR"], "argument --size: invalid choice"),
    (["train", "--prediction", "score", "--out", "DIR"], "argument --prediction: invalid choice"),
    (["train", "--device", "bogus", "--out", "DIR"], "fastdiff train: error: --device 'bogus'"),
    (["train", "--out", "FILE"], "fastdiff train: error: --out "),
    (["train", "--out", "UNDER_FILE"], "exists and is not a directory"),
    (["train", "--out", "NO_FS"], "cannot be written"),
    # sample
    (["sample", "--out", "DIR"], "fastdiff sample: error: --out "),
    (["sample", "--out", "UNDER_FILE"], "exists and is not a directory"),
    (["sample", "--out", "NO_FS"], "fastdiff sample: error: --out '/proc/fastdiff-no-such-dir/x.png' "
     "cannot be written"),
    (["sample", "--model", "gaussian-mixture", "--out", "DIR"], "is a directory"),
    (["sample", "--sampler", "nope", "--out", "OUT"], "fastdiff sample: error: unknown sampler 'nope'"),
    (["sample", "--steps", "0", "--out", "OUT"], "argument --steps: expected an integer >= 1"),
    (["sample", "--n", "1", "--out", "OUT"], "argument --n: expected an integer >= 2"),
    (["sample", "--guidance", "nan", "--out", "OUT"], "argument --guidance: expected a finite number"),
    (["sample", "--seed", str(2 ** 70), "--out", "OUT"], "argument --seed"),
    (["sample", "--model", "nope", "--out", "OUT"], "fastdiff sample: error: load_model: 'nope' is "
     "neither a shipped model"),
    # lipschitz
    (["lipschitz", "--out", "DIR"], "fastdiff lipschitz: error: --out "),
    (["lipschitz", "--json", "DIR", "--out", "OUT"], "fastdiff lipschitz: error: --json "),
    (["lipschitz", "--json", "UNDER_FILE", "--out", "OUT"], "exists and is not a directory"),
    (["lipschitz", "--json", "NO_FS", "--out", "OUT"], "cannot be written"),
    (["lipschitz", "--model", "nope", "--out", "OUT"], "fastdiff lipschitz: error: load_model: 'nope' is neither"),
    (["lipschitz", "--model", "gaussian", "--model", "nope", "--out", "OUT"], "'nope' is neither a shipped model"),
    (["lipschitz", "--model", "gaussian+foo", "--out", "OUT"], "unknown suffix '+foo'"),
    (["lipschitz", "--method", "jacfwd", "--out", "OUT"], "argument --method: invalid choice"),
    (["lipschitz", "--t-max", "0", "--out", "OUT"], "argument --t-max: expected a number > 0"),
    (["lipschitz", "--t-max", "5000", "--out", "OUT"], "--t-max must be in (0, 1000] for gaussian"),
    (["lipschitz", "--samples", "0", "--out", "OUT"], "argument --samples"),
    (["lipschitz", "--batch-size", "0", "--out", "OUT"], "argument --batch-size"),
    (["lipschitz", "--stat", "p99", "--out", "OUT"], "argument --stat: invalid choice"),
    (["lipschitz", "--seed", "x", "--out", "OUT"], "argument --seed: expected an integer"),
    # sharded sampling, fd, fit-initial
    (["sample", "--seeds", "0-9", "--model", "gaussian-mixture", "--out", "DIR"],
     "fastdiff sample: error: --seeds (sharded sampling) needs a digits model"),
    (["sample", "--seeds", "0-9", "--n", "5", "--out", "DIR"], "either --seeds"),
    (["fd"], "fastdiff fd: error: the following arguments are required: --samples"),
    (["fd", "--samples", "DIR"], "fastdiff fd: error: "),
    (["fd", "--samples", "DIR", "--reference", "x"], "argument --reference: invalid choice"),
    (["fit-initial"], "fastdiff fit-initial: error: the following arguments are required: --out"),
    (["fit-initial", "--data", "nope", "--out", "DIR"], "fastdiff fit-initial: error: --data must be"),
    (["fit-initial", "--lr", "0", "--out", "DIR"], "argument --lr: expected a number > 0"),
    (["fit-initial", "--out", "UNDER_FILE"], "exists and is not a directory"),
]


def _run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_bad_options(argv, fragment, tmp_path, capsys, no_work):
    paths = _paths(tmp_path)
    rc, err = _run([paths.get(a, a) for a in argv], capsys)
    assert rc == 2
    assert fragment in err, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fastdiff")
    assert not os.path.exists(paths["OUT"])


@pytest.mark.parametrize("missing, argv", [
    ("sklearn", ["sample"]), ("matplotlib", ["sample", "--model", "gaussian-mixture"]),
    ("sklearn", ["train"]), ("matplotlib", ["lipschitz"]), ("sklearn", ["lipschitz", "--model", "digits"]),
])
def test_cli_missing_optional_dependency_fails_first(missing, argv, tmp_path, capsys, no_work,
                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # what a failed import leaves
    out = ["--out", str(tmp_path / ("run" if argv[0] == "train" else "x.png"))]
    rc, err = _run(argv + out, capsys)
    pip = {"sklearn": "scikit-learn"}.get(missing, missing)
    assert rc == 2 and f"needs {missing}, which is not installed (pip install {pip})" in err
