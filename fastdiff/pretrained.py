"""The embedded default models: class-conditional digits UNets, with and without E-TSDM.

Weights ship in ``fastdiff/assets/<name>.pt`` as plain state_dicts (EMA weights), loaded
with ``torch.load(weights_only=True)`` so no code is ever unpickled; ``<name>.json`` is
the training run's summary (UNet config, time sharing, schedule, command, losses).
``fastdiff/assets/README.md`` has the exact commands that produced them.
"""
from __future__ import annotations

import json
import os

import torch

from .nets import UNet
from .schedules import NoiseSchedule, TimeSharing

__all__ = ["pretrained", "PRETRAINED"]

ASSETS = os.path.join(os.path.dirname(__file__), "assets")

# name -> (weights file, what it is)
PRETRAINED = {
    "digits": ("digits.pt", "class-conditional 8x8 digits UNet trained with E-TSDM "
                            "(t~=100, n=5, linear T=1000)"),
    "digits-baseline": ("digits-baseline.pt", "the same UNet and recipe without time sharing"),
    "brightness": ("brightness.pt", "class-conditional 8x8 UNet on fastdiff.data.load_brightness "
                                    "(digits, inverted digits, near-solid black / white), eps, "
                                    "SD's scaled_linear schedule (non-zero terminal SNR)"),
    "brightness-zsnr": ("brightness-zsnr.pt", "the same UNet and data, v-prediction on the "
                                              "zero-terminal-SNR rescale of that schedule"),
}


def _schedule_from(info: dict) -> NoiseSchedule:
    p = dict(info)
    kind = p.pop("kind")
    if kind not in ("linear", "scaled_linear"):
        raise ValueError(f"pretrained: unsupported schedule kind {kind!r} in the asset metadata")
    rescale = p.get("rescale_zero_terminal_snr", False)
    return getattr(NoiseSchedule, kind)(p["T"], p["beta_start"], p["beta_end"],
                                        rescale_zero_terminal_snr=rescale)


def pretrained(name: str = "digits", *, device: str | torch.device = "cpu"
               ) -> tuple[UNet, NoiseSchedule]:
    """Load an embedded model.

    Args:
        name: "digits" (E-TSDM), "digits-baseline", or the brightness benchmark's
            "brightness" / "brightness-zsnr" (docs/singdiffusion.md).
        device: where the weights go.

    Returns:
        ``(model, schedule)``: the UNet in eval mode with EMA weights, called as
        ``model(x [B, 1, 8, 8], t [B], class_labels [B] or None) -> eps``, images in
        [-1, 1]; ``model.time_sharing`` is the E-TSDM sharing it was trained with (None
        for the baseline); samplers must feed it f(t) (the net itself is plain in t).
        ``model.null_class`` (= 10) is the unconditional label for guidance.
    """
    if name not in PRETRAINED:
        raise ValueError(f"pretrained: unknown model {name!r}; valid names: {sorted(PRETRAINED)}")
    weights = os.path.join(ASSETS, PRETRAINED[name][0])
    meta_path = os.path.splitext(weights)[0] + ".json"
    if not (os.path.exists(weights) and os.path.exists(meta_path)):
        raise FileNotFoundError(f"pretrained: {weights} or its .json is missing from the install")
    with open(meta_path) as f:
        meta = json.load(f)
    ts = meta.get("time_sharing")
    sharing = TimeSharing(ts["t_tilde"], ts["n"]) if ts else None
    model = UNet(**meta["model"], time_sharing=sharing)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), _schedule_from(meta["schedule"])
