"""The linear ops as generator kernels plus BLAS GEMMs: the GPU backends' route on CUDA tensors.

Regenerating the direction inside every output tile of a fused GEMM costs N*K*ceil(M/BM) normals, and
a normal costs far more instructions than a tensor core hides per operand element
(docs/kernels.md, "The GPU route"). Here each element of the direction is generated once per call, by
the backend's own generator launchers (philox_randn_, perturb_), and every product is a plain GEMM
(cuBLAS on CUDA tensors, the CPU BLAS on CPU tensors, which is how the tests run it):

- full rank, two inputs: for each chunk of output rows, W + mu Z into a scratch (W's dtype), then
  y_pert[:, chunk] = x_pert @ (W + mu Z)[chunk].T + (b + mu z_b)[chunk];
- full rank, shared input: Z into the scratch, y_pert[:, chunk] = y_base[:, chunk] + mu x @ Z[chunk].T
  + mu z_b[chunk] (in low precision y_base is rounded before the perturbation is added: one rounding
  more than a fused kernel, bounded in tests/kernels/test_chunked_linear.py);
- low rank and LoRA: the frozen product by the GEMM, the rank-r factors (U, V; A + mu Z_A, B + mu Z_B)
  generated small: O((N + K) r) elements, never an N x K tensor.

The full-rank scratch is bounded by a budget in bytes, independent of the layer's size: per call
(the ops' `scratch_budget`) or globally (set_scratch_budget, scratch_budget). A budget of 0, or one
below a single row, keeps the backend's fused kernel, which writes nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_SCRATCH_BUDGET = 32 << 20  # bytes
_BUDGET_LIMIT = 2**63
_scratch_budget = DEFAULT_SCRATCH_BUDGET


def check_budget(nbytes: object) -> int:
    """`nbytes` as a scratch budget (a Python int in [0, 2**63)), or a TypeError / ValueError naming
    scratch_budget. (Not stream.check_int: the launchers import this module, and stream imports them.)"""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"scratch_budget must be an integer, got {type(nbytes).__name__} {nbytes!r}")
    if not 0 <= nbytes < _BUDGET_LIMIT:
        raise ValueError(f"scratch_budget must be non-negative and below 2**63, got {nbytes}")
    return nbytes


def get_scratch_budget() -> int:
    """The global scratch budget in bytes: what a call without its own `scratch_budget` uses."""
    return _scratch_budget


def set_scratch_budget(nbytes: int) -> int:
    """Set the global scratch budget (bytes, 0 = the fused kernels); returns the previous one."""
    global _scratch_budget
    previous, _scratch_budget = _scratch_budget, check_budget(nbytes)
    return previous


@contextlib.contextmanager
def scratch_budget(nbytes: int) -> Iterator[None]:
    """The global scratch budget set to `nbytes` inside the block."""
    previous = set_scratch_budget(nbytes)
    try:
        yield
    finally:
        set_scratch_budget(previous)


@dataclass(frozen=True)
class RowChunks:
    """The output rows of an (N, K) layer cut into chunks of `rows` (the last may be shorter), and the
    scratch one chunk takes: rows * (K + 1) elements of the weight's dtype (K per weight row, one per
    bias element)."""

    rows: int
    n: int
    k: int
    element_size: int

    @property
    def scratch_bytes(self) -> int:
        return self.rows * (self.k + 1) * self.element_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(first row, rows) of each chunk."""
        for first in range(0, self.n, max(self.rows, 1)):
            yield first, min(self.rows, self.n - first)


def row_chunks(n: int, k: int, dtype: torch.dtype, budget: int) -> RowChunks | None:
    """The chunks of an (N, K) layer of `dtype` within `budget` bytes, or None for the fused path (budget 0,
    or below one row)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    rows = min(n, budget // ((k + 1) * element_size))
    if budget == 0 or (rows == 0 and n > 0):
        return None
    return RowChunks(rows, n, k, element_size)


@dataclass(frozen=True)
class Generator:
    """A backend's generator launchers (heron.kernels.launchers): randn_(*, out, seed, offset) fills
    contiguous `out` with the stream; perturb_(*, param, seed, offset, alpha) adds alpha * z in place."""

    randn_: Callable[..., None]
    perturb_: Callable[..., None]

    def perturbed(self, t: Tensor, *, seed: int, offset: int, mu: float, out: Tensor | None = None) -> Tensor:
        """t + mu * z (z keyed (seed, offset) over t's flat index) in t's dtype, into `out` (t's shape,
        contiguous) or a new tensor."""
        out = torch.empty_like(t, memory_format=torch.contiguous_format) if out is None else out
        out.copy_(t)
        if out.numel():
            self.perturb_(param=out, seed=seed, offset=offset, alpha=mu)
        return out

    def direction(self, shape: tuple[int, ...], like: Tensor, *, seed: int, offset: int,
                  out: Tensor | None = None) -> Tensor:
        """z keyed (seed, offset), `shape`, in like's dtype and device, into `out` or a new tensor."""
        out = like.new_empty(shape) if out is None else out
        if out.numel():
            self.randn_(out=out, seed=seed, offset=offset)
        return out


def perturbed_linear(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None, *, seed: int,
                     weight_offset: int, bias_offset: int, mu: float, chunks: RowChunks,
                     generator: Generator) -> tuple[Tensor, Tensor]:
    """The op perturbed_linear (heron.kernels.ops) through `chunks` of output rows.

    x_base (M, K), x_pert like it or None (shared), weight (N, K), bias (N,) or None, all contiguous, one
    dtype; returns (y_base, y_pert), (M, N) each. Takes chunks.scratch_bytes beyond the outputs.
    """
    k = weight.shape[1]
    y_base = torch.nn.functional.linear(x_base, weight, bias)
    y_pert = torch.empty_like(y_base)
    scratch = weight.new_empty(chunks.rows * (k + 1))
    for first, rows in chunks:
        block = scratch[:rows * k].view(rows, k)
        bias_block = scratch[chunks.rows * k:chunks.rows * k + rows]
        out = y_pert[:, first:first + rows]
        if x_pert is None:
            generator.direction((rows, k), weight, seed=seed, offset=weight_offset + first * k, out=block)
            if bias is None:
                torch.addmm(y_base[:, first:first + rows], x_base, block.T, alpha=mu, out=out)
                continue
            # mu (x Z^T + z_b) first, rounded at its own small scale, then y_base: two roundings at the
            # output's scale, as without bias (adding mu z_b after y_base would be a third)
            generator.direction((rows,), weight, seed=seed, offset=bias_offset + first, out=bias_block)
            torch.addmm(bias_block, x_base, block.T, beta=mu, alpha=mu, out=out)
            out.add_(y_base[:, first:first + rows])
            continue
        generator.perturbed(weight[first:first + rows], seed=seed, offset=weight_offset + first * k, mu=mu,
                            out=block)
        if bias is None:
            torch.mm(x_pert, block.T, out=out)
        else:
            generator.perturbed(bias[first:first + rows], seed=seed, offset=bias_offset + first, mu=mu,
                                out=bias_block)
            torch.addmm(bias_block, x_pert, block.T, out=out)
    return y_base, y_pert


def _low_rank_update(y_frozen: Tensor, left: Tensor, right: Tensor, *, alpha: float, bias_direction: Tensor | None,
                     mu: float) -> Tensor:
    """y_frozen + alpha * left @ right.T (+ mu * bias_direction on every row), in place, one GEMM: the bias
    direction rides along as one more rank (a column of ones in left, mu z_b in right).

    left (M, r), right (N, r), bias_direction (N,) or None."""
    if bias_direction is not None:
        left = torch.cat([left * alpha, torch.ones_like(left[:, :1])], dim=1)
        right = torch.cat([right, mu * bias_direction[:, None]], dim=1)
        alpha = 1.0
    return y_frozen.addmm_(left, right.T, alpha=alpha)


def lowrank_perturbed_linear(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None, *,
                             seed: int, bias_offset: int, mu: float, rank: int, u_seed: int, u_offset: int,
                             v_offset: int, generator: Generator) -> tuple[Tensor, Tensor]:
    """The op lowrank_perturbed_linear: y_pert = x_pert @ W.T + b + mu ((x_pert V) U.T / sqrt(rank) + z_b),
    the frozen product once with a shared input (y_pert starts as y_base). U (N, rank), V (K, rank) and
    z_b (N,) are generated in float32 and cast to x's dtype for the GEMMs."""
    n, k = weight.shape
    f32 = weight.new_empty(0, dtype=torch.float32)
    u = generator.direction((n, rank), f32, seed=u_seed, offset=u_offset).to(weight.dtype)
    v = generator.direction((k, rank), f32, seed=seed, offset=v_offset).to(weight.dtype)
    z_b = None if bias is None else generator.direction((n,), f32, seed=seed, offset=bias_offset).to(weight.dtype)
    y_base = torch.nn.functional.linear(x_base, weight, bias)
    x_rows = x_base if x_pert is None else x_pert
    y_pert = y_base.clone() if x_pert is None else torch.nn.functional.linear(x_pert, weight, bias)
    return y_base, _low_rank_update(y_pert, x_rows @ v, u, alpha=mu / math.sqrt(rank), bias_direction=z_b, mu=mu)


def lora_perturbed_linear(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None,
                          lora_a: Tensor, lora_b: Tensor, *, scale: float, seed: int, a_offset: int, b_offset: int,
                          mu: float, generator: Generator) -> tuple[Tensor, Tensor]:
    """The op lora_perturbed_linear: y = x @ W.T + b + scale (x @ A.T) @ B.T per stream, with A + mu Z_A and
    B + mu Z_B (generated in the adapters' dtype) in the perturbed one; the frozen product once with a
    shared input."""
    a_pert = generator.perturbed(lora_a, seed=seed, offset=a_offset, mu=mu)
    b_pert = generator.perturbed(lora_b, seed=seed, offset=b_offset, mu=mu)
    if x_pert is None:
        y_pert = torch.nn.functional.linear(x_base, weight, bias)
        y_base = torch.addmm(y_pert, x_base @ lora_a.T, lora_b.T, alpha=scale)
    else:
        y_base = torch.nn.functional.linear(x_base, weight, bias).addmm_(x_base @ lora_a.T, lora_b.T, alpha=scale)
        y_pert = torch.nn.functional.linear(x_pert, weight, bias)
    x_rows = x_base if x_pert is None else x_pert
    return y_base, y_pert.addmm_(x_rows @ a_pert.T, b_pert.T, alpha=scale)
