"""Digits data, classifier, Frechet distance, and the embedded pretrained models."""
import math

import pytest
import torch

import fastdiff
from fastdiff.data import load_digits, save_grid
from fastdiff.metrics import (DigitsClassifier, classifier_accuracy, classify, digits_fd,
                              frechet_distance)
from fastdiff.schedules import TimeSharing


pytestmark = pytest.mark.usefixtures("one_thread")


def _with_moments(mu, cov, n, gen):
    """n samples whose sample mean and (unbiased) sample covariance are exactly mu, cov."""
    d = mu.numel()
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z = z - z.mean(0)
    lz = torch.linalg.cholesky(torch.cov(z.T))
    z = torch.linalg.solve_triangular(lz, z.T, upper=False).T  # sample cov = I
    return z @ torch.linalg.cholesky(cov).T + mu


def _random_spd(d, gen):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("use_scipy", [False, True])
def test_frechet_distance_2d_closed_form(use_scipy):
    # For 2x2 M = S1 S2 (positive eigenvalues l1, l2): tr sqrt(M) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr M + 2 sqrt(det M)), independent of any matrix square root routine.
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(2, 2, generator=g, dtype=torch.float64)
    s1, s2 = _random_spd(2, g), _random_spd(2, g)
    m = s1 @ s2
    tr_sqrt = math.sqrt(torch.trace(m).item() + 2 * math.sqrt(torch.det(m).item()))
    expected = ((mu1 - mu2) ** 2).sum().item() + torch.trace(s1 + s2).item() - 2 * tr_sqrt
    a, b = _with_moments(mu1, s1, 500, g), _with_moments(mu2, s2, 300, g)
    assert frechet_distance(a, b, use_scipy=use_scipy) == pytest.approx(expected, rel=1e-8, abs=1e-9)


@pytest.mark.parametrize("use_scipy", [False, True])
def test_frechet_distance_commuting_covariances(use_scipy):
    # Shared eigenvectors: tr (S1 S2)^(1/2) = sum sqrt(a_i b_i).
    g = torch.Generator().manual_seed(1)
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ea = torch.rand(d, generator=g, dtype=torch.float64) + 0.2
    eb = torch.rand(d, generator=g, dtype=torch.float64) + 0.2
    s1, s2 = q @ torch.diag(ea) @ q.T, q @ torch.diag(eb) @ q.T
    mu1, mu2 = torch.randn(2, d, generator=g, dtype=torch.float64)
    expected = (((mu1 - mu2) ** 2).sum() + (ea + eb - 2 * (ea * eb).sqrt()).sum()).item()
    a, b = _with_moments(mu1, s1, 400, g), _with_moments(mu2, s2, 700, g)
    assert frechet_distance(a, b, use_scipy=use_scipy) == pytest.approx(expected, rel=1e-8)
    # symmetric, zero on identical sets
    assert frechet_distance(b, a, use_scipy=use_scipy) == pytest.approx(expected, rel=1e-8)
    assert abs(frechet_distance(a, a.clone())) < 1e-8


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="feature dims"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"\[N >= 2, D\]"):
        frechet_distance(torch.randn(5), torch.randn(5, 1))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((3, 2), float("nan")), torch.randn(3, 2))
    with pytest.raises(TypeError):
        frechet_distance([[1.0, 2.0]], torch.randn(3, 2))


def test_digits_split_shapes_and_range():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8)
    assert x.min() == -1 and x.max() == 1 and x.dtype == torch.float32
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    # disjoint: no held-out image appears in the train split
    from sklearn.datasets import load_digits as sk
    assert len(x) + len(xt) == len(sk().target)
    x16, _ = load_digits("test", size=16)
    assert x16.shape == (360, 1, 16, 16)
    with pytest.raises(ValueError, match="split"):
        load_digits("val")


def test_classifier_heldout_accuracy():
    assert classifier_accuracy() >= 0.95


def test_digits_fd_separates_real_from_noise():
    xr, _ = load_digits("train")
    g = torch.Generator().manual_seed(2)
    real = digits_fd(xr[torch.randperm(len(xr), generator=g)[:360]])
    noise = digits_fd(torch.rand(360, 1, 8, 8, generator=g) * 2 - 1)
    noisy = digits_fd((xr[:360] + 0.3 * torch.randn(360, 1, 8, 8, generator=g)).clamp(-1, 1))
    assert real < noisy < noise
    assert real < 0.1 * noise


def test_classifier_shapes():
    m = DigitsClassifier()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert m(x).shape == (3, 10) and m.features(x).shape == (3, m.feature_dim)
    assert m(torch.rand(3, 1, 16, 16)).shape == (3, 10)
    with pytest.raises(ValueError, match="8x8 or 16x16"):
        m(torch.rand(3, 1, 9, 9))


def ddim(model, schedule, labels, steps, gen):
    """Independent deterministic DDIM (eta = 0) loop, applying the model's time sharing."""
    ac = schedule.alphas_cumprod
    ts = torch.linspace(schedule.T - 1, 0, steps).round().long()
    sharing = model.time_sharing
    x = torch.randn(len(labels), 1, 8, 8, generator=gen)
    with torch.no_grad():
        for i, t in enumerate(ts):
            a, s = ac[t].sqrt().float(), (1 - ac[t]).sqrt().float()
            tin = sharing(t) if sharing is not None else t
            eps = model(x, tin.expand(len(labels)), labels)
            x0 = ((x - s * eps) / a).clamp(-1, 1)
            if i + 1 == len(ts):
                return x0
            eps = (x - a * x0) / s
            an = ac[ts[i + 1]].sqrt().float()
            x = an * x0 + (1 - an ** 2).sqrt() * eps


@pytest.mark.parametrize("name", ["digits", "digits-baseline"])
def test_pretrained_loads_and_draws_recognizable_digits(name, tmp_path):
    model, schedule = fastdiff.pretrained(name)
    assert not model.training
    assert schedule.T == 1000 and schedule.kind == "linear"
    assert model.time_sharing == (TimeSharing(100, 5) if name == "digits" else None)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 <= n_params <= 2e6
    x = torch.randn(4, 1, 8, 8)
    out = model(x, torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,)))
    assert out.shape == x.shape and torch.isfinite(out).all()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(50) % 10
    samples = ddim(model, schedule, labels, 25, g)
    acc = (classify(samples) == labels).float().mean().item()
    assert acc >= 0.8, f"{name}: only {acc:.2f} of conditional samples classified as asked"
    save_grid(samples, str(tmp_path / "grid.png"))


def test_pretrained_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="digits-baseline"):
        fastdiff.pretrained("cifar10")


def test_pretrained_assets_are_plain_tensors():
    import os
    from fastdiff.model_io import load_weights
    from fastdiff.pretrained import ASSETS, PRETRAINED
    for name in PRETRAINED:
        path = os.path.join(ASSETS, name, "model.safetensors")
        sd = load_weights(path)
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
        assert os.path.getsize(path) < 8 * 2 ** 20
