"""Sharded sampling, FD and probes over torch.distributed (gloo, CPU processes spawned by
the tests with torchrun): the same bits for 1, 2 and 3 processes, and a job killed with
kill -9 at random moments resumes to the same final output without recomputing a
finished shard or trusting a partial file."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")


def _env():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _launch(nproc, *args):
    """The command for ``nproc`` processes: plain python for 1, torchrun otherwise."""
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *args]


# ---- the pure parts -------------------------------------------------------------------

def test_seed_parsing_and_batches():
    assert dist.parse_seeds("0-4,7,9-10") == [0, 1, 2, 3, 4, 7, 9, 10]
    assert dist.parse_seeds(3) == [0, 1, 2]
    assert dist.batches(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert dist.rank_batches(list(range(10)), 4, 1, 2) == [[4, 5, 6, 7]]
    assert dist.shard_name([5, 6, 7]) == "samples-000005-000007.npz"
    for w in (1, 2, 3, 4):
        parts = [range(11)[dist.rank_slice(11, r, w)] for r in range(w)]
        assert [i for p in parts for i in p] == list(range(11))


@pytest.mark.parametrize("bad,exc,msg", [
    ("5-2", ValueError, "empty range"), ("a-b", ValueError, "cannot parse"), ("1,1", ValueError, "unique"),
    (True, TypeError, "bool"), (0, ValueError, ">= 1"), ([], ValueError, "no seeds"),
    ([-1], ValueError, r"\[0, 2\^63\)"), (2.5, TypeError, "range like"),
])
def test_bad_seeds(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        dist.parse_seeds(bad)


def test_shard_dir_refuses_other_options_and_damaged_shards(tmp_path):
    store = dist.ShardDir(str(tmp_path), {"steps": 4})
    store.setup()
    store.write([0, 1], {"arr_0": np.zeros((2, 8, 8, 1), np.uint8)})
    assert store.done([0, 1])
    with pytest.raises(ValueError, match="other options"):
        dist.ShardDir(str(tmp_path), {"steps": 5}).done([0, 1])
    p = tmp_path / "samples-000000-000001.npz"
    raw = bytearray(p.read_bytes())
    raw[-10] ^= 0xFF  # a flipped bit: the checksum no longer matches, the shard is redone
    p.write_bytes(bytes(raw))
    assert not store.done([0, 1])
    (tmp_path / "samples-000002-000003.npz.1a2b3c4d.tmp").write_bytes(b"partial")
    store.setup()  # a killed writer's temporary is removed, never read
    assert not (tmp_path / "samples-000002-000003.npz.1a2b3c4d.tmp").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        dist.ShardDir(str(f), {})


def test_fd_from_moments_equals_direct(gen):
    from fastdiff.metrics import feature_moments, frechet_distance, frechet_from_moments
    a = torch.randn(300, 6, generator=gen, dtype=torch.float64) * 2 + 1
    b = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    n1, s1, ss1 = feature_moments(a[:120])
    n2, s2, ss2 = feature_moments(a[120:])
    got = frechet_from_moments(n1 + n2, s1 + s2, ss1 + ss2, b)
    assert got == pytest.approx(frechet_distance(a, b), rel=1e-10)


# ---- 1, 2 and 3 processes -------------------------------------------------------------

@pytest.mark.slow
def test_same_bits_for_every_world_size(tmp_path):
    procs = []
    for w in (1, 2, 3):
        cmd = _launch(w, str(WORKER), str(tmp_path), str(tmp_path / f"samples-w{w}"))
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    res = {w: torch.load(tmp_path / f"result-w{w}.pt", weights_only=False) for w in (1, 2, 3)}
    for w in (2, 3):
        assert res[w]["world"] == w
        assert np.array_equal(res[w]["images"], res[1]["images"])  # bit for bit
        assert np.array_equal(res[w]["labels"], res[1]["labels"])
        assert torch.equal(res[w]["probe"], res[1]["probe"])       # bit for bit
        (n, s, ss), (n1, s1, ss1) = res[w]["moments"], res[1]["moments"]
        assert n == n1 == 23                                        # the FD statistics,
        torch.testing.assert_close(s, s1, rtol=1e-13, atol=1e-12)   # to float64 rounding
        torch.testing.assert_close(ss, ss1, rtol=1e-13, atol=1e-12)
        # 23 samples in more feature dimensions: a singular covariance, whose square root
        # turns that rounding into ~1e-8 of the FD (see digits_fd_sharded).
        assert res[w]["fd"] == pytest.approx(res[1]["fd"], rel=1e-6)
    assert res[1]["images"].shape == (23, 8, 8, 1) and res[1]["images"].dtype == np.uint8
    assert list(res[1]["labels"]) == [s % 10 for s in range(23)]
    # digits_fd of all samples in one batch: the same up to the classifier's batch rounding.
    from fastdiff.metrics import digits_fd
    x = torch.from_numpy(res[1]["images"]).permute(0, 3, 1, 2).double() * (2.0 / 255.0) - 1.0
    assert res[2]["fd"] == pytest.approx(digits_fd(x), rel=1e-5)
    packed = np.load(tmp_path / "samples-w3" / "samples.npz")
    assert np.array_equal(packed["arr_0"], res[1]["images"])


@pytest.mark.slow
def test_kill_9_and_resume(tmp_path):
    """kill -9 of one rank at random moments, restarts, the same final shards; shards
    finished before a kill are never rewritten (same inode)."""
    common = ["-m", "fastdiff", "sample", "--seeds", "0-47", "--batch", "3", "--steps", "12",
              "--no-progress", "--json"]
    ref_dir, out = tmp_path / "ref", tmp_path / "job"
    ref = subprocess.run(_launch(1, *common, "--out", str(ref_dir), "--pack"), env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    kept = {}  # shard -> inode, for shards that were finished before a kill
    for attempt in range(3):
        p = subprocess.Popen(_launch(2, *common, "--out", str(out)), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        want = len(kept) + rng.randint(1, 3)
        deadline = time.time() + 300
        records = out / dist.RECORDS
        while time.time() < deadline and p.poll() is None:
            if records.exists() and len(list(records.glob("*.json"))) >= want:
                break
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        if p.poll() is None and workers:
            os.kill(int(rng.choice(workers)), signal.SIGKILL)  # one rank dies mid-run
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for rec in (records.glob("*.json") if records.exists() else []):
            name = rec.name[:-5]
            if (out / name).exists():
                ino = (out / name).stat().st_ino
                assert kept.setdefault(name, ino) == ino, f"{name} was recomputed"
    final = subprocess.run(_launch(2, *common, "--out", str(out), "--pack"), env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    for name, ino in kept.items():
        assert (out / name).stat().st_ino == ino, f"{name} was recomputed after the restart"
    assert not list(out.glob("*.tmp"))
    a, b = np.load(ref_dir / "samples.npz"), np.load(out / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    summary = json.loads(final.stdout.strip().splitlines()[-1])
    assert summary["computed_shards"] == 16 - len(kept)  # only what was not finished
