"""Sampling, evaluation and probing sharded over ``torch.distributed`` (torchrun).

The contract: every image is a function of its seed and the command's options only,
whatever the world size and whatever was interrupted before. Seeds are cut into
contiguous batches of ``batch`` seeds (the last one may be short) and the batches are
dealt round-robin to the ranks, as EDM's ``generate.py`` does; a batch always holds the
same seeds, so even a model whose output depends on its batch's composition gives the
same bits on 1, 2 or 3 processes. Each finished batch is one shard file
``samples-{first:06d}-{last:06d}.npz`` written to a temporary name and renamed, followed
by a record ``manifest.d/<shard>.json`` holding the shard's SHA-256 and the options
fingerprint. A restart skips exactly the shards whose record exists and whose file still
has that checksum; a shard without a record (killed between the two renames) is
recomputed, and a stray temporary file is never read. At the end rank 0 writes
``manifest.json`` (every shard, in seed order) and can pack everything into one ``.npz``
(``arr_0`` [N, H, W, C] uint8, ``arr_1`` labels), the format FID tools read.

Without an initialized process group everything runs as rank 0 of 1, so the same code
serves a single process. Under ``torchrun`` call :func:`init` first (gloo on CPU, nccl
on GPU).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from ._files import TMP_SUFFIX, atomic_open

__all__ = ["init", "rank", "world_size", "barrier", "parse_seeds", "batches", "rank_batches",
           "shard_name", "ShardDir", "sample_shards", "pack", "all_reduce_sum", "all_gather_cat",
           "rank_slice"]

MANIFEST = "manifest.json"
RECORDS = "manifest.d"
_SHARD_RE = re.compile(r"^samples-(\d{6,})-(\d{6,})\.npz$")


# ---------------------------------------------------------------------------------------
# the process group
# ---------------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def init(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment);
    a no-op for a single process. backend: default "nccl" when CUDA is available, else
    "gloo". Returns (rank, world_size)."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Leave the group before the interpreter exits: a gloo group still alive at exit
        # can abort the process ("terminate called without an active exception").
        atexit.register(_leave)
    return rank(), world_size()


def _leave() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def barrier() -> None:
    d = _dist()
    if d and d.get_world_size() > 1:
        d.barrier()


def _comm_device() -> torch.device:
    d = _dist()
    if d and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (a new tensor, on t's device; t itself alone)."""
    d = _dist()
    if not d or d.get_world_size() == 1:
        return t.clone()
    buf = t.to(_comm_device()).clone()
    d.all_reduce(buf)
    return buf.to(t.device)


def all_gather_cat(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenation over ranks (rank order) of each rank's ``t`` [sizes[rank], ...]."""
    d = _dist()
    if not d or d.get_world_size() == 1:
        return t
    dev = _comm_device()
    n = max(sizes)
    pad = torch.zeros((n,) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    d.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


def rank_slice(n: int, r: int | None = None, w: int | None = None) -> slice:
    """The contiguous part of ``range(n)`` that rank r of w handles (the first n % w ranks
    get one item more); concatenated in rank order the parts are range(n) again."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    q, m = divmod(n, w)
    lo = r * q + min(r, m)
    return slice(lo, lo + q + (1 if r < m else 0))


# ---------------------------------------------------------------------------------------
# seeds and shards
# ---------------------------------------------------------------------------------------

def parse_seeds(spec) -> list[int]:
    """Seeds from "0-49999", "1,5,7-9", an int (that many: 0..n-1) or an iterable of ints;
    ranges are inclusive, as EDM's ``--seeds``. Seeds must be unique and in [0, 2^63)."""
    if isinstance(spec, bool):
        raise TypeError("seeds: expected a range like '0-49999', a count or a list of ints, got a bool")
    if isinstance(spec, (int, np.integer)):
        if spec < 1:
            raise ValueError(f"seeds: a count must be >= 1, got {spec}")
        return list(range(int(spec)))
    if isinstance(spec, str):
        out = []
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None:
                raise ValueError(f"seeds: cannot parse {part!r} in {spec!r} (expected e.g. '0-49999' "
                                 "or '1,5,7-9')")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ValueError(f"seeds: empty range {part!r} (the end is inclusive)")
            out.extend(range(lo, hi + 1))
    else:
        try:
            out = [int(s) for s in spec]
        except (TypeError, ValueError):
            raise TypeError(f"seeds: expected a range like '0-49999', a count or a list of ints, "
                            f"got {type(spec).__name__}") from None
    if not out:
        raise ValueError("seeds: no seeds given")
    if len(set(out)) != len(out):
        raise ValueError("seeds: every seed must be unique")
    if min(out) < 0 or max(out) >= 2 ** 63:
        raise ValueError("seeds: must lie in [0, 2^63)")
    return out


def batches(seeds: list[int], batch: int) -> list[list[int]]:
    """Contiguous batches of ``batch`` seeds, in order (the last may be short)."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    return [seeds[i:i + batch] for i in range(0, len(seeds), int(batch))]


def rank_batches(seeds: list[int], batch: int, r: int | None = None,
                 w: int | None = None) -> list[list[int]]:
    """The batches rank r of w computes: every w-th batch, starting at the r-th."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return batches(seeds, batch)[r::w]


def shard_name(seeds: list[int]) -> str:
    """``samples-{first:06d}-{last:06d}.npz`` of a batch of seeds."""
    return f"samples-{seeds[0]:06d}-{seeds[-1]:06d}.npz"


def fingerprint(options: dict) -> str:
    """A short digest of the options every image depends on (JSON, sorted keys)."""
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic(path: str, write: Callable) -> None:
    """``write(file)`` atomically (see :mod:`fastdiff._files`)."""
    with atomic_open(path, "wb") as f:
        write(f)


@dataclass
class ShardDir:
    """A folder of sample shards with its manifest (see the module docstring).

    ``options``: what every image depends on besides its seed (model, sampler, steps,
    guidance, ...); a folder holding shards made with other options is refused.
    """
    path: str
    options: dict

    def __post_init__(self):
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"--out {self.path!r} exists and is not a directory")
        self.fp = fingerprint(self.options)

    def setup(self) -> None:
        """Create the folder (rank 0; others wait) and check that it is writable."""
        if rank() == 0:
            os.makedirs(os.path.join(self.path, RECORDS), exist_ok=True)
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"cannot write to {self.path!r}")
            for folder in (self.path, os.path.join(self.path, RECORDS)):
                for name in os.listdir(folder):  # temporaries of killed writers
                    if name.endswith(TMP_SUFFIX) and name.startswith(("samples-", "manifest")):
                        os.remove(os.path.join(folder, name))
        barrier()

    def _record_path(self, name: str) -> str:
        return os.path.join(self.path, RECORDS, name + ".json")

    def record(self, name: str) -> dict | None:
        """The record of a finished shard, or None (missing, unreadable, or whose file no
        longer has the recorded checksum). Raises if it was made with other options."""
        try:
            with open(self._record_path(name)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        if rec.get("fingerprint") != self.fp:
            raise ValueError(f"{self.path!r} holds {name} made with other options "
                             f"({rec.get('options')}); use a new --out folder")
        p = os.path.join(self.path, name)
        if not os.path.exists(p) or _sha256(p) != rec.get("sha256"):
            return None
        return rec

    def done(self, seeds: list[int]) -> bool:
        return self.record(shard_name(seeds)) is not None

    def write(self, seeds: list[int], arrays: dict) -> dict:
        """Write one shard (arrays: name -> [n, ...] numpy arrays, n = len(seeds)) and
        then its record. Returns the record."""
        name = shard_name(seeds)
        path = os.path.join(self.path, name)
        _atomic(path, lambda f: np.savez(f, seeds=np.asarray(seeds, dtype=np.int64), **arrays))
        rec = {"shard": name, "first_seed": seeds[0], "last_seed": seeds[-1], "n": len(seeds),
               "sha256": _sha256(path), "fingerprint": self.fp, "options": self.options}
        _atomic(self._record_path(name), lambda f: f.write(json.dumps(rec, indent=1).encode()))
        return rec

    def shards(self, seeds: list[int], batch: int) -> list[str]:
        return [shard_name(b) for b in batches(seeds, batch)]

    def write_manifest(self, seeds: list[int], batch: int) -> dict:
        """Rank 0: ``manifest.json`` listing every shard of the run (all must be done)."""
        recs = []
        for name in self.shards(seeds, batch):
            rec = self.record(name)
            if rec is None:
                raise RuntimeError(f"shard {name} is missing or damaged in {self.path!r}")
            recs.append({k: rec[k] for k in ("shard", "first_seed", "last_seed", "n", "sha256")})
        man = {"format": 1, "options": self.options, "fingerprint": self.fp, "batch": batch,
               "n": len(seeds), "shards": recs}
        _atomic(os.path.join(self.path, MANIFEST), lambda f: f.write(json.dumps(man, indent=1).encode()))
        return man


def sample_shards(make: Callable[[list[int]], dict], seeds, batch: int, out: str, options: dict,
                  *, progress: bool = True) -> dict:
    """Compute this rank's shards that are not done yet and wait for the others.

    make(seeds) -> {"arr_0": [n, H, W, C] uint8, ...}: the images of one batch of seeds
    (a pure function of the seeds and ``options``). Returns {"computed": [shard names
    this rank wrote], "skipped": [...already done], "manifest": the manifest (rank 0) or
    None}.
    """
    seeds = parse_seeds(seeds)
    store = ShardDir(out, options)
    store.setup()
    mine = rank_batches(seeds, batch)
    todo = [b for b in mine if not store.done(b)]
    computed, skipped = [], [shard_name(b) for b in mine if b not in todo]
    from tqdm.auto import tqdm
    for b in tqdm(todo, desc=f"rank {rank()} shards", disable=not progress or rank() != 0,
                  leave=False):
        store.write(b, make(b))
        computed.append(shard_name(b))
    barrier()
    manifest = store.write_manifest(seeds, batch) if rank() == 0 else None
    barrier()
    return {"computed": computed, "skipped": skipped, "manifest": manifest}


def load_shards(out: str) -> dict:
    """Every shard of a finished folder (its ``manifest.json``), verified against the
    recorded checksums, concatenated in seed order: name -> array."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out!r} has no {MANIFEST}: not a finished sample folder "
                                "(run `fastdiff sample --seeds ... --out` to the end first)")
    with open(path) as f:
        man = json.load(f)
    parts: dict = {}
    for rec in man["shards"]:
        p = os.path.join(out, rec["shard"])
        if _sha256(p) != rec["sha256"]:
            raise ValueError(f"{p} does not match its checksum in {MANIFEST}: damaged")
        with np.load(p) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def pack(out: str, path: str | None = None) -> str:
    """Rank 0: all shards of ``out`` in one ``.npz`` (default ``out/samples.npz``) with
    ``arr_0`` [N, H, W, C] uint8 and, when present, ``arr_1`` labels. Returns the path."""
    arrays = load_shards(out)
    path = path or os.path.join(out, "samples.npz")
    keep = {k: arrays[k] for k in ("arr_0", "arr_1") if k in arrays}
    _atomic(path, lambda f: np.savez(f, **keep))
    return path


def shard_files(seeds: Iterable[int], batch: int) -> list[str]:
    """The shard names a run of ``seeds`` in batches of ``batch`` produces."""
    return [shard_name(b) for b in batches(list(seeds), batch)]
