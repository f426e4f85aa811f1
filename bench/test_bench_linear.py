"""Dual-stream perturbed_linear (full, LoRA, low-rank) per backend, side by side in one run with
(a) the unfused reference: materialise Z with seeded_randn, then two GEMMs, and
(b) the floor: two plain GEMMs, x_base @ W.T and x_pert @ W.T.

Rows go to bench/results/linear_<device>.json; `bench/README.md` holds the tables.
"""

from __future__ import annotations

import pytest
import torch

import heron
from heron.kernels import functional as HF
from heron.profiling.memory import peak_memory
from tests.helpers import op_available

from .timing import interleaved_times, median_times

pytestmark = pytest.mark.bench

SEED, MU = 1234, 1e-3
CPU_SHAPES = [(256, 768, 768), (256, 1024, 1024), (1024, 1024, 1024), (4096, 768, 768), (4096, 1024, 1024),
              (256, 4096, 4096), (1024, 4096, 4096)]
GPU_SHAPES = [(m, k, k) for m in (256, 1024, 4096) for k in (768, 1024, 4096)]


def _devices():
    yield "cpu", CPU_SHAPES, torch.float32
    if torch.cuda.is_available():
        yield "cuda", GPU_SHAPES, torch.bfloat16


def _cases(op: str):
    for device, shapes, dtype in _devices():
        for backend in ("cpu", "cuda", "triton"):
            if device == "cpu" and backend != "cpu":
                continue
            if device == "cuda" and backend == "cpu":
                continue
            for shape in shapes:
                yield pytest.param(device, backend, shape, dtype, id=f"{device}-{backend}-{'x'.join(map(str, shape))}")


def _rounds(m: int, k: int, n: int, device: str) -> int:
    return 20 if device == "cuda" else max(5, min(15, int(4e10 / (2 * m * k * n))))


@pytest.mark.parametrize(("device", "backend", "shape", "dtype"), list(_cases("perturbed_linear")))
@pytest.mark.parametrize("shared_input", [False, True], ids=["two-inputs", "shared-input"])
def test_perturbed_linear_vs_floor(record, device, backend, shape, dtype, shared_input):
    if not op_available(backend, device, "perturbed_linear"):
        pytest.skip(f"{backend} perturbed_linear not available on {device}")
    m, k, n = shape
    x = torch.randn(m, k, device=device, dtype=dtype)
    x_pert = None if shared_input else torch.randn(m, k, device=device, dtype=dtype)
    xp = x if x_pert is None else x_pert
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(n, device=device, dtype=dtype)
    rounds = _rounds(m, k, n, device)

    def fused():
        return HF.perturbed_linear(x, w, b, seed=SEED, mu=MU, x_pert=x_pert, backend=backend)

    def floor():
        return torch.nn.functional.linear(x, w, b), torch.nn.functional.linear(xp, w, b)

    def unfused():
        z = heron.seeded_randn((n, k), SEED, 0, device=device, dtype=dtype)
        zb = heron.seeded_randn(n, SEED, n * k, device=device, dtype=dtype)
        return torch.nn.functional.linear(x, w, b), torch.nn.functional.linear(xp, w + MU * z, b + MU * zb)

    z = torch.empty(n, k, device=device, dtype=torch.float32)

    def generate():  # the direction alone: a lower bound on what the fused op adds to the floor
        torch.ops.heron.philox_randn_(out=z, seed=SEED, offset=0, backend=backend)

    t_fused, t_floor, t_unfused, t_generate = interleaved_times((fused, floor, unfused, generate), device, rounds)
    out_bytes = 2 * m * n * x.element_size()
    mem_fused = peak_memory(fused, device)[1] - out_bytes
    mem_unfused = peak_memory(unfused, device)[1] - out_bytes
    record("linear", op="perturbed_linear", device=device, backend=backend, dtype=str(dtype), m=m, k=k, n=n,
           path="shared-input" if shared_input else "two-inputs", rounds=rounds, fused_s=t_fused.median,
           floor_s=t_floor.median, unfused_s=t_unfused.median, generate_s=t_generate.median,
           fused_over_floor=t_fused.median / t_floor.median, unfused_over_fused=t_unfused.median / t_fused.median,
           generate_over_floor=t_generate.median / t_floor.median,
           fastest_fused_over_floor=t_fused.fastest / t_floor.fastest,
           fastest_generate_over_floor=t_generate.fastest / t_floor.fastest,
           fused_extra_bytes=mem_fused, unfused_extra_bytes=mem_unfused)


@pytest.mark.parametrize(("device", "backend", "shape", "dtype"), list(_cases("lora_perturbed_linear")))
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_lora_perturbed_linear_vs_floor(record, device, backend, shape, dtype, rank):
    if not op_available(backend, device, "lora_perturbed_linear"):
        pytest.skip(f"{backend} lora_perturbed_linear not available on {device}")
    m, k, n = shape
    if device == "cpu" and m * k * n > 2**32:
        pytest.skip("largest CPU shapes covered by the full-weight benchmark")
    layer = heron.LoRALinear(k, n, rank=rank, device=device, dtype=dtype)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(m, k, device=device, dtype=dtype)
    x_pert = torch.randn(m, k, device=device, dtype=dtype)
    rounds = _rounds(m, k, n, device)

    def fused():
        return layer.dual_forward(x, x_pert, seed=SEED, mu=MU, backend=backend)

    def floor():
        return torch.nn.functional.linear(x, layer.weight), torch.nn.functional.linear(x_pert, layer.weight)

    def unfused():
        za = heron.seeded_randn(layer.lora_a.shape, SEED, 0, device=device, dtype=dtype)
        zb = heron.seeded_randn(layer.lora_b.shape, SEED, za.numel(), device=device, dtype=dtype)
        base = layer(x)
        pert = (torch.nn.functional.linear(x_pert, layer.weight, layer.bias)
                + layer.scale * (x_pert @ (layer.lora_a + MU * za).T) @ (layer.lora_b + MU * zb).T)
        return base, pert

    with torch.no_grad():
        t_fused, t_floor, t_unfused = median_times((fused, floor, unfused), device, rounds)
        out_bytes = 2 * m * n * x.element_size()
        mem_fused = peak_memory(fused, device)[1] - out_bytes
    record("linear", op="lora_perturbed_linear", device=device, backend=backend, dtype=str(dtype), m=m, k=k, n=n,
           rank=rank, path="two-inputs", fused_s=t_fused, floor_s=t_floor, unfused_s=t_unfused,
           fused_over_floor=t_fused / t_floor, unfused_over_fused=t_unfused / t_fused, fused_extra_bytes=mem_fused)


@pytest.mark.parametrize(("device", "backend", "shape", "dtype"), list(_cases("perturbed_linear")))
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_lowrank_perturbed_linear_vs_floor(record, device, backend, shape, dtype, rank):
    if not op_available(backend, device, "lowrank_perturbed_linear"):
        pytest.skip(f"{backend} lowrank_perturbed_linear not available on {device}")
    m, k, n = shape
    if device == "cpu" and m * k * n > 2**32:
        pytest.skip("largest CPU shapes covered by the full-weight benchmark")
    x = torch.randn(m, k, device=device, dtype=dtype)
    x_pert = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    rounds = _rounds(m, k, n, device)

    def fused():
        return HF.lowrank_perturbed_linear(x, w, seed=SEED, rank=rank, mu=MU, x_pert=x_pert, backend=backend)

    def floor():
        return x @ w.T, x_pert @ w.T

    def unfused():
        u = heron.seeded_randn((n, rank), SEED, 0, device=device, dtype=dtype)
        v = heron.seeded_randn((k, rank), SEED, n * rank, device=device, dtype=dtype)
        return x @ w.T, x_pert @ (w + MU * (u @ v.T) / rank**0.5).T

    t_fused, t_floor, t_unfused = median_times((fused, floor, unfused), device, rounds)
    out_bytes = 2 * m * n * x.element_size()
    record("linear", op="lowrank_perturbed_linear", device=device, backend=backend, dtype=str(dtype), m=m, k=k, n=n,
           rank=rank, path="two-inputs", fused_s=t_fused, floor_s=t_floor, unfused_s=t_unfused,
           fused_over_floor=t_fused / t_floor, unfused_over_fused=t_unfused / t_fused,
           fused_extra_bytes=peak_memory(fused, device)[1] - out_bytes)
