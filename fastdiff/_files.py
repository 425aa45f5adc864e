"""Atomic file writes: the one place fastdiff writes a file it may be killed while writing.

Every writer goes to a temp file ``<name>.<random>.tmp`` in the target's folder, flushes
and fsyncs it, then ``os.replace``s it over the target, so a reader (or a resumed run)
sees either the previous file or the new one, never a torn one. The temp file is created
with ``os.open(..., 0o666)``, so the umask applies exactly as for a plain ``open(path,
"w")``; replacing an existing file keeps that file's permission bits, as rewriting it in
place would.
"""
from __future__ import annotations

import contextlib
import glob
import os
import secrets
from typing import IO, Iterator

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_save",
           "remove_stale_temps", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


def _temp_for(path: str) -> tuple[int, str]:
    folder, name = os.path.split(path)
    while True:
        tmp = os.path.join(folder, f"{name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 2**-32 per try
            continue


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(path, "wb") as f: ...`` writes ``path`` atomically.

    ``mode`` is "wb" or "w" (text, UTF-8). The folder is created if needed. On an
    exception inside the block the temp file is removed and ``path`` is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = _temp_for(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            pass  # a new file: the umask already decided its mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(data: bytes, path) -> str:
    """Write ``data`` to ``path`` atomically. Returns ``path``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def atomic_write_text(text: str, path) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns ``path``."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return os.fspath(path)


def atomic_save(obj, path) -> str:
    """``torch.save(obj)`` to ``path`` atomically. Returns ``path``."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return os.fspath(path)


def remove_stale_temps(path) -> list[str]:
    """Delete temp files a killed writer of ``path`` left behind; returns their paths.

    Only ``<name>.*.tmp`` files beside ``path`` are touched (the names this module and
    earlier fastdiff versions make). Call it when no other process can be writing ``path``
    (e.g. when a training run that owns its folder starts).
    """
    path = os.path.abspath(os.fspath(path))
    stale = [p for p in glob.glob(glob.escape(path) + ".*" + TMP_SUFFIX) if os.path.isfile(p)]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)
    return stale
