"""The timing rules the benchmarks share: every run of `fn` timed after one warm-up run, and the best or the
median of them."""
from __future__ import annotations

import time
from typing import Callable


def run_times(fn: Callable[[], object], repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of `fn`, after a first call that is not timed."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Seconds of the fastest of `repeat` calls of `fn`, after a first call that is not timed."""
    return min(run_times(fn, repeat))


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """The median seconds of `repeat` calls of `fn` (the upper one of an even count), after an untimed call."""
    times = sorted(run_times(fn, repeat))
    return times[len(times) // 2]
