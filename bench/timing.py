"""Timing helpers shared by the benchmarks: synchronised wall-clock runs of several functions timed
in interleaved rounds, so that drift in the machine's speed falls on all alike.

Each function's rounds give a median and a fastest time. On a loaded machine (other processes on
the same cores) a multi-threaded call can wait for a descheduled worker thread for a whole
scheduler tick (milliseconds, many times a small op's own time); such waits move the median, while
the fastest round is the run that was not interrupted. Benchmarks record both."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from heron.profiling.profile import round_order


@dataclass(frozen=True)
class Times:
    """Seconds of one function over its rounds."""

    median: float
    fastest: float


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved_times(fns: Sequence[Callable[[], object]], device: str, rounds: int) -> list[Times]:
    """Times of each of `fns` over `rounds` rounds, each round calling every function once in turn,
    the order rotating between rounds (heron.profiling.profile.round_order), after one warm-up call each."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for round_ in range(rounds):
        for index in round_order(len(fns), round_):
            sync(device)
            start = time.perf_counter()
            fns[index]()
            sync(device)
            samples[index].append(time.perf_counter() - start)
    return [Times(median=sorted(own)[len(own) // 2], fastest=min(own)) for own in samples]


def median_times(fns: Sequence[Callable[[], object]], device: str, rounds: int) -> list[float]:
    """Median seconds of each of `fns` (interleaved_times)."""
    return [times.median for times in interleaved_times(fns, device, rounds)]
