"""One model format and one loader: ``save_model`` / ``load_model``.

A saved model is a folder::

    model.safetensors   the weights (safetensors: plain tensors, nothing is unpickled)
    model.json          {"format": "fastdiff.model", "version": 1, "class": "UNet",
                         "model": <UNet config>, "time_sharing": {"t_tilde", "n"} | null,
                         "schedule": NoiseSchedule.to_recipe() | null,
                         "prediction_type": ..., "weights": {"file", "sha256"}, ...extra}

``fastdiff train`` writes it, ``fastdiff.pretrained`` reads the shipped ones through it,
and every CLI ``--model`` takes a shipped name or such a folder. ``load_model`` also
reads:

* a diffusers model folder (``config.json`` + weights, from ``save_pretrained`` or
  ``save_model`` of a diffusers model): loaded with diffusers, and the E-TSDM sharing
  that :func:`fastdiff.patch_time_embedding` recorded in its config is patched in again;
* a run folder of earlier fastdiff versions (``model.pt`` state_dict + ``model.json``),
  read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from ._files import atomic_write_bytes, atomic_write_text
from .schedules import NoiseSchedule, TimeSharing

__all__ = ["save_model", "load_model", "save_weights", "load_weights", "WEIGHTS", "CONFIG",
           "DIFFUSERS_SHARING_KEY"]

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
FORMAT = "fastdiff.model"
VERSION = 1
LEGACY_WEIGHTS = "model.pt"
# Key in a diffusers model's config.json. The leading underscore makes diffusers keep it
# on save and drop it silently on load (it is not an __init__ argument).
DIFFUSERS_SHARING_KEY = "_fastdiff_time_sharing"

_FROM_MODEL = object()  # "take it from the model"
_RESERVED = ("format", "version", "class", "model", "time_sharing", "schedule",
             "prediction_type", "weights")


def sharing_to_dict(sharing: TimeSharing | None) -> dict | None:
    return None if sharing is None else {"t_tilde": sharing.t_tilde, "n": sharing.n}


def sharing_from_dict(d, where: str = "time_sharing") -> TimeSharing | None:
    """``{"t_tilde", "n"}`` (or ``[t_tilde, n]``, or None) -> TimeSharing or None."""
    if d is None or isinstance(d, TimeSharing):
        return d
    if isinstance(d, (list, tuple)) and len(d) == 2:
        return TimeSharing(*d)
    if isinstance(d, dict) and set(d) == {"t_tilde", "n"}:
        return TimeSharing(d["t_tilde"], d["n"])
    raise ValueError(f"{where} must be null or {{'t_tilde': ..., 'n': ...}}, got {d!r}")


def _is_diffusers(model) -> bool:
    return (hasattr(model, "save_pretrained") and hasattr(model, "config")
            and type(model).__module__.startswith("diffusers"))


def _model_sharing(model):
    if _is_diffusers(model):
        return getattr(getattr(model, "time_proj", None), "sharing", None)
    return getattr(model, "time_sharing", None)


def save_model(model: nn.Module, directory, *, schedule: NoiseSchedule | None = None,
               time_sharing=_FROM_MODEL, prediction_type: str | None = None,
               extra: dict | None = None) -> str:
    """Save ``model`` to the folder ``directory`` (created) in fastdiff's format.

    Args:
        model: a :class:`fastdiff.UNet`; a diffusers model (``ModelMixin``), which is
            written with its own ``save_pretrained`` and gets the fastdiff keys in its
            ``config.json``; or any other module, whose weights and ``config`` attribute
            are saved (``load_model`` then refuses to guess its class; read the weights
            with :func:`load_weights`).
        schedule: the noise schedule it was trained on (``to_recipe()``: its parameters,
            or its tables when no constructor rebuilds it exactly; None: none).
        time_sharing: the E-TSDM sharing the weights were trained with; default: the
            model's own (``model.time_sharing``, or a patched ``time_proj``'s sharing).
        prediction_type: "epsilon" / "v_prediction" / "sample"; default the model's.
        extra: JSON-safe dict merged into ``model.json`` (training summary, command).

    Returns ``directory``. Each file is written atomically; ``model.json`` is written
    last and records the weights' sha256, which :func:`load_model` checks.
    """
    from .nets import PREDICTION_TYPES, UNet

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_model: model must be an nn.Module, got {type(model).__name__}")
    if schedule is not None and not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"save_model: schedule must be a NoiseSchedule or None, "
                        f"got {type(schedule).__name__}")
    sharing = _model_sharing(model) if time_sharing is _FROM_MODEL else time_sharing
    if sharing is not None and not isinstance(sharing, TimeSharing):
        raise TypeError(f"save_model: time_sharing must be a TimeSharing or None, "
                        f"got {type(sharing).__name__}")
    pred = prediction_type or getattr(model, "prediction_type", None) or "epsilon"
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"save_model: prediction_type must be one of {PREDICTION_TYPES}, "
                         f"got {pred!r}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"save_model: extra must be a dict, got {type(extra).__name__}")
    clash = sorted(set(extra or {}) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_model: extra must not set the format's own keys {clash}")
    directory = os.fspath(directory)
    fields = {"time_sharing": sharing_to_dict(sharing),
              "schedule": None if schedule is None else schedule.to_recipe(),
              "prediction_type": pred}
    if _is_diffusers(model):
        model.register_to_config(**{DIFFUSERS_SHARING_KEY: fields["time_sharing"]})
        model.save_pretrained(directory, safe_serialization=True)
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["_fastdiff"] = {"format": FORMAT, "version": VERSION, **fields, **(extra or {})}
        atomic_write_text(json.dumps(cfg, indent=2) + "\n", path)
        return directory
    if isinstance(model, UNet):
        if pred != model.prediction_type:
            raise ValueError(f"save_model: prediction_type={pred!r} but the UNet was built "
                             f"with {model.prediction_type!r}")
        cls, model_cfg = "UNet", {**model.config, "time_sharing": fields["time_sharing"]}
    else:  # weights and metadata only: load_model cannot rebuild a class it does not know
        cls = f"{type(model).__module__}.{type(model).__qualname__}"
        model_cfg = getattr(model, "config", None)
    try:  # fail before writing anything
        json.dumps([model_cfg, extra])
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_model: the model's config and extra must be JSON-safe ({e})") from None
    sha = save_weights(model.state_dict(), os.path.join(directory, WEIGHTS))
    config = {"format": FORMAT, "version": VERSION, "class": cls, "model": model_cfg, **fields,
              "weights": {"file": WEIGHTS, "sha256": sha},
              **(extra or {})}
    atomic_write_text(json.dumps(config, indent=2) + "\n", os.path.join(directory, CONFIG))
    return directory


def save_weights(state_dict: dict, path) -> str:
    """Write a state_dict as safetensors (atomically). Returns the file's sha256 (hex)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    blob = save(state, metadata={"format": "pt"})
    atomic_write_bytes(blob, path)
    return hashlib.sha256(blob).hexdigest()


def load_weights(path, *, sha256: str | None = None) -> dict:
    """Read a safetensors state_dict (CPU tensors); nothing is unpickled or executed.

    With ``sha256`` the file must match it. Raises FileNotFoundError / ValueError naming
    ``path``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"the weights {path} are missing")
    with open(path, "rb") as f:
        blob = f.read()
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise ValueError(f"{path} does not match the sha256 recorded for it (truncated, "
                         "damaged or replaced); re-save the model")
    try:
        return load(blob)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{path} is not a safetensors file ({e}); nothing was executed") from None


def _resolve(name_or_path) -> str:
    from .pretrained import ASSETS, PRETRAINED

    if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
        return os.path.join(ASSETS, name_or_path)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_model: expected a shipped model name or a folder path, got "
                        f"{type(name_or_path).__name__}")
    path = os.fspath(name_or_path)
    if os.path.isfile(path):  # a file inside a saved folder (model.json, the weights)
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"load_model: {path!r} is neither a shipped model "
                         f"({', '.join(sorted(PRETRAINED))}) nor an existing folder")
    return path


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"load_model: {path} is not valid JSON ({e})") from None


def load_model(name_or_path, *, device: str | torch.device = "cpu"):
    """Load a saved model: a shipped name ("digits", "digits-baseline") or a folder.

    Returns ``(model, schedule)``: the model in eval mode on ``device`` and the
    :class:`NoiseSchedule` it was saved with (None if none was recorded). The E-TSDM
    sharing is on the model (``model.time_sharing`` for a fastdiff UNet, which the
    samplers and probes apply; a patched ``time_proj`` for a diffusers UNet), and so is
    the prediction type (``model.prediction_type``).

    Weights are read without running any pickled code (safetensors, or
    ``torch.load(weights_only=True)`` for ``.pt``) and checked against the sha256 in
    ``model.json``: a damaged, replaced or foreign file raises ``ValueError`` naming it.
    """
    folder = _resolve(name_or_path)
    cfg_path = os.path.join(folder, CONFIG)
    if os.path.exists(cfg_path):
        cfg = _read_json(cfg_path)
        if isinstance(cfg, dict) and cfg.get("format") == FORMAT:
            model, schedule = _load_fastdiff(folder, cfg)
        elif os.path.exists(os.path.join(folder, LEGACY_WEIGHTS)):
            model, schedule = _load_legacy(folder, cfg)
        else:
            raise ValueError(f"load_model: {cfg_path} is not a fastdiff model config "
                             f"(no \"format\": \"{FORMAT}\") and there is no {LEGACY_WEIGHTS}")
    elif os.path.exists(os.path.join(folder, "config.json")):
        model, schedule = _load_diffusers(folder)
    else:
        raise FileNotFoundError(f"load_model: {folder} has neither {CONFIG} (fastdiff) nor "
                                "config.json (diffusers)")
    return model.to(device).eval(), schedule


def _build_unet(cfg: dict, where: str):
    from .nets import UNet

    if not isinstance(cfg, dict):
        raise ValueError(f"load_model: {where} has no UNet config (\"model\")")
    try:
        return UNet(**cfg)
    except TypeError as e:
        raise ValueError(f"load_model: {where}: the UNet config does not fit ({e})") from None


def _schedule(d, where):
    if d is None:
        return None
    try:
        return NoiseSchedule.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"load_model: {where}: bad schedule ({e})") from None


def _load_state(model, state, where):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"load_model: {where} does not match the model config: "
                         f"{str(e).splitlines()[0]}") from None


def _load_fastdiff(folder, cfg):
    if cfg.get("version") != VERSION:
        raise ValueError(f"load_model: {folder}/{CONFIG}: unsupported version "
                         f"{cfg.get('version')!r} (this fastdiff reads version {VERSION})")
    if cfg.get("class") != "UNet":
        raise ValueError(f"load_model: {folder} holds a {cfg.get('class')!r}, which fastdiff "
                         "cannot rebuild: build the model yourself and load its weights with "
                         f"fastdiff.model_io.load_weights('{folder}/{WEIGHTS}')")
    info = cfg.get("weights") or {}
    wpath = os.path.join(folder, info.get("file", WEIGHTS))
    state = load_weights(wpath, sha256=info.get("sha256"))
    model = _build_unet({**cfg["model"], "time_sharing":
                         sharing_from_dict(cfg.get("time_sharing"), f"{folder}/{CONFIG}")},
                        f"{folder}/{CONFIG}")
    _load_state(model, state, wpath)
    return model, _schedule(cfg.get("schedule"), f"{folder}/{CONFIG}")


def _load_legacy(folder, cfg):
    import pickle

    wpath = os.path.join(folder, LEGACY_WEIGHTS)
    try:
        state = torch.load(wpath, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"load_model: {wpath} is not a plain state_dict that loads with "
                         f"weights_only=True ({str(e).splitlines()[0]}); nothing was "
                         "executed") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"load_model: {wpath} is not a state_dict of tensors")
    model_cfg = dict(cfg.get("model") or {})
    model_cfg["time_sharing"] = sharing_from_dict(cfg.get("time_sharing"), f"{folder}/{CONFIG}")
    model = _build_unet(model_cfg, f"{folder}/{CONFIG}")
    _load_state(model, state, wpath)
    return model, _schedule(cfg.get("schedule"), f"{folder}/{CONFIG}")


def _load_diffusers(folder):
    cfg = _read_json(os.path.join(folder, "config.json"))
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if not name:
        raise ValueError(f"load_model: {folder}/config.json has no _class_name (not a "
                         "diffusers model folder)")
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"load_model: {folder} is a diffusers {name}; install diffusers "
                          "(pip install 'fastdiff[diffusers]')") from None
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"load_model: diffusers has no model class {name!r}")
    model = cls.from_pretrained(folder, use_safetensors=None)
    extra = cfg.get("_fastdiff") or {}
    sharing = sharing_from_dict(cfg.get(DIFFUSERS_SHARING_KEY, extra.get("time_sharing")),
                                f"{folder}/config.json")
    if sharing is not None:
        from .embedding import patch_time_embedding
        patch_time_embedding(model, sharing=sharing)
    model.prediction_type = extra.get("prediction_type", "epsilon")
    return model, _schedule(extra.get("schedule"), f"{folder}/config.json")
