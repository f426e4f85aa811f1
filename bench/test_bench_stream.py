"""seeded_randn throughput per backend, side by side with torch.randn on the same device."""

from __future__ import annotations

import pytest
import torch

import heron  # noqa: F401 - registers torch.ops.heron
from heron.kernels import backends

from .timing import sync

pytestmark = pytest.mark.bench

N = 1 << 24  # 16.8 M normals: large enough to amortise launch and thread start-up


def _devices():
    yield "cpu"
    if torch.cuda.is_available():
        yield "cuda"


def _cases():
    for device in _devices():
        for backend in ("torch.randn", *backends.BACKENDS):
            if backend == "triton" and device == "cpu":
                continue  # the interpreter is a correctness tool, not a CPU backend
            if backend == "torch" and device == "cpu":
                continue  # the integer-op reference runs, but at a crawl; it is not a product path
            yield pytest.param(device, backend, id=f"{device}-{backend}")


@pytest.mark.parametrize(("device", "backend"), list(_cases()))
def test_seeded_randn_throughput(benchmark, record, device, backend):
    if backend != "torch.randn" and backends.unavailable_reason(backend, device):
        pytest.skip(backends.unavailable_reason(backend, device))
    out = torch.empty(N, device=device)
    if backend == "torch.randn":
        def run():
            torch.randn(N, out=out)
            sync(device)
    else:
        def run():
            torch.ops.heron.philox_randn_(out=out, seed=1234, offset=2**33, backend=backend)
            sync(device)
    run()
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    baseline = _baseline(device)
    record("stream", device=device, backend=backend, n=N, median_s=seconds, normals_per_s=N / seconds,
           vs_torch_randn=baseline / seconds if baseline else None)


_BASELINES: dict[str, float] = {}


def _baseline(device: str) -> float:
    """Median seconds of torch.randn(N) on `device`, timed once per session."""
    if device not in _BASELINES:
        import time

        out = torch.empty(N, device=device)
        times = []
        for _ in range(12):
            sync(device)
            start = time.perf_counter()
            torch.randn(N, out=out)
            sync(device)
            times.append(time.perf_counter() - start)
        _BASELINES[device] = sorted(times[2:])[len(times[2:]) // 2]
    return _BASELINES[device]

