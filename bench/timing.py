"""Timing helpers shared by the benchmarks: medians of synchronised wall-clock runs."""

from __future__ import annotations

import time
from collections.abc import Callable


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, rounds: int) -> float:
    """Median seconds of `rounds` calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
