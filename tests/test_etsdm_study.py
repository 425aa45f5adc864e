"""The E-TSDM study's pieces: bootstrap intervals, continuous-time training, the
benchmark pipeline end to end at a tiny size."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff import NoiseSchedule, TimeSharing
from fastdiff.metrics import (bootstrap_indices, frechet_distance, frechet_distance_resampled,
                              percentile_ci)
from fastdiff.nets import UNet
from fastdiff.train import diffusion_loss, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resampled_fd_equals_direct_fd_per_replicate():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(57, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(41, 6, generator=g) + 0.3
    ia, ib = bootstrap_indices(57, 7, g), bootstrap_indices(41, 7, g)
    got = frechet_distance_resampled(a, b, ia, ib)
    want = torch.tensor([frechet_distance(a[ia[r]], b[ib[r]]) for r in range(7)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_percentile_ci_matches_numpy_and_centres_on_the_estimate():
    r = np.random.default_rng(0).standard_normal(101) * 2 + 5
    lo, hi = percentile_ci(r, 0.9)
    np.testing.assert_allclose([lo, hi], np.percentile(r, [5, 95]), rtol=1e-12)
    clo, chi = percentile_ci(r, 0.9, estimate=4.0)
    np.testing.assert_allclose([clo, chi], [4.0 - (hi - lo) / 2, 4.0 + (hi - lo) / 2], rtol=1e-12)


def test_bootstrap_interval_covers_a_known_mean_about_95_percent():
    # 400 data sets of 60 normal draws; the percentile interval of the mean should cover 0
    # about 95% of the time (slightly less at this n: the percentile method's known
    # undercoverage, ~94%).
    g = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(400):
        x = torch.randn(60, generator=g, dtype=torch.float64) * 3.0
        lo, hi = percentile_ci(x[bootstrap_indices(60, 400, g)].mean(1))
        hits += lo <= 0.0 <= hi
    assert 0.90 <= hits / 400 <= 0.98


@pytest.mark.parametrize("call, exc, fragment", [
    (lambda: bootstrap_indices(1, 5), ValueError, "n must be an int >= 2"),
    (lambda: bootstrap_indices(5, 0), ValueError, "replicates"),
    (lambda: percentile_ci([1.0]), ValueError, ">= 2 finite"),
    (lambda: percentile_ci([1.0, 2.0], 1.5), ValueError, "level"),
    (lambda: frechet_distance_resampled(torch.randn(5, 2), torch.randn(5, 2),
                                        torch.zeros(3, 5, dtype=torch.long),
                                        torch.zeros(2, 5, dtype=torch.long)), ValueError, "same R"),
    (lambda: NoiseSchedule.vp_linear(t_eps=0.0), ValueError, "t_eps in (0, 0.5)"),
])
def test_bad_input(call, exc, fragment):
    with pytest.raises(exc) as e:
        call()
    assert fragment in str(e.value)


def test_vp_linear_t_eps_round_trips_and_default_dict_unchanged():
    s = NoiseSchedule.vp_linear(0.1, 20.0, t_eps=1e-5)
    assert s.t_eps == 1e-5 and NoiseSchedule.from_dict(s.to_dict()) == s
    assert NoiseSchedule.vp_linear().t_eps == 1e-3
    assert "t_eps" not in NoiseSchedule.vp_linear().to_dict()["params"]


class _Recorder(torch.nn.Module):
    """eps = a small conv of x (trainable), recording the times it is called with."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.detach().clone())
        return self.conv(x)


def test_continuous_training_draws_t_in_range_and_shares_it():
    sched = NoiseSchedule.vp_linear(t_eps=1e-5)
    sharing = TimeSharing.continuous(0.1, 5)
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m = _Recorder()
    train(m, x, sched, steps=20, batch_size=16, progress=False, warmup=0)
    t = torch.cat(m.seen)
    assert t.is_floating_point() and t.min() >= 1e-5 and t.max() <= 1.0 and t.std() > 0.2
    m2 = _Recorder()
    train(m2, x, sched, steps=20, batch_size=16, progress=False, warmup=0, time_sharing=sharing)
    t2 = torch.cat(m2.seen)
    torch.testing.assert_close(t2, sharing(t))  # same draws, the net sees f(t)
    # the loss uses the TRUE t: alpha_t x0 + sigma_t eps, checked against the closed form
    eps = torch.randn(x[:4].shape)
    tt = torch.tensor([1e-5, 0.05, 0.5, 1.0])
    a, s = sched.alpha(tt).float().view(-1, 1, 1, 1), sched.sigma(tt).float().view(-1, 1, 1, 1)
    loss = diffusion_loss(lambda xt, t: xt, x[:4], sched, t=tt, noise=eps)
    torch.testing.assert_close(loss, ((a * x[:4] + s * eps - eps) ** 2).mean())


@pytest.mark.slow  # two subprocesses (imports, classifier, 4 trainings): ~15-30 s on 2 cores
def test_bench_etsdm_pipeline_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = ["--out", str(tmp_path / "parts"), "--json", str(tmp_path / "all.json"),
              "--plot", str(tmp_path / "plot.png")]
    tiny = ["--train-steps", "2", "--batch", "16", "--width", "8", "--n", "20",
            "--replicates", "8", "--steps", "2", "--samplers", "ddim", "--probe-samples", "2"]
    script = os.path.join(ROOT, "benchmarks", "bench_etsdm.py")
    subprocess.run([sys.executable, script, "--only", "vp_linear", "linear", *tiny, *common],
                   check=True, env=env, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, script, "--report", *common], check=True, env=env,
                         capture_output=True, text=True, timeout=300).stdout
    res = json.loads((tmp_path / "all.json").read_text())
    assert os.path.getsize(tmp_path / "plot.png") > 0
    names = [p["setting"] for p in res["parts"]]
    assert names == ["vp_linear", "linear"]
    vp = res["parts"][0]
    assert [r["t_eps"] for r in vp["rows"]] == [1e-3, 1e-5]
    for p in res["parts"]:
        assert p["models"]["baseline"]["params"] == p["models"]["etsdm"]["params"]
        for r in p["rows"]:
            for v in ("baseline", "etsdm"):
                lo, hi = r[v]["fd_ci"]
                assert lo <= hi and r[v]["fd"] > 0 and 0 <= r[v]["acc"] <= 1
            assert r["rel_ci"][0] <= r["rel_ci"][1]
            assert abs(r["diff"] - (r["etsdm"]["fd"] - r["baseline"]["fd"])) < 1e-9
    assert "| vp_linear | 1e-05 | ddim | 2 |" in out
