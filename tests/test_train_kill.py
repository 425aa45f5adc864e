"""Crash safety of training: ``fastdiff train`` killed with SIGKILL at random moments
(checkpoint every step, so many kills land inside a checkpoint write) and resumed ends
bit for bit where an uninterrupted run does, dropout included. About 25 s of CPU (four process start-ups);
marked slow, CI runs it."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdiff import load_model
from fastdiff.cli import main
from fastdiff.train import load_checkpoint

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
KILLS = 3


def _argv(out):
    return ["train", "--steps", str(STEPS), "--batch-size", "8", "--channels", "8", "--dropout", "0.2",
            "--ckpt-every", "1", "--threads", "1", "--seed", "3", "--no-progress",
            "--out", str(out)]


def _logged_steps(out) -> int:
    try:
        with open(out / "log.jsonl") as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def _checkpoint_step(out) -> int:
    path = out / "checkpoint.pt"
    return int(load_checkpoint(str(path))["step"]) if path.exists() else 0


def test_kill_9_at_random_moments_then_resume_is_bit_exact(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"kill-timing seed: {seed}")
    rng = random.Random(seed)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fastdiff"] + _argv(out)
    kills = []
    for _ in range(KILLS):
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            # a random moment a few steps into this run (startup takes seconds)
            target = min(_logged_steps(out) + rng.randint(1, 6), STEPS - 1)
            deadline = time.monotonic() + 120
            while _logged_steps(out) < target and proc.poll() is None:
                assert time.monotonic() < deadline, "training made no progress"
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.02))
            assert proc.poll() is None, proc.stderr.read().decode()
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        kills.append(_checkpoint_step(out))
    print(f"checkpoint step after each kill: {kills}")
    assert 0 < kills[-1] < STEPS and kills == sorted(kills)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    ref = tmp_path / "straight"
    assert main(_argv(ref)) == 0  # the same command, never interrupted
    for name in ("model", "ema", "optimizer"):
        a, b = (load_checkpoint(str(d / "checkpoint.pt"))[name] for d in (ref, out))
        if name == "optimizer":
            a = {f"{i}.{k}": v for i, s in a["state"].items() for k, v in s.items()}
            b = {f"{i}.{k}": v for i, s in b["state"].items() for k, v in s.items()}
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    (ema_a, _), (ema_b, _) = (load_model(str(d)) for d in (ref, out))  # the final EMA model
    sd_a, sd_b = ema_a.state_dict(), ema_b.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    loss_a, loss_b = ([json.loads(line)["loss"] for line in open(d / "log.jsonl")] for d in (ref, out))
    assert len(loss_a) == STEPS and loss_a == loss_b
