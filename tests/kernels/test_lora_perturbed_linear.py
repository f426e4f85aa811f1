"""lora_perturbed_linear (frozen W, b; adapters A, B perturbed) on every device and backend against
heron.kernels.reference: adapter ranks 1, 4, 8 and across the CUDA rank buckets, the CUDA split-K path,
shared or two inputs, with and without bias, three dtypes; the direction is the stream; empty shapes;
repeated calls are identical. Tolerances: tests/helpers.assert_close_to_reference.
"""

from __future__ import annotations

import pytest
import torch

import heron
from heron.kernels import reference
from tests.helpers import (
    DEVICE_BACKENDS,
    MU,
    SEED,
    assert_outputs_close,
    interpreted,
    linear_cases,
    linear_inputs,
    run_op,
    skip_unavailable,
)
from tests.kernels.test_lowrank_perturbed_linear import SHAPES
from tests.kernels.test_perturbed_linear import SMALL_SHAPES

OP = "lora_perturbed_linear"
RANKS = [1, 4, 8]
A_OFFSET, B_OFFSET, SCALE = 2**39 + 13, 2**43 + 17, 0.75
KEYS = {"scale": SCALE, "seed": SEED, "a_offset": A_OFFSET, "b_offset": B_OFFSET, "mu": MU}


def torch_lora(inputs, keys: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_base, y_pert) computed by PyTorch at the inputs' dtype."""
    x, weight, bias, a, b = inputs.x, inputs.weight, inputs.bias, inputs.lora_a, inputs.lora_b
    xp = x if inputs.x_pert is None else inputs.x_pert
    mu, scale = keys["mu"], keys["scale"]
    a_pert = (a.float() + mu * reference.direction(keys["seed"], keys["a_offset"], a.shape, a.device)).to(a.dtype)
    b_pert = (b.float() + mu * reference.direction(keys["seed"], keys["b_offset"], b.shape, b.device)).to(b.dtype)
    frozen = torch.nn.functional.linear
    return (frozen(x, weight, bias) + scale * (x @ a.T) @ b.T,
            frozen(xp, weight, bias) + scale * (xp @ a_pert.T) @ b_pert.T)


def reference_outputs(inputs, keys: dict) -> tuple[torch.Tensor, torch.Tensor]:
    f32 = inputs.float32_cpu()
    return reference.lora_perturbed_linear(f32.x, f32.weight, f32.bias, f32.lora_a, f32.lora_b, x_pert=f32.x_pert,
                                           **keys)


def check(device_type: str, backend: str, inputs, keys: dict = KEYS) -> None:
    got = run_op(OP, device_type, backend, **inputs.operands(), **keys)
    lowp = None if inputs.x.dtype == torch.float32 else torch_lora(inputs, keys)
    assert_outputs_close(got, reference_outputs(inputs, keys), lowp, inputs.x.dtype)


@linear_cases(SHAPES, SMALL_SHAPES, RANKS)
def test_lora_perturbed_linear(device_type, backend, shape, rank, dtype, bias, shared):
    check(device_type, backend, linear_inputs(shape, dtype, device_type, bias=bias, shared=shared, lora_rank=rank))


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("rank", [16, 17, 64])
@pytest.mark.parametrize(("m", "k"), [(1, 4099), (300, 33)])
def test_ranks_across_the_cuda_rank_buckets_and_split_k(device_type, backend, rank, m, k):
    """Adapter ranks across the CUDA rank buckets and its LoRA epilogue chunk (16); a small M with a
    long K takes the CUDA split-K path of x @ A.T."""
    if interpreted(device_type, backend):
        pytest.skip("too slow for the interpreter")
    check(device_type, backend, linear_inputs((m, 70, k), torch.float32, device_type, lora_rank=rank),
          {**KEYS, "scale": 0.75})


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("m", "k"), [(0, 7), (4, 0)])
def test_empty_batch_or_features(device_type, backend, m, k):
    check(device_type, backend, linear_inputs((m, 5, k), torch.float32, device_type, lora_rank=3))


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
def test_repeated_calls_are_identical(device_type, backend):
    shape = (5, 33, 64) if interpreted(device_type, backend) else (5, 200, 3000)
    inputs = linear_inputs(shape, torch.float32, device_type, lora_rank=8)
    keys = {**KEYS, "a_offset": 0, "b_offset": 2**40}
    first = run_op(OP, device_type, backend, **inputs.operands(), **keys)
    second = run_op(OP, device_type, backend, **inputs.operands(), **keys)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
def test_direction_is_the_stream(device_type, backend):
    """W, b, A, B = 0 and x = I: y_base = 0, y_pert = scale * mu**2 * Z_A.T @ Z_B.T."""
    skip_unavailable(device_type, backend, OP)
    n, k, rank = 17, 33, 4
    zeros = {"device": device_type}
    y_base, y_pert = run_op(OP, device_type, backend, x_base=torch.eye(k, **zeros), x_pert=None,
                            weight=torch.zeros(n, k, **zeros), bias=None, lora_a=torch.zeros(rank, k, **zeros),
                            lora_b=torch.zeros(n, rank, **zeros), **{**KEYS, "mu": 0.5})
    z_a = heron.seeded_randn((rank, k), SEED, A_OFFSET)
    z_b = heron.seeded_randn((n, rank), SEED, B_OFFSET)
    assert torch.count_nonzero(y_base) == 0
    torch.testing.assert_close(y_pert.cpu(), SCALE * 0.25 * z_a.T @ z_b.T, rtol=0, atol=1e-5)
