"""Training: loss semantics (true-t noise, shared-t condition), EMA, atomic checkpoints,
exact resume, and data-parallel training equal to single-process training."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdiff.train as ftrain
from fastdiff.model_io import load_model, load_weights
from fastdiff.nets import UNet
from fastdiff.schedules import NoiseSchedule, TimeSharing
from fastdiff.train import (atomic_save, diffusion_loss, ema_decay_at, ema_update,
                            load_checkpoint, train)


pytestmark = pytest.mark.usefixtures("one_thread")


class Spy(torch.nn.Module):
    """Records what the network is fed; returns a fixed random output."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x.clone(), t.clone(), class_labels))
        return self.out * self.w


def _diffusers_alphas_cumprod():
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_loss_noises_at_true_t_and_feeds_shared_t(prediction):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([3, 19, 20, 57, 99, 100, 512, 999])
    B = t.numel()
    x0 = torch.rand(B, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(B, 1, 4, 4, generator=g)
    out = torch.randn(B, 1, 4, 4, generator=g)
    cond = torch.randint(0, 10, (B,), generator=g)
    spy = Spy(out)
    loss = diffusion_loss(spy, x0, NoiseSchedule.linear(1000), prediction=prediction,
                          time_sharing=TimeSharing(100, 5), cond=cond, t=t, noise=noise)
    (x_seen, t_seen, c_seen), = spy.calls
    # The condition is f(t): left ends of the 20-wide sub-intervals below 100 (docs/etsdm.md).
    assert t_seen.tolist() == [0, 0, 20, 40, 80, 100, 512, 999]
    assert torch.equal(c_seen, cond)
    # The noise level is the TRUE t's (diffusers' table as the reference).
    ac = _diffusers_alphas_cumprod()[t].float().reshape(B, 1, 1, 1)
    a, s = ac.sqrt(), (1 - ac).sqrt()
    torch.testing.assert_close(x_seen, a * x0 + s * noise)
    target = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[prediction]
    torch.testing.assert_close(loss, ((out - target) ** 2).mean())


def test_loss_without_sharing_and_with_generator():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(64, 1, 2, 2, generator=g) * 2 - 1
    spy = Spy(torch.zeros(64, 1, 2, 2))
    loss = diffusion_loss(spy, x0, NoiseSchedule.linear(1000), generator=g)
    (x_seen, t_seen, c_seen), = spy.calls
    assert c_seen is None
    assert t_seen.dtype == torch.int64 and 0 <= t_seen.min() and t_seen.max() < 1000
    assert len(set(t_seen.tolist())) > 32  # uniform draws, not shared
    # Output 0: the loss is the mean squared noise, recovered from x_t and the true t.
    ac = _diffusers_alphas_cumprod()[t_seen].float().reshape(-1, 1, 1, 1)
    eps = (x_seen - ac.sqrt() * x0) / (1 - ac).sqrt()
    torch.testing.assert_close(loss, (eps ** 2).mean(), rtol=1e-4, atol=1e-5)


def test_loss_rejects_bad_input():
    s = NoiseSchedule.linear(1000)
    spy = Spy(torch.zeros(2, 1, 2, 2))
    x0 = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="prediction"):
        diffusion_loss(spy, x0, s, prediction="score")
    with pytest.raises(TypeError, match="NoiseSchedule"):
        diffusion_loss(spy, x0, torch.linspace(0.9, 0.1, 1000))
    with pytest.raises(ValueError, match="floating times"):  # continuous: t in [0, 1]
        diffusion_loss(spy, x0, NoiseSchedule.vp_linear(), t=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="TimeSharing"):
        diffusion_loss(spy, x0, s, time_sharing=(100, 5))
    with pytest.raises(ValueError, match="integer timesteps"):
        diffusion_loss(spy, x0, s, t=torch.tensor([1.5, 2.0]))


def test_ema_update_formula():
    g = torch.Generator().manual_seed(2)
    model, ema = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    with torch.no_grad():
        for p in list(model.parameters()) + list(ema.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    old = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, o, p in zip(ema.parameters(), old, model.parameters()):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * p)
    for k in [0, 1, 10, 100, 10_000]:
        assert ema_decay_at(k, 0.999) == min(0.999, (1 + k) / (10 + k))


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                num_classes=3, heads=2, groups=4)


def _toy_data(n=20):
    g = torch.Generator().manual_seed(123)
    return torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


KW = dict(batch_size=8, lr=1e-3, warmup=2, ema_decay=0.9, grad_clip=0.5,
          time_sharing=TimeSharing(100, 5), p_uncond=0.3, seed=5, progress=False,
          ckpt_every=1)


def test_exact_resume_is_bit_identical(tmp_path):
    data = _toy_data()  # 20 items, batch 8: 2 batches per epoch, resume lands mid-epoch
    straight = _tiny_model()
    ema_a = train(straight, data, NoiseSchedule.linear(1000), steps=6, out_dir=str(tmp_path / "a"), **KW)
    part = _tiny_model()
    train(part, data, NoiseSchedule.linear(1000), steps=3, out_dir=str(tmp_path / "b"), **KW)
    resumed = _tiny_model(seed=99)  # different init: everything must come from the checkpoint
    ema_b = train(resumed, data, NoiseSchedule.linear(1000), steps=6, out_dir=str(tmp_path / "b"), **KW)
    for (k, v1), v2 in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v1, v2), k
    for (k, v1), v2 in zip(ema_a.state_dict().items(), ema_b.state_dict().values()):
        assert torch.equal(v1, v2), k
    ca, cb = (load_checkpoint(str(tmp_path / d / "checkpoint.pt")) for d in "ab")
    assert ca["step"] == cb["step"] == 6
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    la = [json.loads(s) for s in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(s) for s in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # The final EMA weights, in fastdiff's model format.
    sd = load_model(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ema_b.state_dict().items())
    assert ema_b.time_sharing == TimeSharing(100, 5)


def test_resume_with_dropout_is_bit_identical_and_leaves_the_callers_rng(tmp_path):
    # Dropout draws from the global RNG: two resumes (one mid-epoch, one at an epoch
    # start), with the caller's global RNG reseeded before each, still equal one straight run.
    data = _toy_data()
    s = NoiseSchedule.linear(1000)

    def dropout_model(seed=0):
        torch.manual_seed(seed)
        return UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                    num_classes=3, heads=2, groups=4, dropout=0.3)

    straight = dropout_model()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    ema_a = train(straight, data, s, steps=6, out_dir=str(tmp_path / "a"), **KW)
    assert torch.equal(torch.get_rng_state(), before)  # the run's draws were its own
    for caller_seed, steps in [(2, 3), (3, 4), (4, 6)]:
        resumed = dropout_model(seed=0 if steps == 3 else 99)  # resumes: all from the checkpoint
        torch.manual_seed(caller_seed)
        ema_b = train(resumed, data, s, steps=steps, out_dir=str(tmp_path / "b"), **KW)
    for name, a, b in [("model", straight, resumed), ("ema", ema_a, ema_b)]:
        for (k, v1), v2 in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v1, v2), (name, k, (v1 - v2).abs().max().item())
    la = [json.loads(r)["loss"] for r in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(r)["loss"] for r in open(tmp_path / "b" / "log.jsonl")]
    assert la == lb and len(la) == 6
    # dropout was really active: the same run without it ends elsewhere
    no_drop = _tiny_model()
    train(no_drop, data, s, steps=6, **KW)
    assert any(not torch.equal(v, straight.state_dict()[k]) for k, v in no_drop.state_dict().items())


def test_resume_with_different_settings_raises(tmp_path):
    data = _toy_data()
    train(_tiny_model(), data, NoiseSchedule.linear(1000), steps=1, out_dir=str(tmp_path), **KW)
    with pytest.raises(ValueError, match="settings differ"):
        train(_tiny_model(), data, NoiseSchedule.linear(1000), steps=2, out_dir=str(tmp_path),
              **{**KW, "lr": 5e-4})


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    data = _toy_data()
    train(_tiny_model(), data, NoiseSchedule.linear(1000), steps=2, out_dir=str(tmp_path), **KW)
    good = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        real_save({"partial": torch.zeros(3)}, f)  # some bytes land, then the crash
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ftrain.torch, "save", torn_save)
    with pytest.raises(OSError, match="simulated"):
        train(_tiny_model(), data, NoiseSchedule.linear(1000), steps=4, out_dir=str(tmp_path), **KW)
    monkeypatch.undo()
    after = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert after["step"] == good["step"] == 2
    assert all(torch.equal(after["model"][k], v) for k, v in good["model"].items())
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # and training resumes from it
    train(_tiny_model(), data, NoiseSchedule.linear(1000), steps=3, out_dir=str(tmp_path), **KW)
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 3


def test_atomic_save_replaces_whole_file(tmp_path):
    p = str(tmp_path / "x.pt")
    atomic_save({"a": torch.arange(3)}, p)
    atomic_save({"b": torch.ones(2)}, p)
    assert list(torch.load(p, weights_only=True)) == ["b"]


def test_train_rejects_bad_arguments():
    data = _toy_data()
    s = NoiseSchedule.linear(1000)
    with pytest.raises(ValueError, match="steps"):
        train(_tiny_model(), data, s, steps=-1, progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(_tiny_model(), data, s, steps=1, batch_size=64, progress=False)
    with pytest.raises(ValueError, match="null_class"):
        train(torch.nn.Conv2d(1, 1, 1), data, s, steps=1, batch_size=8, progress=False)
    with pytest.raises(TypeError, match="data"):
        train(_tiny_model(), [1, 2, 3], s, steps=1, progress=False)


DDP_KW = dict(batch_size=8, lr=2e-3, warmup=1, ema_decay=0.9, grad_clip=1.0,
              time_sharing=TimeSharing(100, 5), p_uncond=0.25, seed=3, progress=False)


def _ddp_worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model = _tiny_model()
        ema = train(model, _toy_data(), NoiseSchedule.linear(1000), steps=4, device="cpu", **DDP_KW)
        if rank == 0:
            torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process(tmp_path):
    out_file = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    ddp = torch.load(out_file, weights_only=True)
    single = _tiny_model()
    ema = train(single, _toy_data(), NoiseSchedule.linear(1000), steps=4, device="cpu", **DDP_KW)
    start = _tiny_model().state_dict()
    moved = 0
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(v, start[k]))
    assert moved > 0
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(ddp["ema"][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flag", ["--etsdm", "--baseline"])
def test_cli_train_writes_weights_log_and_summary(tmp_path, flag, capsys):
    from fastdiff.cli import main
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", flag, "--steps", "2", "--batch-size", "16",
                 "--channels", "8", "--t-tilde", "50", "--n", "5", "--no-progress",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "model.json").read_text())
    assert summary["command"].startswith(f"fastdiff train --data digits {flag} --steps 2 ")
    assert summary["time_sharing"] == ({"t_tilde": 50, "n": 5} if flag == "--etsdm" else None)
    assert summary["train"]["steps"] == 2 and summary["train"]["batch_size"] == 16
    assert [json.loads(s)["step"] for s in open(out / "log.jsonl")] == [1, 2]
    model = UNet(**summary["model"])  # the config alone rebuilds it, sharing included
    assert model.time_sharing == load_model(out)[0].time_sharing
    assert model.time_sharing == (TimeSharing(50, 5) if flag == "--etsdm" else None)
    model.load_state_dict(load_weights(out / "model.safetensors"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final_loss"] > 0
