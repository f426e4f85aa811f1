"""The perturbation stream in Triton (stream version 2, csrc/philox.h): element c is word c % 4 of
tl.randn4x(seed, c // 4).

Kernels generate whole groups of four (`stream_range`, `stream_rows`) and mask what lies outside
their range; `stream_at` gives single elements at scattered counters (the group's Philox words, then
only the pair the element needs). Counters are int64, so groups above 2**32 use the high Philox
counter word, exactly as tl.randint4x does for 64-bit offsets. Launchers take already-validated,
contiguous output tensors (heron.kernels.stream validates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024  # elements (a multiple of 4: whole groups) per program


@triton.jit
def _joined4(n0, n1, n2, n3):
    """(..., L, 2, 2) from four (..., L) tensors with [..., k, i, j] = n_(2i + j)[..., k]: flattening the
    last three dimensions puts n_j of group k at 4k + j."""
    return tl.join(tl.join(n0, n2), tl.join(n1, n3))


@triton.jit
def stream_rows(seed, row_starts, ROWS: tl.constexpr, LENGTH: tl.constexpr):
    """float32 (ROWS, LENGTH): [i, t] = element row_starts[i] + t of the stream.

    row_starts: int64 (ROWS,), each a multiple of 4 (whole groups); LENGTH a multiple of 4.
    """
    groups = (row_starts // 4)[:, None] + tl.arange(0, LENGTH // 4).to(tl.int64)[None, :]
    n0, n1, n2, n3 = tl.randn4x(seed, groups)
    return tl.reshape(_joined4(n0, n1, n2, n3), (ROWS, LENGTH))


@triton.jit
def stream_range(seed, first_group, LENGTH: tl.constexpr):
    """float32 (LENGTH,): element 4 * first_group + t of the stream at [t]; LENGTH a multiple of 4."""
    groups = first_group + tl.arange(0, LENGTH // 4).to(tl.int64)
    n0, n1, n2, n3 = tl.randn4x(seed, groups)
    return tl.reshape(_joined4(n0, n1, n2, n3), (LENGTH,))


@triton.jit
def stream_at(seed, counters):
    """float32 like `counters` (int64, any shape): element c = word c % 4 of tl.randn4x(seed, c // 4)."""
    w0, w1, w2, w3 = tl.randint4x(seed, counters >> 2)
    second_pair = (counters & 2) != 0
    u_radius = tl.uint_to_uniform_float(tl.where(second_pair, w2, w0))
    u_angle = tl.uint_to_uniform_float(tl.where(second_pair, w3, w1))
    n_cos, n_sin = tl.pair_uniform_to_normal(u_radius, u_angle)
    return tl.where((counters & 1) != 0, n_sin, n_cos)


@triton.jit
def _randn_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    # Program p covers the BLOCK counters from 4 * (offset // 4) + p * BLOCK (whole groups); the
    # elements outside [offset, offset + n) are masked.
    first_group = offset // 4 + tl.program_id(0).to(tl.int64) * (BLOCK // 4)
    index = (4 * first_group - offset) + tl.arange(0, BLOCK)
    mask = (index >= 0) & (index < n)
    values = stream_range(seed, first_group, BLOCK)
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _words_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    index = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = index < n
    w0, w1, w2, w3 = tl.randint4x(seed, offset + index)
    row = out_ptr + 4 * index
    tl.store(row + 0, w0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(row + 1, w1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(row + 2, w2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(row + 3, w3.to(tl.int32, bitcast=True), mask=mask)


def philox_randn(out: torch.Tensor, *, seed: int, offset: int) -> None:
    """Fill contiguous `out` (any shape; float32/bfloat16/float16) with randn(seed, offset + i)."""
    n = out.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n + offset % 4, BLOCK_SIZE),)
    _randn_kernel[grid](out, n, seed, offset, BLOCK=BLOCK_SIZE)


def philox_words(out: torch.Tensor, *, seed: int, offset: int) -> None:
    """Fill contiguous int32 `out` of shape (n, 4) with the Philox4x32-10 words of groups offset + i."""
    n = out.shape[0]
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    _words_kernel[grid](out, n, seed, offset, BLOCK=BLOCK_SIZE)
