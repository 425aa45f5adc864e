"""The embedded default models: class-conditional digits UNets, with and without E-TSDM.

Each ships as a folder ``fastdiff/assets/<name>/`` in fastdiff's model format
(:mod:`fastdiff.model_io`): ``model.safetensors`` (EMA weights; nothing is unpickled)
and ``model.json`` (UNet config, E-TSDM sharing, schedule, prediction type, the training
run's summary). ``fastdiff/assets/README.md`` has the exact commands that produced them.
"""
from __future__ import annotations

import os

import torch

from .nets import UNet
from .schedules import NoiseSchedule

__all__ = ["pretrained", "PRETRAINED"]

ASSETS = os.path.join(os.path.dirname(__file__), "assets")

# name (a folder under ASSETS) -> what it is
PRETRAINED = {
    "digits": "class-conditional 8x8 digits UNet trained with E-TSDM (t~=100, n=5, linear T=1000)",
    "digits-baseline": "the same UNet and recipe without time sharing",
    "brightness": "class-conditional 8x8 UNet on fastdiff.data.load_brightness (digits, inverted "
                  "digits, near-solid black / white), eps, SD's scaled_linear schedule "
                  "(non-zero terminal SNR)",
    "brightness-zsnr": "the same UNet and data, v-prediction on the zero-terminal-SNR rescale "
                       "of that schedule",
}


def pretrained(name: str = "digits", *, device: str | torch.device = "cpu"
               ) -> tuple[UNet, NoiseSchedule]:
    """Load an embedded model, or a saved one (the same as ``fastdiff.load_model``).

    Args:
        name: "digits" (E-TSDM), "digits-baseline", the brightness benchmark's
            "brightness" / "brightness-zsnr" (docs/singdiffusion.md), or a folder
            written by ``fastdiff.save_model`` / ``fastdiff train --out``.
        device: where the weights go.

    Returns:
        ``(model, schedule)``: for the shipped names, the UNet in eval mode with EMA weights, called as
        ``model(x [B, 1, 8, 8], t [B], class_labels [B] or None) -> eps``, images in
        [-1, 1]; ``model.time_sharing`` is the E-TSDM sharing it was trained with (None
        for the baseline); samplers must feed it f(t) (the net itself is plain in t).
        ``model.null_class`` (= 10) is the unconditional label for guidance.
    """
    from .model_io import load_model

    return load_model(name, device=device)
