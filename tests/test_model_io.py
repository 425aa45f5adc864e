"""One model format: save_model / load_model, the shipped models, `fastdiff train` runs
through the CLI's --model, diffusers folders, and loading that never executes code."""
import json
import os
import pickle

import pytest
import torch

import fastdiff
from fastdiff import NoiseSchedule, TimeSharing, UNet, load_model, save_model
from fastdiff.model_io import load_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(sharing=None, prediction_type="epsilon"):
    return UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                num_classes=3, heads=2, groups=4, time_sharing=sharing,
                prediction_type=prediction_type)


def _perturbed(model, gen):
    # conv_out starts at zero: give every weight a random value so a round trip is tested
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("schedule", [NoiseSchedule.scaled_linear(500),
                                      NoiseSchedule.from_betas(torch.linspace(1e-4, 0.03, 50)),
                                      None])
def test_round_trip_keeps_weights_sharing_schedule_prediction(tmp_path, gen, schedule):
    model = _perturbed(_unet(TimeSharing(40, 4), "v_prediction"), gen)
    save_model(model, tmp_path / "m", schedule=schedule)
    loaded, sched = load_model(tmp_path / "m")
    assert isinstance(loaded, UNet) and not loaded.training
    assert loaded.time_sharing == TimeSharing(40, 4)
    assert loaded.prediction_type == "v_prediction"
    assert sched == schedule
    x, t = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([3, 250])
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, labels), model.eval()(x, t, labels))
    cfg = json.loads((tmp_path / "m" / "model.json").read_text())
    # the run's own JSON rebuilds the schedule and (with its sharing) the UNet
    if schedule is not None:
        assert NoiseSchedule.from_dict(cfg["schedule"]) == schedule
    assert UNet(**cfg["model"]).time_sharing == TimeSharing(40, 4)


def test_unet_config_carries_time_sharing():
    m = _unet(TimeSharing(100, 5))
    assert UNet(**m.config).time_sharing == TimeSharing(100, 5)
    m.time_sharing = None  # train() sets it on the EMA copy after the fact
    assert UNet(**m.config).time_sharing is None
    with pytest.raises(TypeError, match="time_sharing"):
        m.time_sharing = 5


def test_save_model_explicit_arguments_and_errors(tmp_path):
    m = _unet(None)
    save_model(m, tmp_path / "a", time_sharing=TimeSharing(20, 2))  # recorded, then restored
    assert load_model(tmp_path / "a")[0].time_sharing == TimeSharing(20, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        save_model(m, tmp_path / "b", prediction_type="sample")  # not what the UNet predicts
    with pytest.raises(TypeError, match="schedule"):
        save_model(m, tmp_path / "b", schedule="linear")
    with pytest.raises(TypeError, match="nn.Module"):
        save_model(object(), tmp_path / "b")
    with pytest.raises(ValueError, match="own keys.*schedule"):
        save_model(m, tmp_path / "b", extra={"schedule": "mine"})
    with pytest.raises(TypeError, match="JSON-safe"):
        save_model(m, tmp_path / "b", extra={"when": object()})
    assert not (tmp_path / "b").exists()


def test_shipped_models_load_through_the_format():
    assets = os.path.join(os.path.dirname(fastdiff.__file__), "assets")
    for name, sharing in [("digits", TimeSharing(100, 5)), ("digits-baseline", None)]:
        model, schedule = fastdiff.pretrained(name)
        assert model.time_sharing == sharing and schedule == NoiseSchedule.linear(1000)
        folder = os.path.join(assets, name)
        assert sorted(os.listdir(folder)) == ["model.json", "model.safetensors"]
        again, _ = load_model(folder)  # the same through a path
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert not [f for f in os.listdir(assets) if f.endswith(".pt")]


def test_unknown_name_or_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="neither a shipped model.*digits-baseline"):
        load_model("digts")
    with pytest.raises(ValueError, match="neither a shipped model"):
        fastdiff.pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model(tmp_path)
    with pytest.raises(TypeError, match="folder path"):
        load_model(3)


class _Exploit:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_in_place_of_the_weights_does_nothing(tmp_path):
    save_model(_unet(TimeSharing(100, 5)), tmp_path / "m", schedule=NoiseSchedule.linear())
    marker = tmp_path / "pwned"
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(pickle.dumps({"w": _Exploit(str(marker))}))
    with pytest.raises(ValueError, match="model.safetensors.*sha256"):
        load_model(tmp_path / "m")
    # also with the checksum updated to match: the file is parsed as safetensors only
    cfg = json.loads((tmp_path / "m" / "model.json").read_text())
    import hashlib
    cfg["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / "m" / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a safetensors file.*nothing was executed"):
        load_model(tmp_path / "m")
    # a legacy run folder (model.pt) is read with weights_only=True
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"w": _Exploit(str(marker))}, legacy / "model.pt")
    (legacy / "model.json").write_text(json.dumps({"model": _unet().config}))
    with pytest.raises(ValueError, match="model.pt.*weights_only=True"):
        load_model(legacy)
    assert not marker.exists()


def test_bit_flip_in_the_weights_is_detected(tmp_path, gen):
    save_model(_perturbed(_unet(), gen), tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's bytes
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_model(tmp_path / "m")


def test_legacy_run_folder_loads_weights_only(tmp_path, gen):
    """Run folders of earlier versions: model.pt state_dict + a model.json whose schedule
    is the flat {"kind", "T", ...} form and whose UNet config lacks time_sharing."""
    model = _perturbed(_unet(), gen)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    cfg = {k: v for k, v in model.config.items() if k != "time_sharing"}
    (tmp_path / "model.json").write_text(json.dumps({
        "model": cfg, "time_sharing": {"t_tilde": 100, "n": 5},
        "schedule": {"kind": "linear", "T": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                     "rescale_zero_terminal_snr": False}}))
    loaded, sched = load_model(tmp_path)
    assert loaded.time_sharing == TimeSharing(100, 5) and sched == NoiseSchedule.linear(1000)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_train_cli_run_is_a_model_for_every_command(tmp_path, capsys):
    """`fastdiff train --out runs/x`, then `sample --model runs/x`, `lipschitz --model
    runs/x` and fastdiff.load_model("runs/x"): the E-TSDM sharing and schedule are kept."""
    from fastdiff.cli import main
    run = tmp_path / "runs" / "x"
    assert main(["train", "--steps", "2", "--batch-size", "16", "--channels", "8",
                 "--t-tilde", "40", "--n", "4", "--no-progress", "--out", str(run)]) == 0
    model, schedule = load_model(str(run))
    assert model.time_sharing == TimeSharing(40, 4) and schedule == NoiseSchedule.linear(1000)
    assert fastdiff.pretrained(str(run))[0].time_sharing == TimeSharing(40, 4)
    capsys.readouterr()
    png = tmp_path / "s.png"
    assert main(["sample", "--model", str(run), "--n", "10", "--steps", "2", "--no-progress",
                 "--json", "--out", str(png)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["time_sharing"] == [40, 4] and png.stat().st_size > 0
    out_json = tmp_path / "k.json"
    assert main(["lipschitz", "--model", str(run), "--samples", "2", "--t-max", "45",
                 "--no-progress", "--out", str(tmp_path / "k.png"), "--json", str(out_json)]) == 0
    curve = json.loads(out_json.read_text())["curves"][str(run)]
    # probed through the run's own sharing: exactly 0 inside each 10-wide sub-interval
    assert curve["meta"]["time_sharing"] == {"t_tilde": 40, "n": 4}
    values = torch.tensor(curve["values"])
    inside = [t for t in range(40) if t % 10 != 9]
    assert torch.all(values[inside] == 0) and torch.all(values[[9, 19, 29, 39]] > 0)


def test_cli_refuses_a_bad_model_path_before_work(tmp_path, capsys, monkeypatch):
    import fastdiff.samplers
    from fastdiff.cli import main

    monkeypatch.setattr(fastdiff.samplers, "sample", lambda *a, **k: pytest.fail("sampled"))
    assert main(["sample", "--model", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "neither a shipped model" in capsys.readouterr().err
    assert main(["lipschitz", "--model", "gaussian", "--model", str(tmp_path / "none"),
                 "--no-progress", "--out", str(tmp_path / "k.png")]) == 2
    assert "neither a shipped model" in capsys.readouterr().err
    assert not (tmp_path / "k.png").exists()


def _tiny_diffusers_unet():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                       norm_num_groups=4)


def test_patched_diffusers_unet_keeps_its_sharing_through_save_pretrained(tmp_path, gen):
    from diffusers import UNet2DModel

    unet = fastdiff.patch_time_embedding(_tiny_diffusers_unet(), sharing=TimeSharing(100, 5))
    unet.save_pretrained(tmp_path / "d")
    # plain diffusers forgets it (time_proj is diffusers' Timesteps again) ...
    assert type(UNet2DModel.from_pretrained(tmp_path / "d").time_proj).__name__ == "Timesteps"
    # ... fastdiff.load_model restores it from the saved config
    loaded, schedule = load_model(tmp_path / "d")
    assert isinstance(loaded.time_proj, fastdiff.SinusoidalEmbedding)
    assert loaded.time_proj.sharing == TimeSharing(100, 5) and schedule is None
    x = torch.randn(2, 1, 8, 8, generator=gen)
    t = torch.tensor([17, 530])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, unet.eval()(x, t).sample)
        # and it equals the original diffusers UNet called with f(t)
        plain = UNet2DModel.from_pretrained(tmp_path / "d").eval()
        torch.testing.assert_close(loaded(x, t).sample, plain(x, torch.tensor([0, 530])).sample)
    # un-patching records "no sharing"
    fastdiff.patch_time_embedding(unet, sharing=None)
    unet.save_pretrained(tmp_path / "e")
    assert load_model(tmp_path / "e")[0].time_proj.__class__.__name__ == "Timesteps"


def test_save_model_of_a_diffusers_unet_records_schedule(tmp_path):
    unet = _tiny_diffusers_unet()
    save_model(unet, tmp_path / "d", schedule=NoiseSchedule.linear(1000),
               time_sharing=TimeSharing(100, 5), prediction_type="v_prediction")
    loaded, schedule = load_model(tmp_path / "d")
    assert schedule == NoiseSchedule.linear(1000)
    assert loaded.time_proj.sharing == TimeSharing(100, 5)
    assert loaded.prediction_type == "v_prediction"
    assert os.path.exists(tmp_path / "d" / "diffusion_pytorch_model.safetensors")


def test_other_modules_save_weights_and_refuse_to_guess_the_class(tmp_path, gen):
    net = torch.nn.Linear(3, 2)
    save_model(net, tmp_path / "n")
    with pytest.raises(ValueError, match="torch.nn.modules.linear.Linear.*load_weights"):
        load_model(tmp_path / "n")
    sd = load_weights(tmp_path / "n" / "model.safetensors")
    assert torch.equal(sd["weight"], net.weight.detach())


def test_import_fastdiff_stays_light():
    """The model format's dependencies are imported when a model is saved or loaded,
    not by `import fastdiff` (measured by benchmarks/bench_import.py)."""
    import subprocess
    import sys
    code = ("import sys, fastdiff; print(sorted(m for m in ('safetensors', 'diffusers', "
            "'sklearn', 'matplotlib') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "[]", out.stdout
