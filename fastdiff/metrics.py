"""Sample-quality metrics for the digits models: a small CNN classifier and Frechet distance.

``digits_fd(samples)`` is the FID recipe at digits scale: the Frechet distance between
Gaussians fitted to the classifier's penultimate features of the samples and of the
held-out real digits. ``classify(samples)`` gives predicted labels, e.g. to check that a
class-conditional model draws the class it was asked for.

The classifier's weights ship in ``fastdiff/assets/digits_classifier.pt`` (a plain
state_dict); ``python -m fastdiff.metrics`` retrains them.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model_io import load_weights

__all__ = ["DigitsClassifier", "frechet_distance", "digits_fd", "digits_fd_sharded", "sharded_moments", "classify",
           "digits_features", "feature_moments", "frechet_from_moments",
           "load_classifier", "train_classifier", "classifier_accuracy", "CLASSIFIER_FILE",
           "bootstrap_indices", "frechet_distance_resampled", "percentile_ci"]

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
CLASSIFIER_FILE = os.path.join(ASSETS, "digits_classifier.safetensors")
CLASSIFIER_INFO = os.path.join(ASSETS, "digits_classifier.json")


class DigitsClassifier(nn.Module):
    """CNN for 8x8 digits in [-1, 1]: ``forward(x [B, 1, 8, 8]) -> logits [B, 10]``.

    ``features(x) -> [B, feature_dim]``: the penultimate layer (after ReLU), the space
    ``digits_fd`` measures in. 16x16 input is area-downsampled to 8x8 first.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 4x4
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 2x2
            nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError("DigitsClassifier: expected images [B, 1, 8, 8] (or 16x16) in "
                             f"[-1, 1], got {got}")
        if tuple(x.shape[-2:]) == (16, 16):
            x = F.avg_pool2d(x, 2)
        elif tuple(x.shape[-2:]) != (8, 8):
            raise ValueError(f"DigitsClassifier: images must be 8x8 or 16x16, got {tuple(x.shape[-2:])}")
        p = next(self.parameters())
        return x.to(p.device, p.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self._prep(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Random +-1 pixel translations (background is -1): cheap, and keeps the classifier
    # from keying on exact stroke positions, which generated digits do not reproduce.
    B = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (B,), generator=gen)
    dy = torch.randint(0, 3, (B,), generator=gen)
    H, W = x.shape[-2:]
    rows = (dy[:, None] + torch.arange(H)[None])[:, :, None].expand(B, H, W)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, :].expand(B, H, W)
    idx = (rows * (W + 2) + cols).reshape(B, 1, H * W)
    return padded.reshape(B, 1, -1).gather(2, idx).reshape_as(x)


def train_classifier(*, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, progress: bool = True) -> tuple[DigitsClassifier, float]:
    """Train the classifier on the digits train split. Returns (model in eval mode,
    held-out accuracy in [0, 1])."""
    from tqdm.auto import tqdm

    from .data import load_digits

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digits("train")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), disable=not progress, desc="classifier"):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb = _shift_augment(x[idx], gen)
        xb = xb + 0.05 * torch.randn(xb.shape, generator=gen)  # robustness to sampler noise
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, classifier_accuracy(model)


@torch.no_grad()
def classifier_accuracy(model: nn.Module | None = None, split: str = "test") -> float:
    """Accuracy of ``model`` (default: the shipped classifier) on a digits split."""
    from .data import load_digits

    model = model if model is not None else load_classifier()
    x, y = load_digits(split)
    return (model(x).argmax(1) == y).float().mean().item()


_CLASSIFIER: DigitsClassifier | None = None


def load_classifier() -> DigitsClassifier:
    """The shipped classifier (eval mode, cached; safetensors: nothing is unpickled)."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        if not os.path.exists(CLASSIFIER_FILE):
            raise FileNotFoundError(f"{CLASSIFIER_FILE} is missing; run `python -m fastdiff.metrics`")
        model = DigitsClassifier()
        model.load_state_dict(load_weights(CLASSIFIER_FILE))
        _CLASSIFIER = model.eval().requires_grad_(False)
    return _CLASSIFIER


def _as_f64_2d(a, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"frechet_distance: {name} must be a tensor or ndarray [N, D], "
                        f"got {type(a).__name__}")
    if a.dim() != 2 or a.shape[0] < 2:
        raise ValueError(f"frechet_distance: {name} must have shape [N >= 2, D], got {tuple(a.shape)}")
    a = a.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    return a


def _trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor, use_scipy: bool) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2 (float64)."""
    if use_scipy:
        from scipy import linalg
        covmean = linalg.sqrtm(s1.numpy() @ s2.numpy())
        if not np.isfinite(covmean).all():
            # Singular product: the pytorch-fid remedy, a tiny ridge on both.
            off = np.eye(s1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s1.numpy() + off) @ (s2.numpy() + off))
        return float(np.real(np.trace(covmean)))
    # S1 S2 is similar to the symmetric PSD S1^(1/2) S2 S1^(1/2): same eigenvalues, so the
    # trace of the square root is the sum of their square roots. Exact also when S1 S2 is
    # singular (dead ReLU features), where a general sqrtm loses accuracy.
    w1, v1 = torch.linalg.eigh(s1)
    r1 = (v1 * w1.clamp_min(0).sqrt()) @ v1.T
    m = r1 @ s2 @ r1
    w = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(w.clamp_min(0).sqrt().sum())


def frechet_distance(feats_a, feats_b, *, use_scipy: bool = False) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, D], [N_b, D].

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with unbiased covariances,
    in float64. ``tr (S_a S_b)^(1/2)`` comes from a symmetric eigen-decomposition in torch
    (exact for PSD matrices, singular ones included); ``use_scipy=True`` uses
    ``scipy.linalg.sqrtm(S_a @ S_b)`` instead, as pytorch-fid does.
    """
    a, b = _as_f64_2d(feats_a, "feats_a"), _as_f64_2d(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature dims differ ({a.shape[1]} vs {b.shape[1]})")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    tr = _trace_sqrt_product(s_a, s_b, use_scipy)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2.0 * tr)


def feature_moments(feats) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(n, sum f [D], sum f f^T [D, D]) of features [n, D] in float64: what ranks add up
    (``fastdiff.distributed.all_reduce_sum``) to get the statistics of all samples, as
    EDM's fid.py does."""
    f = feats.detach().to("cpu", torch.float64)
    if f.dim() != 2:
        raise ValueError(f"feature_moments: expected features [n, D], got {tuple(f.shape)}")
    return f.shape[0], f.sum(0), f.T @ f


def frechet_from_moments(n: int, s: torch.Tensor, ss: torch.Tensor, feats_b,
                         *, use_scipy: bool = False) -> float:
    """:func:`frechet_distance` of the features whose :func:`feature_moments` are
    (n, s, ss) against ``feats_b`` [N_b, D]: mean s / n, unbiased covariance
    (ss - n mu mu^T) / (n - 1). Equal to the direct formula up to float64 rounding."""
    if n < 2:
        raise ValueError(f"frechet_from_moments: need n >= 2 samples, got {n}")
    b = _as_f64_2d(feats_b, "feats_b")
    mu_a = s / n
    s_a = (ss - n * torch.outer(mu_a, mu_a)) / (n - 1)
    s_a = (s_a + s_a.T) / 2
    mu_b, s_b = b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1)
    tr = _trace_sqrt_product(s_a, s_b, use_scipy)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2.0 * tr)


@torch.no_grad()
def digits_features(samples: torch.Tensor) -> torch.Tensor:
    """The shipped classifier's penultimate features [N, D] of images [N, 1, 8, 8] in
    [-1, 1] (clamped): the space :func:`digits_fd` measures in."""
    return load_classifier().features(samples.float().clamp(-1, 1))


@torch.no_grad()
def classify(samples: torch.Tensor) -> torch.Tensor:
    """Predicted digit labels int64 [B] of images [B, 1, 8, 8] in [-1, 1]."""
    return load_classifier()(samples.float().clamp(-1, 1)).argmax(1).cpu()


@torch.no_grad()
def digits_fd(samples: torch.Tensor, *, reference: str = "test") -> float:
    """FD between ``samples`` [N, 1, 8, 8] in [-1, 1] (clamped) and real digits (default:
    the 360 held-out ones) in the shipped classifier's penultimate feature space.

    Lower is better; real train digits vs held-out digits score about the noise floor of
    this estimator at these sample sizes (compare models at equal N).
    """
    from .data import load_digits

    real, _ = load_digits(reference)
    return frechet_distance(digits_features(samples), digits_features(real))


@torch.no_grad()
def sharded_moments(parts) -> tuple[int, torch.Tensor, torch.Tensor]:
    """:func:`feature_moments` of the digits features of every rank's samples, summed
    over the ranks of torch.distributed (a single process: its own).

    parts: this rank's samples as a list of [n_i, 1, 8, 8] tensors in [-1, 1] (e.g. one
    per shard file). Features are computed part by part: a network's output depends on
    its batch's composition in the last bits, so parts that do not depend on the world
    size give features that do not either. The moments are then equal for every world
    size up to float64 rounding (only the order of the additions differs).
    """
    from .distributed import all_reduce_sum

    if isinstance(parts, torch.Tensor):
        parts = [parts]
    D = load_classifier().features(torch.zeros(1, 1, 8, 8)).shape[1]
    n, s, ss = 0, torch.zeros(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    for x in parts:
        if x.shape[0]:
            ni, si, ssi = feature_moments(digits_features(x))
            n, s, ss = n + ni, s + si, ss + ssi
    packed = all_reduce_sum(torch.cat([torch.tensor([float(n)], dtype=torch.float64), s, ss.reshape(-1)]))
    return int(packed[0].item()), packed[1:1 + D], packed[1 + D:].reshape(D, D)


@torch.no_grad()
def digits_fd_sharded(parts, *, reference: str = "test") -> float:
    """:func:`digits_fd` of the union of every rank's ``parts`` (see
    :func:`sharded_moments`). With fewer samples than feature dimensions the sample
    covariance is singular and the square root in the FD turns float64 rounding of its
    zero eigenvalues into ~1e-8 relative differences; the moments themselves agree to
    rounding."""
    from .data import load_digits

    real, _ = load_digits(reference)
    return frechet_from_moments(*sharded_moments(parts), digits_features(real))


def _main() -> int:  # python -m fastdiff.metrics: retrain and ship the classifier
    import time

    from ._files import atomic_write_text
    from .model_io import save_weights

    t0 = time.time()
    model, acc = train_classifier()
    save_weights(model.state_dict(), CLASSIFIER_FILE)
    info = {"command": "python -m fastdiff.metrics", "heldout_accuracy": acc,
            "train_time_s": round(time.time() - t0, 1), "torch": torch.__version__}
    atomic_write_text(json.dumps(info, indent=2) + "\n", CLASSIFIER_INFO)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())


# -- error bars: bootstrap over samples ---------------------------------------------------

def bootstrap_indices(n: int, replicates: int, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """``replicates`` resamples with replacement of ``range(n)``: int64 [replicates, n].

    Use the same rows for every model whose sample i came from the same seed (a paired
    bootstrap: the spread of a difference then excludes the seeds' common variation)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"bootstrap_indices: n must be an int >= 2, got {n!r}")
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"bootstrap_indices: replicates must be a positive int, got {replicates!r}")
    return torch.randint(0, n, (replicates, n), generator=generator)


def _batched_moments(f: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # mean [R, D] and unbiased covariance [R, D, D] of f[idx[r]] for every replicate r
    x = f[idx]                                            # [R, n, D]
    mu = x.mean(1)
    xc = x - mu[:, None]
    return mu, xc.transpose(1, 2) @ xc / (x.shape[1] - 1)


def frechet_distance_resampled(feats_a, feats_b, idx_a: torch.Tensor,
                               idx_b: torch.Tensor) -> torch.Tensor:
    """:func:`frechet_distance` of ``feats_a[idx_a[r]]`` against ``feats_b[idx_b[r]]`` for
    every replicate r, batched: float64 [R]. feats [N_a, D] / [N_b, D]; idx int64
    [R, n_a] / [R, n_b] (e.g. from :func:`bootstrap_indices`)."""
    a, b = _as_f64_2d(feats_a, "feats_a"), _as_f64_2d(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance_resampled: feature dims differ ({a.shape[1]} vs {b.shape[1]})")
    if idx_a.dim() != 2 or idx_b.dim() != 2 or idx_a.shape[0] != idx_b.shape[0]:
        raise ValueError("frechet_distance_resampled: idx_a and idx_b must be [R, n] with the same R, "
                         f"got {tuple(idx_a.shape)} and {tuple(idx_b.shape)}")
    mu_a, s_a = _batched_moments(a, idx_a)
    mu_b, s_b = _batched_moments(b, idx_b)
    # the eigen route of _trace_sqrt_product, per replicate
    w1, v1 = torch.linalg.eigh(s_a)
    r1 = (v1 * w1.clamp_min(0).sqrt()[:, None]) @ v1.transpose(1, 2)
    m = r1 @ s_b @ r1
    tr = torch.linalg.eigvalsh((m + m.transpose(1, 2)) / 2).clamp_min(0).sqrt().sum(1)
    trace = lambda s: s.diagonal(dim1=1, dim2=2).sum(1)  # noqa: E731
    return (mu_a - mu_b).pow(2).sum(1) + trace(s_a) + trace(s_b) - 2.0 * tr


def percentile_ci(replicates, level: float = 0.95, *, estimate: float | None = None
                  ) -> tuple[float, float]:
    """Bootstrap interval from the replicates [R] of a statistic.

    Without ``estimate``: the percentile interval ``(q_lo, q_hi)``, the (1 - level) / 2
    and (1 + level) / 2 quantiles (linear interpolation, as ``numpy.percentile``). With
    the full-sample ``estimate`` theta: the same width centred on theta,
    ``theta -+ (q_hi - q_lo) / 2`` (the normal interval when the replicates are normal).
    Use that for the FD: resamples with duplicated rows read systematically high (by
    about the estimator's own bias), which shifts the percentile interval off the
    estimate, and reflecting it (the "basic" interval) overcorrects into negative FDs
    near the noise floor. The width, the spread at this n, is what comparisons need.
    """
    r = torch.as_tensor(replicates, dtype=torch.float64).reshape(-1)
    if r.numel() < 2 or not torch.isfinite(r).all():
        raise ValueError("percentile_ci: need >= 2 finite replicates")
    if not 0 < level < 1:
        raise ValueError(f"percentile_ci: level must be in (0, 1), got {level!r}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(r, q).tolist()
    if estimate is None:
        return lo, hi
    half = (hi - lo) / 2.0
    return float(estimate) - half, float(estimate) + half
