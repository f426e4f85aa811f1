"""Shared test helpers: the (device, backend) parameters, the one input builder and the one
tolerance rule of the kernel tests.

Shapes of linear layers are (M, N, K) everywhere: x (M, K), weight (N, K), outputs (M, N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from heron.kernels import backends
from heron.kernels.launchers import launcher_function

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Seeds and counters above 2**32, so both halves of the Philox key and counter words matter.
SEED = 2**40 + 123
U_SEED = 2**41 + 9
WEIGHT_OFFSET = 2**33 + 5
BIAS_OFFSET = 2**34 + 17
U_OFFSET = 2**35 + 3
V_OFFSET = 2**36 + 1
MU = 1e-2
LOWRANK_KEYS = {"u_seed": U_SEED, "u_offset": U_OFFSET, "v_offset": V_OFFSET}
UPDATE_SEEDS = [2**40 + 1, 7, 2**62 + 3]  # the directions of an update: q <= 3


def op_available(backend: str, device_type: str, op: str) -> bool:
    """Whether `backend` runs `op` on `device_type` tensors here (heron.kernels.launchers.LAUNCHERS)."""
    return backends.unavailable_reason(backend, device_type) is None and launcher_function(op, backend) is not None


CPU_BACKENDS = [b for b in ("cpu", "triton", "torch") if b in backends.available("cpu")]
GPU_BACKENDS = ["triton", "cuda", "torch"]
# (device type, backend) pairs: the CPU backends this machine has, every GPU backend marked gpu
DEVICE_BACKENDS = [pytest.param("cpu", b) for b in CPU_BACKENDS] + [
    pytest.param("cuda", b, marks=[pytest.mark.gpu]) for b in GPU_BACKENDS]


def skip_unavailable(device_type: str, backend: str, op: str | None = None) -> None:
    """Skip the calling test when `backend` (and its launcher of `op`) cannot run on `device_type` here."""
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = backends.unavailable_reason(backend, device_type)
    if reason:
        pytest.skip(reason)
    if op is not None and launcher_function(op, backend) is None:
        pytest.skip(f"backend {backend!r} has no launcher of {op}")


def cpu_backends(op: str) -> list[str]:
    return [b for b in ("cpu", "triton", "torch") if op_available(b, "cpu", op)]


def interpreted(device_type: str, backend: str) -> bool:
    """Triton kernels run through the interpreter (slow)."""
    return backend == "triton" and device_type == "cpu"


def small_cases(device_type: str, backend: str) -> bool:
    """Whether tests give (device, backend) their small cases only: the interpreter is slow, and the
    "torch" backend is the reference itself (its cases check the launcher's adapter, not arithmetic)."""
    return interpreted(device_type, backend) or backend == "torch"


def case_id(case) -> str:
    """17x97 for a shape, 17x97-4 for (shape, rank)."""
    if isinstance(case, tuple) and all(isinstance(c, int) for c in case):
        return "x".join(map(str, case))
    return "-".join(case_id(c) for c in case) if isinstance(case, tuple) else str(case)


def sized_cases(cases: list, small: list) -> list:
    """(device type, backend, case) parameters: every pair of DEVICE_BACKENDS with the cases of its size
    class, `small` for the interpreter and the reference (small_cases), `cases` for the others."""
    return [pytest.param(*pair.values, case, marks=pair.marks, id=f"{'-'.join(pair.values)}-{case_id(case)}")
            for pair in DEVICE_BACKENDS for case in (small if small_cases(*pair.values) else cases)]


def linear_cases(shapes: list[tuple[int, int, int]], small_shapes: list[tuple[int, int, int]],
                 ranks: list[int] | None = None):
    """Parametrize a linear op's main test over (device, backend, shape of its size class) x [rank] x dtype
    x bias x shared input."""
    marks = [pytest.mark.parametrize(("device_type", "backend", "shape"), sized_cases(shapes, small_shapes))]
    if ranks is not None:
        marks.append(pytest.mark.parametrize("rank", ranks))
    marks += [pytest.mark.parametrize("dtype", DTYPES, ids=str),
              pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"]),
              pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])]

    def decorate(test):
        for mark in reversed(marks):
            test = mark(test)
        return test

    return decorate


def run_op(op: str, device_type: str, backend: str, **arguments):
    """torch.ops.heron.<op> with `backend` pinned, after skipping where it cannot run."""
    skip_unavailable(device_type, backend, op)
    return getattr(torch.ops.heron, op)(**arguments, backend=backend)


# ---------------------------------------------------------------------------------------------
# The one input builder
# ---------------------------------------------------------------------------------------------

@dataclass
class LinearInputs:
    """A linear layer's operands in one dtype on one device: x, x_pert (M, K), weight (N, K) scaled like a
    trained layer, bias (N,) or None, and LoRA adapters lora_a (r, K), lora_b (N, r) when asked for."""

    x: torch.Tensor
    x_pert: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None

    def operands(self) -> dict[str, torch.Tensor | None]:
        """The op arguments x_base, x_pert, weight, bias (and lora_a, lora_b)."""
        tensors = {"x_base": self.x, "x_pert": self.x_pert, "weight": self.weight, "bias": self.bias}
        if self.lora_a is not None:
            tensors.update(lora_a=self.lora_a, lora_b=self.lora_b)
        return tensors

    def float32_cpu(self) -> LinearInputs:
        """float32 CPU copies: the reference runs there (CPU float32 matmuls never use TF32)."""
        return LinearInputs(*(None if t is None else t.float().cpu() for t in
                              (self.x, self.x_pert, self.weight, self.bias, self.lora_a, self.lora_b)))


def linear_inputs(shape: tuple[int, int, int], dtype: torch.dtype, device: str = "cpu", *, bias: bool = True,
                  shared: bool = False, lora_rank: int | None = None, seed: int = 0) -> LinearInputs:
    """Operands of an (M, N, K) layer; x_pert None when `shared`; LoRA adapters of rank lora_rank."""
    m, n, k = shape
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*size, generator=generator)).to(device=device, dtype=dtype)

    inputs = LinearInputs(randn(m, k), None if shared else randn(m, k), randn(n, k, scale=1 / math.sqrt(max(k, 1))),
                          randn(n, scale=0.5) if bias else None)
    if lora_rank is not None:
        inputs.lora_a = randn(lora_rank, k, scale=1 / math.sqrt(max(k, 1)))
        inputs.lora_b = randn(n, lora_rank, scale=1 / math.sqrt(lora_rank))
    return inputs


def param_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu", *, q: int = 1,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(param in dtype, seeds int64 (q,), grads float32 (q,)) for an update, on `device`."""
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    seeds = torch.tensor(UPDATE_SEEDS[:q], dtype=torch.int64, device=device)
    grads = torch.randn(q, generator=generator).to(device)
    return param, seeds, grads


# ---------------------------------------------------------------------------------------------
# The one tolerance rule
# ---------------------------------------------------------------------------------------------

FP32_RTOL = {"reduction": 1e-4, "elementwise": 1e-6}
FP32_ATOL = 1e-6
LOWP_RTOL = 1e-6


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor, lowp: torch.Tensor | None = None, *,
                              elementwise: bool = False, atol: float = FP32_ATOL, what: str = "") -> None:
    """The tolerance rule of every kernel test: `got`, a backend's result, against `want`, the float32
    reference of the same computation:

        |got - want| <= 2 |lowp - want| + rtol * s + atol

    lowp is the same computation done by PyTorch at got's dtype (for an elementwise result, the float32
    reference rounded to the dtype); in float32 that term is 0. s is the result's scale: max |want| for a
    reduction (a GEMM output element sums K rounded products, so only the scale bounds its error), and
    |want| element by element for an elementwise result (updates). rtol is the float32 arithmetic:
    1e-4 for a reduction (summation order), 1e-6 for an elementwise result and for low precision on top
    of PyTorch's own error (a few ulps and the backends' own log/cos in the direction); atol (1e-6)
    bounds the float32 error of results near 0 that come from operands near 1 (a cancellation).
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    dtype = got.dtype
    got, want = got.float().cpu(), want.float().cpu()

    def norm(t: torch.Tensor) -> torch.Tensor:  # elementwise: per element; a reduction: its max
        return t if elementwise else (t.max() if t.numel() else torch.zeros(()))

    error, scale = norm((got - want).abs()), norm(want.abs())
    if dtype == torch.float32:
        bound = FP32_RTOL["elementwise" if elementwise else "reduction"] * scale + atol
    else:
        assert lowp is not None, f"{what}: {dtype} needs PyTorch's own result at that dtype"
        bound = 2 * norm((lowp.float().cpu() - want).abs()) + LOWP_RTOL * scale + atol
    excess = (error - bound).flatten()
    if excess.numel() and excess.max() > 0:
        worst = int(excess.argmax())
        raise AssertionError(f"{what}: error {error.flatten()[worst].item():.3g} > bound "
                             f"{bound.flatten()[worst].item():.3g} at {dtype}" +
                             (f" (element {worst})" if elementwise else ""))


U32 = 2.0 ** -24  # float32 unit roundoff


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of any float32 computation of n roundings
    (a sum of n products in any order, with or without FMA; Higham, Accuracy and Stability, 3.1)."""
    return n * U32 / (1 - n * U32)


def rounding_tolerance(model: torch.nn.Module, losses: list[float], mu: float) -> float:
    """A bound on |g_heron - g_reference| from float32 rounding alone (both sides compute the same
    finite difference of the same function).

    Each loss is a float32 forward. To first order its rounding error is at most u times the sum,
    over the forward's inner products, of their lengths (gamma_n = n u for a dot product of n
    terms) times the magnitude of the values, which the normalised models here keep at order
    1 + |L|. An inner product per weight matrix, of length its fan-in (row size, p[0].numel()),
    plus the parameter's own rounding (theta + mu z, once more u): E = u (1 + sum fan-in) (1 + |L|).
    heron and the reference each carry that error on both losses, so the difference quotients
    differ by at most 4 E / mu.
    """
    fan_in = sum(p[0].numel() for p in model.parameters() if p.dim() >= 2)
    return 4 * U32 * (1 + fan_in) * (1 + max(abs(v) for v in losses)) / mu


def assert_outputs_close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...],
                         lowp: tuple[torch.Tensor, ...] | None, dtype: torch.dtype) -> None:
    """(y_base, y_pert) of a linear op against the float32 reference (a reduction), in `dtype`."""
    for name, out, ref, low in zip(("y_base", "y_pert"), got, want, lowp or (None, None), strict=True):
        assert out.dtype == dtype, name
        assert_close_to_reference(out, ref, low, what=name)


def reference_direction(updater, step: int = 0, j: int = 0) -> dict[str, torch.Tensor]:
    """Direction j of `updater`'s step `step` materialised, by parameter name: U V^T / sqrt(r) on
    the (out, -1) matrix of each low-rank weight (U keyed by the step's u_seed), the full
    Gaussian z elsewhere."""
    import math

    from heron.kernels import functional, reference

    seed = updater.direction_seeds(step)[j]
    direction = {}
    for entry in updater.layout:
        if entry.name not in updater.lowrank_names:
            direction[entry.name] = updater.layout.direction(entry.name, seed)
            continue
        rows, cols = entry.shape[0], math.prod(entry.shape[1:])
        rank = min(updater.rank, rows, cols)
        u_offset, v_offset = functional.lowrank_offsets(entry.offset, rows, rank)
        u, v = reference.lowrank_factors(rows, cols, rank, seed=seed, u_seed=updater.u_seed(step), u_offset=u_offset,
                                         v_offset=v_offset, device="cpu")
        direction[entry.name] = reference.lowrank_direction(u, v).reshape(entry.shape)
    return direction

