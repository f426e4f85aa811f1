"""The chunked route of the linear ops (heron.kernels.chunked): the GPU backends' path on CUDA tensors,
device-agnostic, so run here on CPU tensors with each backend's generator launchers.

Full rank: W + mu Z (two inputs) or Z (shared input) for a chunk of output rows into a scratch bounded
by the budget, then a BLAS GEMM into that slice of y_pert; budgets from one row per chunk to the whole
layer in one chunk; the scratch measured
(heron.profiling.memory.peak_memory less the outputs) equals the planned bytes and
stays within the budget whatever N. LoRA and low rank: the frozen product by the BLAS, the rank-r factors
generated small, no N x K tensor.

Tolerances: tests/helpers.assert_close_to_reference, plus, in low precision, what composing GEMMs adds by
analysis: each intermediate that a GEMM rounds to the dtype before the next one adds to it (y_base in
y_base + mu x Z^T; the frozen product x W^T + b before the rank-r term; x V or x A^T) is off by at most u|v|
(u the dtype's unit roundoff, |v| at most the largest float32 reference value of the computation), which
a fused kernel accumulating in float32 never rounds.
"""

from __future__ import annotations

import pytest
import torch

from heron.kernels import chunked, functional, reference
from heron.kernels.launchers import generator
from heron.profiling.memory import peak_memory
from tests.helpers import (
    BIAS_OFFSET,
    FP32_ATOL,
    LOWRANK_KEYS,
    MU,
    SEED,
    WEIGHT_OFFSET,
    assert_close_to_reference,
    cpu_backends,
    linear_inputs,
)
from tests.kernels import test_lora_perturbed_linear as lora_tests
from tests.kernels import test_lowrank_perturbed_linear as lowrank_tests
from tests.kernels.test_perturbed_linear import KEYS, reference_outputs, torch_linear

# the backends whose generators (philox_randn_, perturb_) run on CPU tensors here; the interpreter is slow
GENERATORS = [b for b in cpu_backends("perturb_") if b in cpu_backends("philox_randn_")]
# the full matrices run with the C++ generators (the "torch" ones, the reference, where heron._C is missing);
# the route calls the generators by launcher name only, so one more backend's are checked on a small case
FAST_GENERATORS = [next(b for b in ("cpu", "torch") if b in GENERATORS)]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(3, 97, 17), (17, 33, 97), (1, 1, 1), (97, 17, 3), (5, 300, 129)]
# rows per chunk: one, a few (the last chunk shorter), all of the layer in one chunk
CHUNK_ROWS = [1, 7, None]


UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_composed_close(got, want, lowp, dtype: torch.dtype, roundings: tuple[int, int],
                          scale: float) -> None:
    """(y_base, y_pert) against the float32 reference with `roundings` more intermediate roundings (per
    output) than PyTorch's lowp, each of a value at most `scale` (module docstring)."""
    for name, out, ref, low, extra in zip(("y_base", "y_pert"), got, want, lowp or (None, None), roundings,
                                          strict=True):
        assert out.dtype == dtype, name
        atol = FP32_ATOL + (extra * UNIT_ROUNDOFF[dtype] * scale if dtype in UNIT_ROUNDOFF else 0.0)
        assert_close_to_reference(out, ref, low, atol=atol, what=name)


def largest(*tensors: torch.Tensor) -> float:
    return max(float(t.abs().max()) if t.numel() else 0.0 for t in tensors)


def frozen_product(inputs) -> torch.Tensor:
    """x_pert @ W.T + b (x with a shared input) in float32: the frozen product of the perturbed stream."""
    f32 = inputs.float32_cpu()
    y = (f32.x if f32.x_pert is None else f32.x_pert) @ f32.weight.T
    return y if f32.bias is None else y + f32.bias


def row_bytes(k: int, dtype: torch.dtype) -> int:
    """Scratch bytes of one output row: its K weight elements and its bias element."""
    return (k + 1) * torch.empty((), dtype=dtype).element_size()


def budget_for(rows: int | None, n: int, k: int, dtype: torch.dtype) -> int:
    """A budget that fits `rows` rows (None: all n) and not one more (a few spare bytes)."""
    return (n if rows is None else rows) * row_bytes(k, dtype) + row_bytes(k, dtype) - 1


def run_chunked(inputs, budget: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = inputs.weight.shape
    chunks = chunked.row_chunks(n, k, inputs.weight.dtype, budget)
    assert chunks is not None
    return chunked.perturbed_linear(**inputs.operands(), **KEYS, chunks=chunks, generator=generator(backend))


def check_full(inputs, budget: int, backend: str) -> None:
    """Two inputs: x_pert @ (W + mu Z).T + (b + mu z_b), PyTorch's own computation. Shared: y_base, rounded,
    plus mu (x Z^T + z_b): one rounding more, of y_base."""
    got = run_chunked(inputs, budget, backend)
    lowp = None
    if inputs.x.dtype != torch.float32:
        n, k = inputs.weight.shape
        lowp = torch_linear(inputs, reference.direction(SEED, WEIGHT_OFFSET, (n, k), "cpu"),
                            reference.direction(SEED, BIAS_OFFSET, (n,), "cpu"), MU)
    want = reference_outputs(inputs, **KEYS)
    roundings = (0, 1 if inputs.x_pert is None else 0)
    assert_composed_close(got, want, lowp, inputs.x.dtype, roundings, largest(*want))


@pytest.mark.parametrize("backend", FAST_GENERATORS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rows", CHUNK_ROWS, ids=lambda r: f"rows{r or 'all'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
def test_chunked_perturbed_linear(backend, shape, rows, dtype, bias, shared):
    inputs = linear_inputs(shape, dtype, bias=bias, shared=shared)
    check_full(inputs, budget_for(rows, *shape[1:], dtype), backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
def test_chunked_perturbed_linear_with_other_generators(backend, shared):
    if backend not in GENERATORS:
        pytest.skip(f"{backend} cannot run on CPU tensors here")
    inputs = linear_inputs((3, 9, 17), torch.float32, shared=shared)
    check_full(inputs, budget_for(2, 9, 17, torch.float32), backend)


@pytest.mark.parametrize(("m", "n", "k"), [(0, 5, 7), (4, 5, 0), (4, 0, 7)])
def test_chunked_empty_and_degenerate_shapes(m, n, k):
    for shared in (True, False):
        inputs = linear_inputs((m, n, k), torch.float32, shared=shared)
        got = run_chunked(inputs, budget_for(2, n, k, torch.float32), FAST_GENERATORS[0])
        for out, expected in zip(got, reference_outputs(inputs, **KEYS), strict=True):
            assert out.shape == expected.shape == (m, n)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# float32: the CPU BLAS converts bfloat16 GEMM operands in buffers of its own, which the CPU profiler counts
# (cuBLAS does not; bfloat16 scratch is measured on the GPU by test_cuda_route_scratch_within_the_budget)
MEASURED_DTYPES = [torch.float32]


@pytest.mark.parametrize("dtype", MEASURED_DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
@pytest.mark.parametrize("rows", [1, 5, None], ids=lambda r: f"rows{r or 'all'}")
def test_scratch_is_the_planned_bytes_within_the_budget(dtype, shared, rows):
    """Peak allocation during the call less the two outputs = RowChunks.scratch_bytes <= budget, for a
    layer 4x and 16x the budget's rows (the scratch does not grow with N)."""
    m, k = 9, 130
    for n in (64, 256) if rows is not None else (40,):
        budget = budget_for(rows, n, k, dtype)
        chunks = chunked.row_chunks(n, k, dtype, budget)
        assert chunks.rows == (n if rows is None else rows)
        inputs = linear_inputs((m, n, k), dtype, shared=shared)
        (y_base, y_pert), peak = peak_memory(lambda inputs=inputs, chunks=chunks: chunked.perturbed_linear(
            **inputs.operands(), **KEYS, chunks=chunks, generator=generator("cpu")))
        scratch = peak - y_base.nbytes - y_pert.nbytes
        assert scratch == chunks.scratch_bytes == chunks.rows * row_bytes(k, dtype) <= budget


@pytest.mark.parametrize(("n", "k", "budget"), [(5, 7, 0), (5, 7, 31), (0, 7, 0)])
def test_no_chunks_where_budget_is_zero_or_below_one_row(n, k, budget):
    """Budget 0 keeps the fused path; a budget below one row (8 float32 = 32 bytes at K = 7) too."""
    assert chunked.row_chunks(n, k, torch.float32, budget) is None


def test_row_chunks_cover_the_layer_once():
    chunks = chunked.row_chunks(10, 3, torch.float32, 3 * 16)
    assert list(chunks) == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert chunks.scratch_bytes == 3 * 16


def test_the_budget_is_set_globally_and_per_call():
    assert chunked.DEFAULT_SCRATCH_BUDGET <= 32 << 20
    assert chunked.get_scratch_budget() == chunked.DEFAULT_SCRATCH_BUDGET
    with chunked.scratch_budget(1000):
        assert chunked.get_scratch_budget() == 1000
        assert functional.perturbed_linear_scratch_bytes(torch.empty(50, 9)) == 25 * 40
        assert functional.perturbed_linear_scratch_bytes(torch.empty(50, 9), scratch_budget=80) == 80
    assert chunked.get_scratch_budget() == chunked.DEFAULT_SCRATCH_BUDGET
    assert functional.perturbed_linear_scratch_bytes(torch.empty(50, 9), scratch_budget=0) == 0
    previous = chunked.set_scratch_budget(0)
    try:
        assert functional.perturbed_linear_scratch_bytes(torch.empty(50, 9)) == 0
    finally:
        chunked.set_scratch_budget(previous)


@pytest.mark.parametrize(("budget", "error", "message"), [
    (-1, ValueError, "scratch_budget must be non-negative and below 2..63, got -1"),
    (1.5, TypeError, "scratch_budget must be an integer, got float 1.5"),
    (True, TypeError, "scratch_budget must be an integer, got bool"),
])
def test_a_bad_budget_is_rejected_with_its_name(budget, error, message):
    inputs = linear_inputs((2, 3, 4), torch.float32)
    with pytest.raises(error, match=message):
        functional.perturbed_linear(inputs.x, inputs.weight, seed=1, mu=0.1, scratch_budget=budget)
    with pytest.raises(error, match=message):
        chunked.set_scratch_budget(budget)
    assert chunked.get_scratch_budget() == chunked.DEFAULT_SCRATCH_BUDGET


def test_the_op_takes_the_budget_and_the_cpu_backend_keeps_its_tile_path():
    """On CPU tensors every backend ignores the budget (the CPU kernels have their own tile budget):
    the result does not depend on it."""
    inputs = linear_inputs((5, 40, 33), torch.float32)
    results = [functional.perturbed_linear(inputs.x, inputs.weight, inputs.bias, seed=SEED, mu=MU,
                                           x_pert=inputs.x_pert, scratch_budget=budget) for budget in (0, 200, None)]
    for result in results[1:]:
        for a, b in zip(results[0], result, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Low rank and LoRA: the frozen product by the BLAS, the factors generated small
# ---------------------------------------------------------------------------------------------

LOWRANK_SHAPES = [(17, 33, 97), (3, 130, 17), (1, 1, 1), (65, 17, 33)]


@pytest.mark.parametrize("backend", FAST_GENERATORS)
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
def test_chunked_lowrank_perturbed_linear(backend, shape, rank, dtype, bias, shared):
    rank = min(rank, *shape[1:])
    inputs = linear_inputs(shape, dtype, bias=bias, shared=shared)
    got = chunked.lowrank_perturbed_linear(**inputs.operands(), **lowrank_tests.keys(rank),
                                           generator=generator(backend))
    lowp = None
    if dtype != torch.float32:
        n, k = inputs.weight.shape
        u, v = reference.lowrank_factors(n, k, rank, seed=SEED, device="cpu", **LOWRANK_KEYS)
        lowp = torch_linear(inputs, reference.lowrank_direction(u, v),
                            reference.direction(SEED, BIAS_OFFSET, (n,), "cpu"), MU)
    want = lowrank_tests.reference_outputs(inputs, rank)
    # y_pert: the frozen product (or y_base) rounded, and x_pert V rounded before the rank-r GEMM
    assert_composed_close(got, want, lowp, dtype, (0, 2), largest(*want, frozen_product(inputs)))


@pytest.mark.parametrize("backend", FAST_GENERATORS)
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
def test_chunked_lora_perturbed_linear(backend, shape, rank, dtype, bias, shared):
    inputs = linear_inputs(shape, dtype, bias=bias, shared=shared, lora_rank=rank)
    got = chunked.lora_perturbed_linear(**inputs.operands(), **lora_tests.KEYS, generator=generator(backend))
    lowp = None if dtype == torch.float32 else lora_tests.torch_lora(inputs, lora_tests.KEYS)
    want = lora_tests.reference_outputs(inputs, lora_tests.KEYS)
    # each stream: the frozen product rounded, and x A^T rounded before the GEMM with B
    assert_composed_close(got, want, lowp, dtype, (2, 2), largest(*want, frozen_product(inputs)))


@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
def test_rank_above_the_cuda_fused_kernels_limit(shared):
    """rank 65 > the fused CUDA kernels' 64: the chunked route has no rank limit."""
    inputs = linear_inputs((9, 80, 70), torch.float32, shared=shared, lora_rank=65)
    got = chunked.lowrank_perturbed_linear(**{k: v for k, v in inputs.operands().items() if "lora" not in k},
                                           **lowrank_tests.keys(65), generator=generator("cpu"))
    assert_composed_close(got, lowrank_tests.reference_outputs(inputs, 65), None, torch.float32, (0, 0), 0.0)
    got = chunked.lora_perturbed_linear(**inputs.operands(), **lora_tests.KEYS, generator=generator("cpu"))
    assert_composed_close(got, lora_tests.reference_outputs(inputs, lora_tests.KEYS), None, torch.float32, (0, 0),
                          0.0)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
@pytest.mark.parametrize("dtype", MEASURED_DTYPES, ids=str)
def test_lowrank_and_lora_allocate_no_weight_sized_tensor(shared, dtype):
    """Beyond the two outputs, the factors and the rank-r products only: O((M + N + K) r) elements,
    far below one N x K weight."""
    m, n, k, rank = 8, 1024, 768, 4
    inputs = linear_inputs((m, n, k), dtype, shared=shared, lora_rank=rank)
    size = torch.empty((), dtype=dtype).element_size()
    small = 4 * (rank + 1) * (m + n + k) * 4 + 4 * n  # float32 bound on the factors, products and bias direction
    assert small < n * k * size / 8
    frozen = {k: v for k, v in inputs.operands().items() if "lora" not in k}
    (y_base, y_pert), peak = peak_memory(lambda: chunked.lowrank_perturbed_linear(
        **frozen, **lowrank_tests.keys(rank), generator=generator("cpu")))
    assert peak - y_base.nbytes - y_pert.nbytes <= small
    (y_base, y_pert), peak = peak_memory(lambda: chunked.lora_perturbed_linear(
        **inputs.operands(), **lora_tests.KEYS, generator=generator("cpu")))
    assert peak - y_base.nbytes - y_pert.nbytes <= small


# ---------------------------------------------------------------------------------------------
# On CUDA tensors: the GPU backends take the chunked route
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
def test_cuda_route_scratch_within_the_budget(backend, shared):
    """The op on CUDA tensors: correct, and its peak CUDA allocation less the outputs within the budget
    (a warm-up call first: cuBLAS keeps its workspace from the first GEMM on)."""
    from tests.helpers import skip_unavailable

    skip_unavailable("cuda", backend, "perturbed_linear")
    budget = 1 << 20
    inputs = linear_inputs((64, 1000, 1023), torch.bfloat16, "cuda", shared=shared)
    call = dict(x=inputs.x, weight=inputs.weight, bias=inputs.bias, x_pert=inputs.x_pert, seed=SEED,
                offset=WEIGHT_OFFSET, bias_offset=BIAS_OFFSET, mu=MU, scratch_budget=budget, backend=backend)
    functional.perturbed_linear(**call)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y_base, y_pert = functional.perturbed_linear(**call)
    torch.cuda.synchronize()
    scratch = torch.cuda.max_memory_allocated() - before - y_base.nbytes - y_pert.nbytes
    assert scratch <= budget
    assert scratch >= functional.perturbed_linear_scratch_bytes(inputs.weight, scratch_budget=budget)
    n, k = inputs.weight.shape
    lowp = torch_linear(inputs, reference.direction(SEED, WEIGHT_OFFSET, (n, k), "cpu"),
                        reference.direction(SEED, BIAS_OFFSET, (n,), "cpu"), MU)
    want = reference_outputs(inputs, **KEYS)
    assert_composed_close((y_base, y_pert), want, lowp, torch.bfloat16, (0, 1 if shared else 0), largest(*want))
