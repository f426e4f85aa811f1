"""Timing helpers shared by the benchmarks: medians of synchronised wall-clock runs, several
functions timed in interleaved rounds so that drift in the machine's speed falls on all alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def median_times(fns: Sequence[Callable[[], object]], device: str, rounds: int) -> list[float]:
    """Median seconds of each of `fns` over `rounds` rounds, each round calling every function once
    in turn (after one warm-up call each)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, samples in zip(fns, times, strict=True):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples.append(time.perf_counter() - start)
    return [sorted(samples)[len(samples) // 2] for samples in times]
