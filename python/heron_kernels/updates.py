"""Seeded in-place parameter updates in Triton: ZO-SGD, ZO-Adam(W) and perturb, one pass over the parameter.

The combined direction G = sum_j grads[j] * z_j is rebuilt from the (q,) seeds and grads tensors, which
the kernel reads itself (no host sync). Kernel family `_update_kernel` works on (BLOCK_R, BLOCK_C)
tiles of the parameter seen as an (n_rows, n_cols) row-major matrix:
  full mode:     (1, numel), z_j[i] = randn(seeds[j], offset + i); a tile is BLOCK_C counters of whole
                 groups of the stream (program p: from 4 * (offset // 4) + p * BLOCK_C), so the first
                 and last tiles mask the elements outside the parameter
  low-rank mode: (N, K), z_j = U @ V_j.T / sqrt(rank), U keyed (u_seed, u_offset), V_j (seeds[j], v_offset);
                 G = U @ (sum_j grads[j] V_j).T / sqrt(rank), the rank sum as outer products per tile.
Math is float32; parameters may be float32, bfloat16 or float16; Adam moments are float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from heron_kernels.linear import INTERPRETED, cast_rtne, interp_bf16
from heron_kernels.philox import stream_at, stream_range

FULL_BLOCK = 1024  # counters (whole groups) per program in full mode
LOWRANK_BLOCKS = (32, 64)  # (BLOCK_R, BLOCK_C) tiles in low-rank mode on GPU
INTERPRETER_LOWRANK_BLOCKS = (16, 32)


@triton.jit
def _full_direction(seeds_ptr, grads_ptr, q, first_group, BLOCK_C: tl.constexpr):
    """sum_j grads[j] * z_j over the BLOCK_C counters from 4 * first_group, float32 (1, BLOCK_C)."""
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j in range(q):
        total += tl.load(grads_ptr + j) * stream_range(tl.load(seeds_ptr + j), first_group, BLOCK_C)
    return total[None, :]


@triton.jit
def _lowrank_direction(seeds_ptr, grads_ptr, q, rows, cols, n_rows, n_cols, rank, u_seed, u_offset, v_offset,
                       sqrt_rank, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum_j grads[j] * (U @ V_j.T)[rows, cols] / sqrt(rank), float32 (len(rows), len(cols)).

    U[n, r] = randn(u_seed, u_offset + n*rank + r), V_j[k, r] = randn(seeds[j], v_offset + k*rank + r).
    The rank sum runs r = 0, 1, ... as outer products, so every element sees the same order whatever
    the tile (a tl.dot's accumulation order may depend on the tile shape).
    """
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r in range(rank):
        u_r = tl.where(row_mask, stream_at(u_seed, u_offset + rows * rank + r), 0.0)
        v_r = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for j in range(q):
            v_r += tl.load(grads_ptr + j) * stream_at(tl.load(seeds_ptr + j), v_offset + cols * rank + r)
        total += u_r[:, None] * tl.where(col_mask, v_r, 0.0)[None, :]
    return total / sqrt_rank


@triton.jit
def _update_kernel(
    param_ptr, exp_avg_ptr, exp_avg_sq_ptr, seeds_ptr, grads_ptr, q, n_rows, n_cols,
    seed, offset, alpha, lr, weight_decay, decay_factor,
    beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, sqrt_bias2, eps,
    rank, u_seed, u_offset, v_offset, sqrt_rank,
    OP: tl.constexpr, DECOUPLED: tl.constexpr, LOWRANK: tl.constexpr,
    INTERP_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Update one (BLOCK_R, BLOCK_C) tile of param (n_rows, n_cols) in place.

    OP "perturb": p += alpha * z, z keyed (seed, offset)
    OP "sgd":     p -= lr * (G + weight_decay * p)
    OP "adam":    Adam (DECOUPLED: AdamW, p *= decay_factor) on the float32 moments; step_size is
                  lr / (1 - beta1**step), sqrt_bias2 is sqrt(1 - beta2**step).
    """
    if LOWRANK:
        rows = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        index = rows[:, None] * n_cols + cols[None, :]
    else:  # BLOCK_R == 1: BLOCK_C counters of whole groups, elements outside the parameter masked
        first_group = offset // 4 + tl.program_id(0).to(tl.int64) * (BLOCK_C // 4)
        index = ((4 * first_group - offset) + tl.arange(0, BLOCK_C))[None, :]
        mask = (index >= 0) & (index < n_cols)
    p = tl.load(param_ptr + index, mask=mask, other=0.0).to(tl.float32)
    if OP == "perturb":
        p = p + alpha * stream_range(seed, first_group, BLOCK_C)[None, :]
    else:
        if LOWRANK:
            g = _lowrank_direction(seeds_ptr, grads_ptr, q, rows, cols, n_rows, n_cols, rank, u_seed, u_offset,
                                   v_offset, sqrt_rank, BLOCK_R, BLOCK_C)
        else:
            g = _full_direction(seeds_ptr, grads_ptr, q, first_group, BLOCK_C)
        if OP == "sgd":
            p = p - lr * (g + weight_decay * p)
        else:
            if DECOUPLED:
                p = p * decay_factor
            else:
                g = g + weight_decay * p
            m = beta1 * tl.load(exp_avg_ptr + index, mask=mask, other=0.0) + one_minus_beta1 * g
            v = beta2 * tl.load(exp_avg_sq_ptr + index, mask=mask, other=0.0) + one_minus_beta2 * g * g
            denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bias2) + eps
            p = p - tl.div_rn(step_size * m, denom)
            tl.store(exp_avg_ptr + index, m, mask=mask)
            tl.store(exp_avg_sq_ptr + index, v, mask=mask)
    tl.store(param_ptr + index, cast_rtne(p, param_ptr.dtype.element_ty, INTERP_BF16), mask=mask)


_NO_ADAM = {"beta1": 0.0, "beta2": 0.0, "one_minus_beta1": 0.0, "one_minus_beta2": 0.0, "step_size": 0.0,
            "sqrt_bias2": 1.0, "eps": 0.0, "decay_factor": 1.0}
_NO_LOWRANK = {"rank": 0, "u_seed": 0, "u_offset": 0, "v_offset": 0}


def _check_param(param: torch.Tensor, rank: int) -> None:
    if not param.is_contiguous():
        raise ValueError("param must be contiguous (it is updated in place)")
    if rank > 0 and param.dim() != 2:
        raise ValueError(f"low-rank updates need a 2-D parameter, got shape {tuple(param.shape)}")


def _check_rank(rank: int) -> None:
    if rank < 1:
        raise ValueError(f"rank must be >= 1 for a low-rank direction, got {rank}")


def _launch_update(param: torch.Tensor, exp_avg, exp_avg_sq, seeds, grads, *, op: str, decoupled: bool = False,
                   rank: int, u_seed: int, u_offset: int, v_offset: int, **scalars) -> None:
    """Launch `_update_kernel` over param's tiles; `scalars` are its remaining scalar arguments."""
    if param.numel() == 0:
        return
    if rank > 0:
        n_rows, n_cols = param.shape
        block_r, block_c = INTERPRETER_LOWRANK_BLOCKS if INTERPRETED else LOWRANK_BLOCKS
        lead = 0
    else:
        n_rows, n_cols = 1, param.numel()
        block_r, block_c = 1, FULL_BLOCK
        lead = scalars["offset"] % 4  # the first tile starts at the group of the first element
    grid = (triton.cdiv(n_cols + lead, block_c), triton.cdiv(n_rows, block_r))
    _update_kernel[grid](
        param, exp_avg, exp_avg_sq, seeds, grads, 0 if seeds is None else seeds.numel(), n_rows, n_cols,
        **scalars, rank=rank, u_seed=u_seed, u_offset=u_offset, v_offset=v_offset,
        sqrt_rank=math.sqrt(rank) if rank > 0 else 1.0,
        OP=op, DECOUPLED=decoupled, LOWRANK=rank > 0,
        INTERP_BF16=interp_bf16(param), BLOCK_R=block_r, BLOCK_C=block_c,
    )


def zo_sgd_update_(
    param: torch.Tensor, seeds: torch.Tensor, grads: torch.Tensor, *, offset: int, lr: float, weight_decay: float,
) -> None:
    """param -= lr * (G + weight_decay * param) in place; G = sum_j grads[j] z_j, z_j[i] = randn(seeds[j], offset + i).

    param: any shape, float32/bfloat16/float16, contiguous. seeds: int64 (q,), grads: float32 (q,), on param's
    device.
    """
    _check_param(param, 0)
    _launch_update(param, None, None, seeds, grads, op="sgd", **_NO_LOWRANK, seed=0, offset=offset, alpha=0.0,
                   lr=float(lr), weight_decay=float(weight_decay), **_NO_ADAM)


def lowrank_zo_sgd_update_(
    param: torch.Tensor, seeds: torch.Tensor, grads: torch.Tensor, *, lr: float, weight_decay: float, rank: int,
    u_seed: int, u_offset: int, v_offset: int,
) -> None:
    """zo_sgd_update_ of a 2-D param (N, K) with z_j = U @ V_j.T / sqrt(rank): U keyed (u_seed, u_offset),
    V_j keyed (seeds[j], v_offset)."""
    _check_rank(rank)
    _check_param(param, rank)
    _launch_update(param, None, None, seeds, grads, op="sgd", rank=rank, u_seed=u_seed, u_offset=u_offset,
                   v_offset=v_offset, seed=0, offset=0, alpha=0.0, lr=float(lr), weight_decay=float(weight_decay),
                   **_NO_ADAM)


def zo_adam_update_(
    param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, seeds: torch.Tensor,
    grads: torch.Tensor, *, offset: int, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, step: int, decoupled_weight_decay: bool,
) -> None:
    """One Adam / AdamW step in place on param and its float32 moments exp_avg, exp_avg_sq (param's shape).

    Gradient G = sum_j grads[j] z_j as in zo_sgd_update_; step is 1-based (bias correction).
    """
    _adam(param, exp_avg, exp_avg_sq, seeds, grads, offset=offset, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
          weight_decay=weight_decay, step=step, decoupled_weight_decay=decoupled_weight_decay, **_NO_LOWRANK)


def lowrank_zo_adam_update_(
    param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, seeds: torch.Tensor,
    grads: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
    decoupled_weight_decay: bool, rank: int, u_seed: int, u_offset: int, v_offset: int,
) -> None:
    """zo_adam_update_ of a 2-D param with low-rank directions as in lowrank_zo_sgd_update_."""
    _check_rank(rank)
    _adam(param, exp_avg, exp_avg_sq, seeds, grads, offset=0, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
          weight_decay=weight_decay, step=step, decoupled_weight_decay=decoupled_weight_decay, rank=rank,
          u_seed=u_seed, u_offset=u_offset, v_offset=v_offset)


def _adam(param, exp_avg, exp_avg_sq, seeds, grads, *, offset, lr, beta1, beta2, eps, weight_decay, step,
          decoupled_weight_decay, rank, u_seed, u_offset, v_offset) -> None:
    """`_update_kernel` with OP "adam", full (rank 0) or low-rank directions."""
    _check_param(param, rank)
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("exp_avg and exp_avg_sq must be contiguous")
    _launch_update(
        param, exp_avg, exp_avg_sq, seeds, grads, op="adam", decoupled=bool(decoupled_weight_decay), rank=rank,
        u_seed=u_seed, u_offset=u_offset, v_offset=v_offset, seed=0, offset=offset, alpha=0.0, lr=float(lr),
        weight_decay=float(weight_decay), decay_factor=1.0 - lr * weight_decay, beta1=float(beta1),
        beta2=float(beta2), one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
        step_size=lr / (1.0 - beta1**step), sqrt_bias2=math.sqrt(1.0 - beta2**step), eps=float(eps),
    )


def perturb_(param: torch.Tensor, *, seed: int, offset: int, alpha: float) -> None:
    """param += alpha * z in place, z[i] = randn(seed, offset + i) over param's flat index (any shape)."""
    _check_param(param, 0)
    _launch_update(param, None, None, None, None, op="perturb", **_NO_LOWRANK,
                   seed=seed, offset=offset, alpha=float(alpha), lr=0.0, weight_decay=0.0, **_NO_ADAM)
