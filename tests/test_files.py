"""Files fastdiff writes: atomic, with the permissions a plain open() would give (the
umask decides), and training checkpoints that refuse damaged or foreign files clearly."""
import os
import stat
import sys
import tomllib

import pytest
import torch

import fastdiff
from fastdiff import NoiseSchedule, TimeSharing, UNet
from fastdiff._files import atomic_open, atomic_save, atomic_write_text, remove_stale_temps
from fastdiff.train import CHECKPOINT, load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _writers(tmp_path):
    """Every public way fastdiff writes a file -> the paths it writes."""
    res = fastdiff.LipschitzResult(torch.arange(3.0, dtype=torch.float64),
                                   torch.rand(3, 2, dtype=torch.float64), "fd")
    from fastdiff.data import save_grid
    model = UNet(channels=8, num_res_blocks=1, groups=4, heads=2)
    return {
        "text": lambda: [atomic_write_text("x", tmp_path / "a.txt")],
        "torch": lambda: [atomic_save({"a": torch.ones(1)}, tmp_path / "b.pt")],
        "json": lambda: [res.to_json(tmp_path / "c.json")],
        "csv": lambda: [res.to_csv(tmp_path / "d.csv")],
        "png": lambda: [save_grid(torch.rand(4, 1, 8, 8) * 2 - 1, str(tmp_path / "e.png"))],
        "model": lambda: [os.path.join(fastdiff.save_model(model, tmp_path / "m"), f)
                          for f in ("model.json", "model.safetensors")],
    }


@pytest.mark.parametrize("kind", ["text", "torch", "json", "csv", "png", "model"])
def test_new_files_follow_the_umask_like_open(tmp_path, umask, kind):
    with open(tmp_path / "reference", "w"):
        pass
    expected = _mode(tmp_path / "reference")
    assert expected == 0o666 & ~umask
    for path in _writers(tmp_path)[kind]():
        assert _mode(path) == expected, (path, oct(_mode(path)))
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_rewrite_keeps_the_existing_mode_and_failures_leave_the_old_file(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text("one", p)
    os.chmod(p, 0o640)
    atomic_write_text("two", p)
    assert _mode(p) == 0o640 and p.read_text() == "two"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(p, "w") as f:
            f.write("torn")
            raise RuntimeError("boom")
    assert p.read_text() == "two" and sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_cli_png_and_json_follow_the_umask(tmp_path):
    from fastdiff.cli import main
    old = os.umask(0o027)
    try:
        assert main(["lipschitz", "--samples", "1", "--t-max", "3", "--no-progress",
                     "--out", str(tmp_path / "k.png"), "--json", str(tmp_path / "k.json")]) == 0
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k.png") == _mode(tmp_path / "k.json") == 0o640


# -- checkpoints --------------------------------------------------------------------------

def _tiny():
    torch.manual_seed(0)
    return UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                num_classes=3, heads=2, groups=4)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 1, 4, 4, generator=g) * 2 - 1, torch.randint(0, 3, (16,), generator=g)


KW = dict(batch_size=8, warmup=1, time_sharing=TimeSharing(100, 5), progress=False, ckpt_every=1)


def _train(out, steps, **kw):
    return train(_tiny(), _data(), NoiseSchedule.linear(1000), steps=steps, out_dir=str(out),
                 **{**KW, **kw})


def _damage(path, how):
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bit flip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x04  # inside the tensor data (the bulk of the file)
        path.write_bytes(bytes(b))
    elif how == "foreign torch file":
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    elif how == "text":
        path.write_text("hello\n")


@pytest.mark.parametrize("how", ["empty", "truncated", "bit flip", "foreign torch file", "text"])
def test_damaged_checkpoint_gives_a_clear_error(tmp_path, how):
    _train(tmp_path, 1)
    ckpt = tmp_path / CHECKPOINT
    _damage(ckpt, how)
    with pytest.raises(ValueError) as e:
        _train(tmp_path, 2)
    msg = str(e.value)
    assert str(ckpt) in msg and "--no-resume" in msg, msg
    # --no-resume (resume=False) starts over and rewrites a good checkpoint
    _train(tmp_path, 2, resume=False)
    assert load_checkpoint(str(ckpt))["step"] == 2


def test_checkpoint_of_another_model_gives_a_clear_error(tmp_path):
    _train(tmp_path, 1)
    other = UNet(channels=4, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                 num_classes=3, heads=2, groups=4)
    with pytest.raises(ValueError, match="another model.*--no-resume"):
        train(other, _data(), NoiseSchedule.linear(1000), steps=2, out_dir=str(tmp_path), **KW)


def test_bit_flip_is_caught_by_the_checksum_not_by_luck(tmp_path):
    _train(tmp_path, 1)
    ckpt = tmp_path / CHECKPOINT
    _damage(ckpt, "bit flip")
    # the payload still unpickles: only the checksum tells it apart
    head, _, payload = ckpt.read_bytes().partition(b"\n")
    import io
    torch.load(io.BytesIO(payload), weights_only=True)
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(str(ckpt))


def test_stale_temp_files_are_removed_when_training_starts(tmp_path):
    _train(tmp_path, 1)
    stale = [tmp_path / "checkpoint.pt.abc123xy.tmp", tmp_path / "model.json.0badc0de.tmp",
             tmp_path / "log.jsonl.q1w2e3r4.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = tmp_path / "notes.tmp"  # not ours
    keep.write_text("mine")
    _train(tmp_path, 2)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert remove_stale_temps(tmp_path / "x") == []


def test_checkpoints_of_earlier_versions_still_resume(tmp_path):
    _train(tmp_path, 1)
    ckpt = tmp_path / CHECKPOINT
    state = load_checkpoint(str(ckpt))
    torch.save(state, ckpt)  # the plain torch.save layout fastdiff 0.1 wrote
    _train(tmp_path, 2)
    assert load_checkpoint(str(ckpt))["step"] == 2


# -- dependencies -------------------------------------------------------------------------

def test_default_install_has_the_main_jobs_dependencies():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert {"scikit-learn", "matplotlib", "safetensors"} <= names


@pytest.mark.parametrize("argv, blocked", [
    (["sample", "--no-progress"], "sklearn"),
    (["sample", "--model", "gaussian-mixture", "--no-progress"], "matplotlib"),
    (["lipschitz", "--model", "digits", "--no-progress"], "sklearn"),
    (["train", "--steps", "1", "--out", "unused"], "sklearn"),
])
def test_cli_checks_dependencies_before_work(monkeypatch, capsys, tmp_path, argv, blocked):
    import fastdiff.samplers
    import fastdiff.train
    from fastdiff.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, blocked, None)  # as if not installed
    monkeypatch.setattr(fastdiff.samplers, "sample", lambda *a, **k: pytest.fail("sampled"))
    monkeypatch.setattr(fastdiff.train, "train", lambda *a, **k: pytest.fail("trained"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert blocked in err and "pip install" in err
    assert list(tmp_path.iterdir()) == []
