"""seeded_randn throughput per backend, side by side with torch.randn on the same device: both timed
in interleaved rounds (bench/timing.py), so drift in the machine's speed falls on both alike."""

from __future__ import annotations

import pytest
import torch

import heron  # noqa: F401 - registers torch.ops.heron
from heron.kernels import backends

from .timing import median_times

pytestmark = pytest.mark.bench

N = 1 << 24  # 16.8 M normals: large enough to amortise launch and thread start-up
ROUNDS = 15


def _cases():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in backends.BACKENDS:
            if backend == "triton" and device == "cpu":
                continue  # the interpreter is a correctness tool, not a CPU backend
            if backend == "torch" and device == "cpu":
                continue  # the integer-op reference runs, but at a crawl; it is not a product path
            yield pytest.param(device, backend, id=f"{device}-{backend}")


@pytest.mark.parametrize(("device", "backend"), list(_cases()))
def test_seeded_randn_throughput(record, device, backend):
    if backends.unavailable_reason(backend, device):
        pytest.skip(backends.unavailable_reason(backend, device))
    out_torch = torch.empty(N, device=device)
    out_heron = torch.empty(N, device=device)

    def torch_randn():
        torch.randn(N, out=out_torch)

    def heron_randn():
        torch.ops.heron.philox_randn_(out=out_heron, seed=1234, offset=2**33, backend=backend)

    t_torch, t_heron = median_times((torch_randn, heron_randn), device, ROUNDS)
    threads = torch.get_num_threads() if device == "cpu" else None
    record("stream", device=device, backend="torch.randn", threads=threads, n=N, median_s=t_torch,
           normals_per_s=N / t_torch, vs_torch_randn=1.0)
    record("stream", device=device, backend=backend, threads=threads, n=N, median_s=t_heron,
           normals_per_s=N / t_heron, vs_torch_randn=t_torch / t_heron)
