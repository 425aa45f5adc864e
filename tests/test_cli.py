"""The command line: help, error reporting, the lipschitz outputs (all-zero curves, a
failing plot, the fd headline of an E-TSDM model). Run in-process through
``fastdiff.cli.main(argv)``; two end-to-end cases through a subprocess."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastdiff.cli as cli
from fastdiff import LipschitzResult
from fastdiff.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_m_fastdiff(*argv, timeout=120):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FASTDIFF_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fastdiff", *argv], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def test_bare_fastdiff_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: fastdiff")
    for command in ("info", "train", "sample", "lipschitz"):
        assert command in err
    assert main(["--debug"]) == 2


def test_error_is_one_line_with_status_2_and_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("FASTDIFF_DEBUG", raising=False)
    assert main(["sample", "--sampler", "nope", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff sample: error: unknown sampler 'nope'")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match="unknown sampler"):
        main(["--debug", "sample", "--sampler", "nope"])
    with pytest.raises(ValueError, match="unknown sampler"):
        main(["sample", "--sampler", "nope", "--debug"])
    monkeypatch.setenv("FASTDIFF_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown sampler"):
        main(["sample", "--sampler", "nope"])


def test_end_to_end_bad_output_path_is_one_line(tmp_path):
    r = _python_m_fastdiff("sample", "--out", str(tmp_path))  # a directory
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"fastdiff sample: error: --out {str(tmp_path)!r} is a directory; "
                                f"expected a file name, e.g. {str(tmp_path / 'out.png')!r}")


def test_lipschitz_all_zero_jvp_curve_writes_png_and_json(tmp_path, capsys):
    # E-TSDM's exact derivative is 0 on all of [0, 100): the plot used to raise "Data
    # cannot be log-scaled" after the whole probe, and nothing was written
    png, js = tmp_path / "k.png", tmp_path / "k.json"
    assert main(["lipschitz", "--model", "digits", "--method", "jvp", "--t-max", "100",
                 "--samples", "1", "--no-progress", "--out", str(png), "--json", str(js)]) == 0
    res = LipschitzResult.from_dict(json.loads(js.read_text())["curves"]["digits"])
    assert res.method == "jvp" and res.values.shape == (100, 1) and (res.values == 0).all()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "digits [jvp]: K(t=0) = 0" in capsys.readouterr().out


@pytest.mark.parametrize("with_json", [True, False])
def test_lipschitz_keeps_the_curves_when_the_plot_fails(tmp_path, monkeypatch, capsys, with_json):
    def broken(args, curves):
        raise RuntimeError("no display (simulated)")

    monkeypatch.setattr(cli, "_lipschitz_png", broken)
    png = tmp_path / "k.png"
    js = tmp_path / ("curves.json" if with_json else "k.json")  # k.json: the fallback
    argv = ["lipschitz", "--model", "gaussian", "--t-max", "5", "--samples", "2",
            "--no-progress", "--out", str(png)] + (["--json", str(js)] if with_json else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the plot failed (RuntimeError: no display (simulated))" in err and str(js) in err
    assert not png.exists()
    res = LipschitzResult.from_dict(json.loads(js.read_text())["curves"]["gaussian"])
    assert res.values.shape == (5, 2) and (res.values > 0).all()


def test_lipschitz_fd_headline_reports_sub_interval_ends_apart(tmp_path, capsys):
    js = tmp_path / "k.json"
    assert main(["lipschitz", "--model", "gaussian", "--model", "gaussian+etsdm", "--t-max",
                 "120", "--samples", "2", "--no-progress", "--out", str(tmp_path / "k.png"),
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    curves = json.loads(js.read_text())["curves"]
    shared = LipschitzResult.from_dict(curves["gaussian+etsdm"])
    k, t = shared.mean, shared.timesteps
    ends = torch.tensor([19, 39, 59, 79, 99])
    s = shared.meta["summary"]
    assert s["jump_t"] == ends.tolist() and s["jump_size"] == [20.0] * 5
    assert s["interior"] == 0 and s["interior_points"] == 95
    torch.testing.assert_close(torch.tensor(s["jumps"], dtype=torch.float64), k[ends].mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(s["jumps_per_unit_f"], dtype=torch.float64), k[ends].mean() / 20,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(s["above_split"], dtype=torch.float64), k[t >= 100].mean(), rtol=1e-12, atol=0)
    assert (f"at the 5 sub-interval ends t = 19, 39, 59, 79, 99: {s['jumps']:.4g}, "
            f"where f(t) jumps by 20") in out
    assert "inside the shared sub-intervals (95 points): 0" in out
    # without sharing: one number below t~ and one above, as before
    plain = LipschitzResult.from_dict(curves["gaussian"])
    line = next(ln for ln in out.splitlines() if "gaussian [fd]" in ln)
    assert f"mean K over t < 100: {plain.mean[:100].mean().item():.4g}" in line
    assert "jump" not in plain.meta["summary"] and "sub-interval" not in line
