"""perturbed_linear (full Gaussian direction) on every device and backend against heron.kernels.reference.

Shared or two inputs, with and without bias, float32 / bfloat16 / float16, each of 1, 3, 17, 97, 1025
as M, N and K; the direction inside the GEMM is the stream; empty and degenerate shapes; a layer
larger than the CPU tile budget. Tolerances: tests/helpers.assert_close_to_reference.
"""

from __future__ import annotations

import pytest
import torch

import heron
from heron.kernels import reference
from tests.helpers import (
    BIAS_OFFSET,
    DEVICE_BACKENDS,
    DTYPES,
    MU,
    SEED,
    WEIGHT_OFFSET,
    assert_outputs_close,
    interpreted,
    linear_cases,
    linear_inputs,
    run_op,
    skip_unavailable,
)

OP = "perturbed_linear"
# (M, N, K): each of 1, 3, 17, 97, 1025 as M, as N and as K; the interpreter gets the small ones.
SHAPES = [(1, 1, 1), (3, 97, 17), (17, 3, 97), (97, 17, 3), (1025, 17, 97), (17, 97, 1025), (3, 1025, 97)]
SMALL_SHAPES = [(1, 3, 17), (3, 17, 33), (17, 33, 1), (33, 1, 3)]


def torch_linear(inputs, z: torch.Tensor, z_b: torch.Tensor | None, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_base, y_pert) computed by PyTorch at the inputs' dtype with the weight direction z (N, K), bias
    direction z_b (N,) (float32, rounded to the dtype as a kernel does)."""
    x, weight, bias = inputs.x, inputs.weight, inputs.bias
    xp = x if inputs.x_pert is None else inputs.x_pert
    w_pert = (weight.float() + mu * z.to(weight.device)).to(weight.dtype)
    b_pert = None if bias is None else (bias.float() + mu * z_b.to(bias.device)).to(bias.dtype)
    return torch.nn.functional.linear(x, weight, bias), torch.nn.functional.linear(xp, w_pert, b_pert)


def reference_outputs(inputs, **keys) -> tuple[torch.Tensor, torch.Tensor]:
    f32 = inputs.float32_cpu()
    return reference.perturbed_linear(f32.x, f32.weight, f32.bias, seed=keys["seed"], offset=keys["weight_offset"],
                                      bias_offset=keys["bias_offset"], mu=keys["mu"], x_pert=f32.x_pert)


def check(device_type: str, backend: str, inputs, **keys) -> None:
    """The op on `inputs` against the float32 reference and, in low precision, PyTorch at that dtype."""
    got = run_op(OP, device_type, backend, **inputs.operands(), **keys)
    lowp = None
    if inputs.x.dtype != torch.float32:
        n, k = inputs.weight.shape
        z = reference.direction(keys["seed"], keys["weight_offset"], (n, k), "cpu")
        z_b = reference.direction(keys["seed"], keys["bias_offset"], (n,), "cpu")
        lowp = torch_linear(inputs, z, z_b, keys["mu"])
    assert_outputs_close(got, reference_outputs(inputs, **keys), lowp, inputs.x.dtype)


KEYS = {"seed": SEED, "weight_offset": WEIGHT_OFFSET, "bias_offset": BIAS_OFFSET, "mu": MU}


@linear_cases(SHAPES, SMALL_SHAPES)
def test_perturbed_linear(device_type, backend, shape, dtype, bias, shared):
    check(device_type, backend, linear_inputs(shape, dtype, device_type, bias=bias, shared=shared), **KEYS)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_larger_than_the_cpu_tile_budget(device_type, backend, shared, dtype):
    """N*K*4 = 2.46 MB > the CPU kernels' 2 MiB tile budget: several tiles per row block."""
    if interpreted(device_type, backend):
        pytest.skip("too large for the interpreter")
    check(device_type, backend, linear_inputs((5, 300, 2049), dtype, device_type, shared=shared), **KEYS)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
def test_direction_is_the_stream(device_type, backend, shared):
    """x = I and mu = 1: y_pert - y_base = Z.T; x = 0: y_pert - y_base = z_b, both heron.seeded_randn."""
    skip_unavailable(device_type, backend, OP)
    n, k = 33, 17
    weight, bias = torch.randn(n, k, device=device_type), torch.randn(n, device=device_type)
    eye = torch.eye(k, device=device_type)
    y_base, y_pert = run_op(OP, device_type, backend, x_base=eye, x_pert=None if shared else eye.clone(),
                            weight=weight, bias=None, seed=SEED, weight_offset=BIAS_OFFSET, bias_offset=0, mu=1.0)
    z = heron.seeded_randn((n, k), SEED, BIAS_OFFSET)
    torch.testing.assert_close((y_pert - y_base).cpu(), z.T, rtol=0, atol=1e-5)
    zero = torch.zeros(1, k, device=device_type)
    y_base, y_pert = run_op(OP, device_type, backend, x_base=zero, x_pert=None if shared else zero.clone(),
                            weight=weight, bias=bias, seed=SEED, weight_offset=0, bias_offset=WEIGHT_OFFSET, mu=1.0)
    torch.testing.assert_close((y_pert - y_base)[0].cpu(), heron.seeded_randn(n, SEED, WEIGHT_OFFSET), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_base_stream_ignores_the_direction(device_type, backend, dtype):
    """y_base is bit-identical whatever mu, the key and the perturbed input."""
    inputs = linear_inputs((17, 33, 97), dtype, device_type)
    operands = {**inputs.operands(), "x_pert": None}
    y_base = run_op(OP, device_type, backend, **operands, **KEYS)[0]
    assert torch.equal(y_base, run_op(OP, device_type, backend, **inputs.operands(), **KEYS)[0])
    assert torch.equal(y_base, run_op(OP, device_type, backend, **operands, **{**KEYS, "seed": 3, "mu": 0.0})[0])


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
def test_shared_input_equals_two_inputs(device_type, backend):
    """x_pert=None (x read once for both streams) computes what x_pert=x computes."""
    inputs = linear_inputs((65, 130, 67), torch.float32, device_type, shared=True)
    shared = run_op(OP, device_type, backend, **inputs.operands(), **KEYS)
    separate = run_op(OP, device_type, backend, **{**inputs.operands(), "x_pert": inputs.x.clone()}, **KEYS)
    for a, b in zip(shared, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 7), (4, 5, 0), (4, 0, 7), (1030, 0, 7)], ids=lambda s: "x".join(map(str, s)))
def test_empty_and_degenerate_shapes(device_type, backend, shape):
    """Empty batch, K = 0 (y = b) and N = 0 (with 1024+ rows: the CPU's cooperative path) return the
    reference's shapes and values."""
    for shared in (True, False):
        inputs = linear_inputs(shape, torch.float32, device_type, shared=shared)
        got = run_op(OP, device_type, backend, **inputs.operands(), **KEYS)
        for out, expected in zip(got, reference_outputs(inputs, **KEYS), strict=True):
            assert out.shape == expected.shape == shape[:2]
            torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("device_type", "backend"), [p for p in DEVICE_BACKENDS if p.values[1] == "triton"])
def test_triton_dot_precision_follows_allow_tf32(device_type, backend):
    """float32 tl.dot uses TF32 only when torch allows TF32 matmuls; other dtypes always "ieee"."""
    skip_unavailable(device_type, backend, OP)
    from heron_kernels import linear as triton_linear

    x32, x16 = torch.randn(3, 17, device=device_type), torch.randn(3, 17, device=device_type).to(torch.bfloat16)
    weight = torch.randn(5, 17, device=device_type)
    saved = torch.backends.cuda.matmul.allow_tf32  # a property: monkeypatch cannot restore it
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert triton_linear.dot_precision(x32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert triton_linear.dot_precision(x32) == "tf32"
        assert triton_linear.dot_precision(x16) == "ieee"
        y_base, _ = run_op(OP, device_type, backend, x_base=x32, x_pert=None, weight=weight, bias=None, **KEYS)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    torch.testing.assert_close(y_base, x32 @ weight.T, rtol=1e-2, atol=1e-2)
