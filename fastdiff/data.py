"""The embedded real data set: sklearn's 8x8 handwritten digits (works offline).

``load_digits(split)`` returns images in [-1, 1] with shape [N, 1, H, W] (float32) and
integer labels [N] (int64). The train / held-out split is fixed (stratified, seeded), so
the classifier, the FD metric and the diffusion models all agree on which digits were
never trained on.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ._files import atomic_open

__all__ = ["load_digits", "digits_dataset", "load_brightness", "BRIGHTNESS_CLASSES",
           "to_pixels", "save_grid", "DIGITS_MAX",
           "SPLITS"]

DIGITS_MAX = 16.0  # sklearn's digits are integer gray levels 0..16
SPLITS = ("train", "test", "all")
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] in 0..16, labels, train indices, held-out indices)."""
    try:
        from sklearn.datasets import load_digits as _sk_load
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # a default dependency; only a broken environment lacks it
        raise ImportError("fastdiff.data needs scikit-learn (pip install scikit-learn)") from e
    d = _sk_load()
    images = d.images.astype(np.float32)  # [1797, 8, 8] in 0..16
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    # Stratified so the held-out set has every class in its natural proportion.
    train_idx, test_idx = train_test_split(idx, test_size=HOLDOUT_FRACTION,
                                           random_state=SPLIT_SEED, stratify=labels)
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def load_digits(split: str = "train", *, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as tensors.

    Args:
        split: "train" (1437 images), "test" (360 held-out images) or "all" (1797).
        size: 8 (native) or 16 (bilinear upsampling of the native images).

    Returns:
        (images [N, 1, size, size] float32 in [-1, 1], labels [N] int64 in 0..9).
    """
    if split not in SPLITS:
        raise ValueError(f"load_digits: split must be one of {SPLITS}, got {split!r}")
    if size not in (8, 16):
        raise ValueError(f"load_digits: size must be 8 or 16, got {size!r}")
    images, labels, train_idx, test_idx = _raw_digits()
    idx = {"train": train_idx, "test": test_idx, "all": np.arange(len(labels))}[split]
    x = torch.from_numpy(images[idx]).unsqueeze(1) * (2.0 / DIGITS_MAX) - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous(), torch.from_numpy(labels[idx]).clone()


def digits_dataset(split: str = "train", *, size: int = 8) -> torch.utils.data.TensorDataset:
    """``load_digits`` as a ``TensorDataset`` of (image [1, H, W], label) pairs."""
    return torch.utils.data.TensorDataset(*load_digits(split, size=size))


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> gray levels [0, 1] (clamped), same shape, float32."""
    return ((x.detach().float().cpu() + 1.0) * 0.5).clamp(0.0, 1.0)


def save_grid(x: torch.Tensor, path: str, *, nrow: int = 10, scale: int = 4) -> str:
    """Write images [N, 1, H, W] in [-1, 1] as one PNG grid (``nrow`` per row), atomically.

    Each pixel is drawn as a ``scale`` x ``scale`` block (8x8 digits are tiny otherwise).
    Returns ``path``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"save_grid: expected images [N, 1, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = to_pixels(x)[:, 0]
    n, h, w = p.shape
    rows = (n + nrow - 1) // nrow
    pad = 1
    grid = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 0.5)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + c * (w + pad): pad + c * (w + pad) + w] = p[i]
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    with atomic_open(path, "wb") as f:
        plt.imsave(f, grid.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, format="png")
    return path


BRIGHTNESS_CLASSES = tuple(f"digit {i}" for i in range(10)) + (
    "inverted digits", "near-solid black", "near-solid white")


def load_brightness(split: str = "train", *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-conditional set with the brightness extremes diffusion models miss.

    Classes (13): 0..9 the digits of :func:`load_digits` (dark background, mean pixel
    about -0.39), 10 the same digits inverted (``-x``, bright background, about +0.39),
    11 near-solid black and 12 near-solid white images: a per-image level drawn
    uniformly from [-1, -0.6] (resp. [0.6, 1]) plus per-pixel N(0, 0.03^2) noise,
    clipped to [-1, 1]. The digits split is ``load_digits``'s; each solid class has half
    as many images as the inverted class and is drawn from ``seed`` and the split, so
    the set is the same on every machine.

    Returns:
        (images [N, 1, 8, 8] float32 in [-1, 1], labels [N] int64 in 0..12).
    """
    x, y = load_digits(split)
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed * 3 + SPLITS.index(split))
    m = n // 2
    level = torch.rand(2, m, 1, 1, 1, generator=g) * 0.4 + 0.6
    noise = torch.randn(2, m, 1, 8, 8, generator=g) * 0.03
    black = (-level[0] + noise[0]).clamp(-1.0, 1.0)
    white = (level[1] + noise[1]).clamp(-1.0, 1.0)
    images = torch.cat([x, -x, black, white])
    labels = torch.cat([y, torch.full((n,), 10), torch.full((m,), 11), torch.full((m,), 12)])
    return images.contiguous(), labels
