"""Per-step cost of an updater: peak memory, FLOPs and wall time.

peak_memory_bytes = bytes the client holds before the step (its model's parameters and buffers,
the updater's optimizer state, the batch) + the peak of tensor memory allocated during the step
(CUDA allocator statistics on GPU, the PyTorch profiler's memory events on CPU).
flops: torch.utils.flop_counter over the step, heron's fused ops counted by their registered
formulas. time_s: the median wall time of `repeats` steps. Measurements run on a deep copy of the
updater after `warmup` steps, so the caller's model is not touched.

`profile_steps` compares several updaters on one batch: their timed steps run in interleaved rounds
(one step of each in turn), so drift in the machine's speed during the run (clock, other load, the
allocator's state) falls on all of them alike instead of on whichever ran last.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from heron.profiling.memory import peak_memory


@dataclass
class StepProfile:
    peak_memory_bytes: int
    step_peak_bytes: int
    resident_bytes: int
    flops: int
    time_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tensor_bytes(value: Any) -> int:
    seen: set[int] = set()
    total = 0

    def visit(v: Any) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            key = v.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            for item in v.values():
                visit(item)
        elif isinstance(v, (list, tuple)):
            for item in v:
                visit(item)

    visit(value)
    return total


def _resident_bytes(updater: Any, batch: Any) -> int:
    model = updater.model
    state = updater.state_dict()
    return _tensor_bytes([list(model.parameters()), list(model.buffers()), state, batch])


def _device(updater: Any) -> torch.device:
    return next(updater.model.parameters()).device


def _timed_step(work: Any, batch: Any, device: torch.device, clock: Callable[[], float]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    work.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def _memory_and_flops(work: Any, batch: Any, time_s: float) -> StepProfile:
    device = _device(work)
    with FlopCounterMode(display=False) as counter:
        work.step(batch)
    resident = _resident_bytes(work, batch)
    _, step_peak = peak_memory(lambda: work.step(batch), device)
    return StepProfile(peak_memory_bytes=resident + step_peak, step_peak_bytes=step_peak, resident_bytes=resident,
                       flops=int(counter.get_total_flops()), time_s=time_s)


def round_order(count: int, round_: int) -> list[int]:
    """The order in which round `round_` of an interleaved timing runs its `count` competitors: one
    each, starting one competitor later every round, so none always runs right after the same
    neighbour (a call that follows one with a large footprint runs on a colder cache and allocator)."""
    start = round_ % count
    return [*range(start, count), *range(start)]


def profile_steps(updaters: Mapping[str, Any], batch: Any, *, warmup: int = 1, repeats: int = 3,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, StepProfile]:
    """Profile every updater of `updaters` (name -> updater) on `batch`, side by side: `warmup`
    steps each, then `repeats` rounds of one timed step per updater in turn (round r starting at
    the r-th updater, so the order rotates), then each one's FLOPs and peak memory. Runs on
    copies; returns name -> StepProfile in the mapping's order.

    clock: what time_s measures; wall time by default, or e.g. time.process_time (the process's
    CPU time, which other load on a shared machine does not inflate; one thread makes it the
    step's time on an idle core)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    works = {name: copy.deepcopy(updater) for name, updater in updaters.items()}
    for work in works.values():
        for _ in range(warmup):
            work.step(batch)
    times: dict[str, list[float]] = {name: [] for name in works}
    names = list(works)
    for round_ in range(repeats):
        for index in round_order(len(names), round_):
            name = names[index]
            times[name].append(_timed_step(works[name], batch, _device(works[name]), clock))
    return {name: _memory_and_flops(work, batch, statistics.median(times[name])) for name, work in works.items()}


def profile_step(updater: Any, batch: Any, *, warmup: int = 1, repeats: int = 3) -> StepProfile:
    """Profile one step of `updater` on `batch` (on a copy; see the module docstring)."""
    return profile_steps({"updater": updater}, batch, warmup=warmup, repeats=repeats)["updater"]
