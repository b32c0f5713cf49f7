"""Shared timing helper for the benchmarks: best and median wall time after one warm-up call."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def best_of(fn: Callable[[], object], repeats: int = 5, *, warm_up: bool = True) -> tuple[float, float]:
    """Best and median of ``repeats`` timed calls (after one untimed call unless ``warm_up=False``)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)
