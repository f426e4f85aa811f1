"""Seeded in-place updates per backend, side by side with a plain in-place p.add_(q) of the same
tensor (the memory-bound floor of touching p once), the unfused reference (materialise z), and the
bare generator writing n normals (heron's seeded_randn into a preallocated tensor): no update can
beat the time of generating its direction, so generate_over_add bounds fused_over_add from below.
Ratios of the median rounds and of the fastest rounds (bench/timing.py says why both)."""

from __future__ import annotations

import pytest
import torch

import heron
from heron.kernels import functional as HF
from heron.profiling.memory import peak_memory
from tests.helpers import op_available

from .timing import interleaved_times

pytestmark = pytest.mark.bench

SIZES = [1 << 20, 1 << 24]


def _cases():
    devices = [("cpu", "cpu")]
    if torch.cuda.is_available():
        devices += [("cuda", "triton"), ("cuda", "cuda")]
    for device, backend in devices:
        for n in SIZES:
            yield pytest.param(device, backend, n, id=f"{device}-{backend}-{n}")


@pytest.mark.parametrize(("device", "backend", "n"), list(_cases()))
@pytest.mark.parametrize("update", ["sgd", "adam", "perturb"])
def test_update_vs_add(record, device, backend, n, update):
    op = {"sgd": "zo_sgd_update_", "adam": "zo_adam_update_", "perturb": "perturb_"}[update]
    if not op_available(backend, device, op):
        pytest.skip(f"{backend} {op} not available on {device}")
    p = torch.randn(n, device=device)
    q = torch.randn(n, device=device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step = [0]

    def fused():
        if update == "sgd":
            HF.zo_sgd_update_(p, 7, 0.1, lr=1e-6, backend=backend)
        elif update == "adam":
            step[0] += 1
            HF.zo_adam_update_(p, m, v, 7, 0.1, lr=1e-6, step=step[0], backend=backend)
        else:
            HF.perturb_(p, 7, alpha=1e-6, backend=backend)

    def unfused():
        z = heron.seeded_randn(n, 7, device=device)
        p.add_(z, alpha=-1e-7)

    z = torch.empty(n, device=device)

    def generate():
        torch.ops.heron.philox_randn_(out=z, seed=7, offset=0, backend=backend)

    rounds = 20
    t_fused, t_add, t_unfused, t_generate = interleaved_times(
        (fused, lambda: p.add_(q, alpha=1e-9), unfused, generate), device, rounds)
    record("updates", op=op, device=device, backend=backend, n=n, threads=_threads(device), rounds=rounds,
           fused_s=t_fused.median, add_s=t_add.median, unfused_s=t_unfused.median, generate_s=t_generate.median,
           fused_over_add=t_fused.median / t_add.median, generate_over_add=t_generate.median / t_add.median,
           unfused_over_fused=t_unfused.median / t_fused.median,
           fastest_fused_over_add=t_fused.fastest / t_add.fastest,
           fastest_generate_over_add=t_generate.fastest / t_add.fastest,
           fused_extra_bytes=peak_memory(fused, device)[1], unfused_extra_bytes=peak_memory(unfused, device)[1])


def _threads(device: str) -> int | None:
    return torch.get_num_threads() if device == "cpu" else None
