"""Training checkpoints with a checksum: written atomically, verified on load.

File layout: one header line ``FASTDIFF-CHECKPOINT 1 <sha256 hex> <payload bytes>\\n``
followed by the payload, a ``torch.save`` of the state (tensors and plain containers
only, read back with ``weights_only=True``). A file that is empty, truncated, altered
(one flipped bit in a tensor is enough), or not a fastdiff checkpoint raises
``CheckpointError`` naming the file, instead of resuming from wrong state or failing
with a raw unpickling error.
"""
from __future__ import annotations

import hashlib
import io
import os

import torch

from ._files import atomic_open

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "REQUIRED_KEYS"]

MAGIC = b"FASTDIFF-CHECKPOINT"
VERSION = 1
# What ``fastdiff.train`` needs to resume.
REQUIRED_KEYS = ("step", "model", "ema", "optimizer", "rng", "meta")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from (the message names the file)."""


def save_checkpoint(state: dict, path) -> str:
    """Write ``state`` (a dict of tensors / containers) to ``path`` atomically, with its
    sha256. Returns ``path``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    header = b"%s %d %s %d\n" % (MAGIC, VERSION, hashlib.sha256(payload).hexdigest().encode(),
                                 len(payload))
    with atomic_open(path, "wb") as f:
        f.write(header)
        f.write(payload)
    return os.fspath(path)


def load_checkpoint(path, map_location="cpu", *, hint: str = "") -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    ``hint`` is appended to every error (e.g. how to start over). Raises
    ``CheckpointError`` for an empty, truncated, damaged or foreign file.
    """
    path = os.fspath(path)
    hint = f"; {hint}" if hint else ""

    def fail(why):
        return CheckpointError(f"checkpoint {path} {why}{hint}")

    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise fail("is empty (a write was interrupted?)")
    head, _, payload = data.partition(b"\n")
    fields = head.split(b" ")
    if data.startswith(b"PK\x03\x04"):
        payload = data  # written by fastdiff < 0.2 (plain torch.save, no checksum)
    elif fields[0] != MAGIC:
        raise fail("is not a fastdiff training checkpoint")
    elif len(fields) != 4 or fields[1] != b"%d" % VERSION or not fields[3].isdigit():
        raise fail(f"has an unsupported header {head[:80]!r} (this fastdiff writes version {VERSION})")
    elif len(payload) != int(fields[3]):
        raise fail(f"is truncated or padded: {len(payload)} payload bytes, the header says "
                   f"{int(fields[3])}")
    elif hashlib.sha256(payload).hexdigest().encode() != fields[2]:
        raise fail("is corrupted: its sha256 does not match the header")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # a checksummed payload that still does not load
        raise fail(f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise fail(f"lacks {missing}")
    return state
