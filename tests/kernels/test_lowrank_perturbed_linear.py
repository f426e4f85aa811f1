"""lowrank_perturbed_linear (Z = U V.T / sqrt(rank)) on every device and backend against
heron.kernels.reference: ranks 1, 4, 8 and across the CUDA kernels' rank buckets, shared or two inputs,
with and without bias, three dtypes; the direction is the stream; degenerate shapes.
Tolerances: tests/helpers.assert_close_to_reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import heron
from heron.kernels import reference
from tests.helpers import (
    BIAS_OFFSET,
    DEVICE_BACKENDS,
    DTYPES,
    LOWRANK_KEYS,
    MU,
    SEED,
    U_OFFSET,
    U_SEED,
    V_OFFSET,
    assert_outputs_close,
    interpreted,
    linear_cases,
    linear_inputs,
    run_op,
    skip_unavailable,
)
from tests.kernels.test_perturbed_linear import SMALL_SHAPES, torch_linear

OP = "lowrank_perturbed_linear"
# (M, N, K); the interpreter gets the small ones
SHAPES = [(17, 33, 97), (97, 17, 1025), (3, 1025, 17), (1025, 17, 33), (1, 1, 1), (3, 97, 17), (17, 1025, 97),
          (1025, 17, 1025)]
RANKS = [1, 4, 8]


def keys(rank: int) -> dict:
    return {"seed": SEED, "bias_offset": BIAS_OFFSET, "mu": MU, "rank": rank, **LOWRANK_KEYS}


def reference_outputs(inputs, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    f32 = inputs.float32_cpu()
    return reference.lowrank_perturbed_linear(f32.x, f32.weight, f32.bias, seed=SEED, u_seed=U_SEED, rank=rank,
                                              u_offset=U_OFFSET, v_offset=V_OFFSET, bias_offset=BIAS_OFFSET, mu=MU,
                                              x_pert=f32.x_pert)


def check(device_type: str, backend: str, inputs, rank: int) -> None:
    got = run_op(OP, device_type, backend, **inputs.operands(), **keys(rank))
    lowp = None
    if inputs.x.dtype != torch.float32:
        n, k = inputs.weight.shape
        u, v = reference.lowrank_factors(n, k, rank, seed=SEED, u_seed=U_SEED, u_offset=U_OFFSET, v_offset=V_OFFSET,
                                         device="cpu")
        z_b = reference.direction(SEED, BIAS_OFFSET, (n,), "cpu")
        lowp = torch_linear(inputs, reference.lowrank_direction(u, v), z_b, MU)
    assert_outputs_close(got, reference_outputs(inputs, rank), lowp, inputs.x.dtype)


@linear_cases(SHAPES, SMALL_SHAPES, RANKS)
def test_lowrank_perturbed_linear(device_type, backend, shape, rank, dtype, bias, shared):
    check(device_type, backend, linear_inputs(shape, dtype, device_type, bias=bias, shared=shared), rank)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("rank", [15, 16, 17, 33, 64])
def test_ranks_across_the_cuda_rank_buckets(device_type, backend, rank):
    """Ranks on both sides of the CUDA kernels' compile-time rank buckets (16, 64)."""
    if interpreted(device_type, backend):
        pytest.skip("too slow for the interpreter")
    for shared in (True, False):
        check(device_type, backend, linear_inputs((97, 129, 65), torch.float32, device_type, shared=shared), rank)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("rank", [1, 4])
def test_direction_is_the_stream(device_type, backend, rank):
    """x = I and mu = 1: y_pert - y_base = (U V.T / sqrt(rank)).T with U, V from heron.seeded_randn."""
    skip_unavailable(device_type, backend, OP)
    n, k = 17, 33
    eye = torch.eye(k, device=device_type)
    y_base, y_pert = run_op(OP, device_type, backend, x_base=eye, x_pert=None,
                            weight=torch.randn(n, k, device=device_type), bias=None,
                            **{**keys(rank), "bias_offset": 0, "mu": 1.0})
    u = heron.seeded_randn((n, rank), U_SEED, U_OFFSET)
    v = heron.seeded_randn((k, rank), SEED, V_OFFSET)
    torch.testing.assert_close((y_pert - y_base).cpu(), (u @ v.T).T / math.sqrt(rank), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_base_stream_ignores_the_direction(device_type, backend, dtype):
    """y_base is bit-identical whatever mu, the keys and the perturbed input."""
    inputs = linear_inputs((17, 33, 97), dtype, device_type)
    operands = {**inputs.operands(), "x_pert": None}
    y_base = run_op(OP, device_type, backend, **operands, **keys(4))[0]
    assert torch.equal(y_base, run_op(OP, device_type, backend, **inputs.operands(), **keys(4))[0])
    assert torch.equal(y_base, run_op(OP, device_type, backend, **operands, **{**keys(4), "seed": 3, "mu": 0.0})[0])


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
def test_shared_input_equals_two_inputs(device_type, backend):
    """x_pert=None (x read once for both streams) computes what x_pert=x computes."""
    inputs = linear_inputs((65, 130, 67), torch.float32, device_type, shared=True)
    shared = run_op(OP, device_type, backend, **inputs.operands(), **keys(4))
    separate = run_op(OP, device_type, backend, **{**inputs.operands(), "x_pert": inputs.x.clone()}, **keys(4))
    for a, b in zip(shared, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 7), (4, 5, 0), (4, 0, 7), (1030, 0, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rank", [2, 3])
def test_empty_and_degenerate_shapes(device_type, backend, shape, rank):
    for shared in (True, False):
        inputs = linear_inputs(shape, torch.float32, device_type, shared=shared)
        got = run_op(OP, device_type, backend, **inputs.operands(), **keys(rank))
        for out, expected in zip(got, reference_outputs(inputs, rank), strict=True):
            assert out.shape == expected.shape == shape[:2]
            torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-6)
