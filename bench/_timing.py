"""Shared timing helper for the benchmarks: best and median wall time after one warm-up call."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def best_of(fn: Callable[[], object], repeats: int = 5) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)
