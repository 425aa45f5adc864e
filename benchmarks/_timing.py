"""Shared timing helper for the benchmark scripts: warm-up, then the median (and IQR) of
many repeats measured with ``time.perf_counter`` (CPU) or CUDA events (``device="cuda"``).

Fast calls (microseconds) are timed in batches of ``number`` calls per repeat, with
``number`` picked so that one repeat lasts at least ``min_repeat_s``; this keeps the
timer's own overhead and resolution out of the result.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Timing:
    """Seconds per call: ``median`` and interquartile range ``iqr`` over ``repeats``
    repeats of ``number`` calls each."""

    median: float
    iqr: float
    repeats: int
    number: int

    @property
    def us(self) -> float:
        """Median in microseconds."""
        return self.median * 1e6


def measure(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 50,
            min_repeat_s: float = 2e-4, max_total_s: float = 2.0,
            sync: Optional[Callable[[], None]] = None, device=None) -> Timing:
    """Time ``fn()`` (no arguments; wrap with a lambda).

    Args:
        warmup: calls made first and not timed (caches, lazy init, autotuning).
        repeats: number of timed repeats (fewer if ``max_total_s`` would be exceeded,
            but at least 5).
        min_repeat_s: each repeat runs ``fn`` enough times to last at least this long.
        max_total_s: time budget for the timed part.
        sync: called after each repeat before reading the clock (e.g.
            ``torch.cuda.synchronize`` for GPU work); None for CPU.
        device: a CUDA device: each repeat is timed by a pair of CUDA events on the
            current stream around its ``number`` calls (``sync`` is then implied).
    """
    import torch

    if device is not None and torch.device(device).type == "cuda":
        sync = torch.cuda.synchronize

        def run(n: int) -> float:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(n):
                fn()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) * 1e-3
    else:
        def run(n: int) -> float:
            return _wall(fn, n, sync)


    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    # Calibrate the batch size on the (now warm) call.
    number, elapsed = 1, run(1)
    while elapsed < min_repeat_s and number < 1_000_000:
        number *= 10 if elapsed < min_repeat_s / 10 else 2
        elapsed = run(number)
    repeats = max(5, min(repeats, int(max_total_s / max(elapsed, 1e-9))))
    samples = sorted(run(number) / number for _ in range(repeats))
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return Timing(statistics.median(samples), q3 - q1, repeats, number)


def _wall(fn, n: int, sync) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0
