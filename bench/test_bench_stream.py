"""seeded_randn throughput of every backend of a device, side by side with torch.randn on the same
device: all of them timed in the same interleaved rounds (bench/timing.py), so drift in the machine's
speed falls on every competitor alike, and each ratio is to the torch.randn of that run (of the median
rounds, and of the fastest rounds: bench/timing.py says why both)."""

from __future__ import annotations

import pytest
import torch

import heron  # noqa: F401 - registers torch.ops.heron
from heron.kernels import backends

from .timing import interleaved_times

pytestmark = pytest.mark.bench

N = 1 << 24  # 16.8 M normals: large enough to amortise launch and thread start-up
ROUNDS = 15
SEED, OFFSET = 1234, 2**33


def _devices():
    yield "cpu"
    if torch.cuda.is_available():
        yield "cuda"


def _competing_backends(device: str) -> list[str]:
    """The backends of `device` that are product paths: on the CPU the Triton interpreter (a
    correctness tool) and the integer-op torch reference (it runs, at a crawl) are left out."""
    left_out = {"triton", "torch"} if device == "cpu" else set()
    return [b for b in backends.BACKENDS if b not in left_out and not backends.unavailable_reason(b, device)]


@pytest.mark.parametrize("device", list(_devices()))
def test_seeded_randn_throughput(record, device):
    names = _competing_backends(device)
    if not names:
        pytest.skip(f"no compiled heron backend on {device}")
    outputs = {name: torch.empty(N, device=device) for name in ["torch.randn", *names]}

    def torch_randn():
        torch.randn(N, out=outputs["torch.randn"])

    def heron_randn(name: str):
        return lambda: torch.ops.heron.philox_randn_(out=outputs[name], seed=SEED, offset=OFFSET, backend=name)

    t_torch, *t_heron = interleaved_times([torch_randn, *(heron_randn(name) for name in names)], device, ROUNDS)
    threads = torch.get_num_threads() if device == "cpu" else None
    for name, times in zip(["torch.randn", *names], [t_torch, *t_heron], strict=True):
        record("stream", device=device, backend=name, threads=threads, n=N, rounds=ROUNDS, median_s=times.median,
               fastest_s=times.fastest, normals_per_s=N / times.median, vs_torch_randn=t_torch.median / times.median,
               fastest_vs_torch_randn=t_torch.fastest / times.fastest)
