"""Shared shape of every benchmark's JSON: what was measured, the baseline, ratio and target."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of `repeats` runs (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def items_per_s(fn: Callable[[object], object], batch, seconds: float = 3.0) -> float:
    """Items of `batch` per second of back-to-back `fn(batch)` calls, after one untimed call."""
    fn(batch)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - t)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
