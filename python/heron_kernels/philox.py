"""The perturbation stream in Triton: element i is tl.randn(seed, offset + i).

Launchers take already-validated, contiguous output tensors (heron.kernels.stream validates). Offsets
are computed in int64 so counters above 2**32 use the high Philox counter word, exactly as
tl.randint4x does for 64-bit offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024


@triton.jit
def _randn_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    index = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = index < n
    values = tl.randn(seed, offset + index)
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
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    _randn_kernel[grid](out, n, seed, offset, BLOCK=BLOCK_SIZE)


def philox_words(out: torch.Tensor, *, seed: int, offset: int) -> None:
    """Fill contiguous int32 `out` of shape (n, 4) with the Philox4x32-10 words at offset + i."""
    n = out.shape[0]
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    _words_kernel[grid](out, n, seed, offset, BLOCK=BLOCK_SIZE)
