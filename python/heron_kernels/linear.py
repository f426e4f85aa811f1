"""Fused perturbed linear layers in Triton: one GEMM gives the base and the perturbed output.

The direction is never materialised. Inside the K loop every program regenerates the Z (or V)
elements of its own tile from their global indices, so the values depend only on
(seed, offset, index), never on the tile configuration (see docs/kernels.md, "The direction").
When every weight row starts on a group of the stream (K and weight_offset multiples of 4: ALIGNED)
a Z tile is whole groups, one tl.randn4x call per four elements; otherwise, and for the small U, V,
Z_A, Z_B and z_b tiles, each element takes its group's words and the pair it needs (stream_at).

Kernel family `_linear_kernel`, constexpr flags:
  SHARED   x_pert is None: x is loaded once and y_pert = y_base + mu * x @ Z.T (+ mu * z_b).
  HAS_BIAS bias given.
  LOWRANK  Z = U @ V.T / sqrt(rank): the K loop accumulates x_pert @ V (rank padded to R_PAD),
           the epilogue multiplies by the U tile.
  LORA     W and b frozen; the epilogue adds the rank-r adapter terms from `_lora_down_kernel`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from heron_kernels.philox import stream_at, stream_rows

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# One small fixed tile config under the interpreter (read at call time, so tests can change it).
INTERPRETER_BLOCKS = (32, 32, 32)  # BLOCK_M, BLOCK_N, BLOCK_K
# The rank-r projection kernel of LoRA: (BLOCK_M, BLOCK_K) on GPU / under the interpreter.
LORA_DOWN_BLOCKS = (64, 64)
INTERPRETER_LORA_DOWN_BLOCKS = (32, 32)
MIN_DOT = 16  # tl.dot needs every block dimension >= 16

_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
]


@triton.jit
def _load_tile(ptr, rows, cols, row_stride, col_stride, n_rows, n_cols):
    """(len(rows), len(cols)) tile with [i, j] = ptr[rows[i] * row_stride + cols[j] * col_stride]; 0 outside."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=mask, other=0.0)


@triton.jit
def _randn_tile(seed, offset, rows, cols, row_stride, col_stride, n_rows, n_cols):
    """float32 tile with [i, j] = randn(seed, offset + rows[i] * row_stride + cols[j] * col_stride); 0 outside.

    rows/cols are int64, so the counter is computed in 64 bits.
    """
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    z = stream_at(seed, offset + rows[:, None] * row_stride + cols[None, :] * col_stride)
    return tl.where(mask, z, 0.0)


@triton.jit
def _weight_direction_t(seed, weight_offset, k0, offs_k, offs_n, K, N, ALIGNED: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """float32 (BLOCK_K, BLOCK_N) tile of Z.T: [i, j] = randn(seed, weight_offset + offs_n[j]*K + offs_k[i]),
    offs_k = k0 + arange(BLOCK_K); 0 outside (K, N).

    ALIGNED (K and weight_offset multiples of 4): each row's slice is BLOCK_K / 4 whole groups.
    """
    if ALIGNED:
        mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        z = stream_rows(seed, weight_offset + offs_n * K + k0, BLOCK_N, BLOCK_K)  # (BN, BK)
        out = tl.where(mask, tl.trans(z), 0.0)
    else:
        out = _randn_tile(seed, weight_offset, offs_k, offs_n, 1, K, K, N)
    return out


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """acc + a @ b, float32 accumulation. INTERP_BF16 (interpreter only; its tl.dot mishandles bfloat16):
    multiply as float32, which is exact for bfloat16 operands, as on a GPU's bf16 tensor cores."""
    if INTERP_BF16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """float32 x rounded to nearest-even in `dtype`.

    INTERP_BF16 (interpreter only): its float32 -> bfloat16 cast truncates, so round the bits first;
    the truncation is then exact. Finite x only.
    """
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _store_tile(ptr, value, rows, cols, n_rows, n_cols, INTERP_BF16: tl.constexpr):
    """Store a (len(rows), len(cols)) float32 tile into row-major (n_rows, n_cols) `ptr`, cast to its dtype."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    value = cast_rtne(value, ptr.dtype.element_ty, INTERP_BF16)
    tl.store(ptr + rows[:, None] * n_cols + cols[None, :], value, mask=mask)


@triton.jit
def _lowrank_epilogue(acc_xv, u_seed, u_offset, rank, offs_n, N, scale, R_PAD: tl.constexpr,
                      PRECISION: tl.constexpr):
    """scale * (x @ V) @ U.T, (BM, BN), from the (BM, R_PAD) accumulator x @ V.

    U[n, j] = randn(u_seed, u_offset + n*rank + j) for the tile's rows n = offs_n.
    """
    r_idx = tl.arange(0, R_PAD).to(tl.int64)
    u_t = _randn_tile(u_seed, u_offset, r_idx, offs_n, 1, rank, rank, N)  # (R_PAD, BN): U.T
    return scale * tl.dot(acc_xv, u_t, input_precision=PRECISION)


@triton.jit
def _lora_epilogue(xa_ptr, b_ptr, seed, b_offset, mu, rank, offs_m, offs_n, M, N, R_PAD: tl.constexpr,
                   PERTURB: tl.constexpr, PRECISION: tl.constexpr):
    """xa @ B.T (PERTURB: xa @ (B + mu Z_B).T) for float32 xa (M, rank), B (N, rank); a (BM, BN) tile.

    Z_B[n, j] = randn(seed, b_offset + n*rank + j).
    """
    r_idx = tl.arange(0, R_PAD).to(tl.int64)
    xa = _load_tile(xa_ptr, offs_m, r_idx, rank, 1, M, rank)  # (BM, R_PAD)
    b_t = _load_tile(b_ptr, r_idx, offs_n, 1, rank, rank, N).to(tl.float32)  # (R_PAD, BN): B.T
    if PERTURB:
        b_t = b_t + mu * _randn_tile(seed, b_offset, r_idx, offs_n, 1, rank, rank, N)
    return tl.dot(xa, b_t, input_precision=PRECISION)


@triton.jit
def _linear_kernel(
    xb_ptr, xp_ptr, w_ptr, bias_ptr, yb_ptr, yp_ptr,
    M, N, K,
    seed, weight_offset, bias_offset, mu,
    rank, u_seed, u_offset, v_offset, inv_sqrt_rank,
    xa_ptr, xa_pert_ptr, lora_b_ptr, lora_b_offset, lora_scale,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, LOWRANK: tl.constexpr, LORA: tl.constexpr,
    ALIGNED: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y_base and y_pert (both (M, N)) for x (M, K), W (N, K).

    Full mode (not LOWRANK, not LORA): Z[n, k] = randn(seed, weight_offset + n*K + k); ALIGNED: K and
    weight_offset are multiples of 4 (see _weight_direction_t).
    """
    dtype = xb_ptr.dtype.element_ty
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_idx = tl.arange(0, R_PAD).to(tl.int64)
    acc_base = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Full+SHARED: x @ Z.T; full two-input: x_pert @ (W + mu Z).T; otherwise x_pert @ W.T (two-input).
    acc_pert = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_xv = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = _load_tile(xb_ptr, offs_m, offs_k, K, 1, M, K)  # (BM, BK)
        w_t = _load_tile(w_ptr, offs_k, offs_n, 1, K, K, N)  # (BK, BN): W.T
        acc_base = _dot(x, w_t, acc_base, PRECISION, INTERP_BF16)
        if SHARED:
            xp = x
        else:
            xp = _load_tile(xp_ptr, offs_m, offs_k, K, 1, M, K)
        if LOWRANK:
            v = _randn_tile(seed, v_offset, offs_k, r_idx, rank, 1, K, rank)  # (BK, R_PAD)
            acc_xv = _dot(xp, cast_rtne(v, dtype, INTERP_BF16), acc_xv, PRECISION, INTERP_BF16)
        if LOWRANK or LORA:
            if not SHARED:
                acc_pert = _dot(xp, w_t, acc_pert, PRECISION, INTERP_BF16)
        else:
            z_t = _weight_direction_t(seed, weight_offset, k0, offs_k, offs_n, K, N, ALIGNED, BLOCK_K,
                                      BLOCK_N)  # (BK, BN): Z.T
            if SHARED:
                acc_pert = _dot(x, cast_rtne(z_t, dtype, INTERP_BF16), acc_pert, PRECISION, INTERP_BF16)
            else:
                w_pert = cast_rtne(w_t.to(tl.float32) + mu * z_t, dtype, INTERP_BF16)
                acc_pert = _dot(xp, w_pert, acc_pert, PRECISION, INTERP_BF16)

    if SHARED:
        if LOWRANK or LORA:
            acc_pert = acc_base
        else:
            acc_pert = acc_base + mu * acc_pert
    if LOWRANK:
        acc_pert += _lowrank_epilogue(acc_xv, u_seed, u_offset, rank, offs_n, N, mu * inv_sqrt_rank, R_PAD,
                                      PRECISION)
    if LORA:
        acc_base += lora_scale * _lora_epilogue(xa_ptr, lora_b_ptr, seed, lora_b_offset, mu, rank, offs_m,
                                                offs_n, M, N, R_PAD, False, PRECISION)
        acc_pert += lora_scale * _lora_epilogue(xa_pert_ptr, lora_b_ptr, seed, lora_b_offset, mu, rank, offs_m,
                                                offs_n, M, N, R_PAD, True, PRECISION)
    if HAS_BIAS:
        n_mask = offs_n < N
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc_base += b[None, :]
        if LORA:
            acc_pert += b[None, :]
        else:
            z_b = tl.where(n_mask, stream_at(seed, bias_offset + offs_n), 0.0)
            acc_pert += (b + mu * z_b)[None, :]
    _store_tile(yb_ptr, acc_base, offs_m, offs_n, M, N, INTERP_BF16)
    _store_tile(yp_ptr, acc_pert, offs_m, offs_n, M, N, INTERP_BF16)


@triton.jit
def _lora_down_kernel(
    xb_ptr, xp_ptr, a_ptr, xa_ptr, xa_pert_ptr, M, K, rank, seed, a_offset, mu,
    SHARED: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 xa = x_base @ A.T and xa_pert = x_pert @ (A + mu Z_A).T, both (M, rank), for A (rank, K).

    Z_A[j, k] = randn(seed, a_offset + j*K + k); one (BLOCK_M, R_PAD) tile per program.
    """
    dtype = xb_ptr.dtype.element_ty
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_idx = tl.arange(0, R_PAD).to(tl.int64)
    acc_a = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc_pert = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)  # SHARED: x @ Z_A.T
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = _load_tile(xb_ptr, offs_m, offs_k, K, 1, M, K)  # (BM, BK)
        a_t = _load_tile(a_ptr, offs_k, r_idx, 1, K, K, rank)  # (BK, R_PAD): A.T
        z_t = _randn_tile(seed, a_offset, offs_k, r_idx, 1, K, K, rank)
        acc_a = _dot(x, a_t, acc_a, PRECISION, INTERP_BF16)
        if SHARED:
            acc_pert = _dot(x, cast_rtne(z_t, dtype, INTERP_BF16), acc_pert, PRECISION, INTERP_BF16)
        else:
            xp = _load_tile(xp_ptr, offs_m, offs_k, K, 1, M, K)
            a_pert = cast_rtne(a_t.to(tl.float32) + mu * z_t, dtype, INTERP_BF16)
            acc_pert = _dot(xp, a_pert, acc_pert, PRECISION, INTERP_BF16)
    if SHARED:
        acc_pert = acc_a + mu * acc_pert
    _store_tile(xa_ptr, acc_a, offs_m, r_idx, M, rank, False)
    _store_tile(xa_pert_ptr, acc_pert, offs_m, r_idx, M, rank, False)


_linear_autotuned = triton.autotune(
    configs=_GPU_CONFIGS,
    key=["M", "N", "K", "SHARED", "HAS_BIAS", "LOWRANK", "LORA", "ALIGNED", "R_PAD", "PRECISION"],
)(_linear_kernel)


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot input_precision for float32 operands: "tf32" only when torch allows TF32 matmuls."""
    if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def interp_bf16(x: torch.Tensor) -> bool:
    """bfloat16 under the interpreter, whose bfloat16 tl.dot and float32 -> bfloat16 cast need help."""
    return INTERPRETED and x.dtype == torch.bfloat16


def _rank_pad(rank: int) -> int:
    """Power of two >= max(rank, 16): the padded rank dimension of the tl.dot blocks."""
    return max(MIN_DOT, triton.next_power_of_2(max(rank, 1)))


def _launch_linear(x_base, x_pert, weight, bias, y_base, y_pert, **scalars) -> None:
    """Launch `_linear_kernel` on (M, N) tiles; `scalars` are its remaining arguments and flags."""
    M, K = x_base.shape
    N = weight.shape[0]
    args = (x_base, x_pert, weight, bias, y_base, y_pert, M, N, K)
    flags = {"SHARED": x_pert is None, "HAS_BIAS": bias is not None, "PRECISION": dot_precision(x_base),
             "INTERP_BF16": interp_bf16(x_base), "ALIGNED": K % 4 == 0 and scalars["weight_offset"] % 4 == 0}
    if INTERPRETED:
        block_m, block_n, block_k = INTERPRETER_BLOCKS
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _linear_kernel[grid](*args, **scalars, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    else:
        def grid(meta):
            return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])

        _linear_autotuned[grid](*args, **scalars, **flags)


def _empty_outputs(x_base: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (x_base.shape[0], weight.shape[0])
    return (torch.empty(shape, dtype=x_base.dtype, device=x_base.device),
            torch.empty(shape, dtype=x_base.dtype, device=x_base.device))


def perturbed_linear(
    x_base: torch.Tensor, x_pert: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, *,
    seed: int, weight_offset: int, bias_offset: int, mu: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_base, y_pert), each (M, N) in x's dtype, for x_base (M, K), x_pert (M, K) or None, W (N, K), b (N,).

    y_base = x_base @ W.T + b;  y_pert = x_pert @ (W + mu Z).T + b + mu z_b  (x_pert None: x_base).
    Z[n, k] = randn(seed, weight_offset + n*K + k), z_b[n] = randn(seed, bias_offset + n).
    """
    return _perturbed_linear(x_base, x_pert, weight, bias, seed=seed, weight_offset=weight_offset,
                             bias_offset=bias_offset, mu=mu, rank=0, u_seed=0, u_offset=0, v_offset=0)


def lowrank_perturbed_linear(
    x_base: torch.Tensor, x_pert: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, *,
    seed: int, bias_offset: int, mu: float, rank: int, u_seed: int, u_offset: int, v_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """perturbed_linear with Z = U @ V.T / sqrt(rank), rank >= 1: U[n, j] = randn(u_seed, u_offset + n*rank + j),
    V[k, j] = randn(seed, v_offset + k*rank + j); z_b[n] = randn(seed, bias_offset + n)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1 for a low-rank direction, got {rank}")
    return _perturbed_linear(x_base, x_pert, weight, bias, seed=seed, weight_offset=0, bias_offset=bias_offset,
                             mu=mu, rank=rank, u_seed=u_seed, u_offset=u_offset, v_offset=v_offset)


def _perturbed_linear(x_base, x_pert, weight, bias, *, seed, weight_offset, bias_offset, mu, rank, u_seed, u_offset,
                      v_offset) -> tuple[torch.Tensor, torch.Tensor]:
    """`_linear_kernel` in full (rank 0) or low-rank mode."""
    y_base, y_pert = _empty_outputs(x_base, weight)
    if y_base.numel() == 0:
        return y_base, y_pert
    _launch_linear(
        x_base, x_pert, weight, bias, y_base, y_pert,
        seed=seed, weight_offset=weight_offset, bias_offset=bias_offset, mu=float(mu),
        rank=rank, u_seed=u_seed, u_offset=u_offset, v_offset=v_offset,
        inv_sqrt_rank=1.0 / math.sqrt(rank) if rank > 0 else 0.0,
        xa_ptr=None, xa_pert_ptr=None, lora_b_ptr=None, lora_b_offset=0, lora_scale=0.0,
        LOWRANK=rank > 0, LORA=False, R_PAD=_rank_pad(rank),
    )
    return y_base, y_pert


def _lora_down(x_base, x_pert, lora_a, *, seed, a_offset, mu) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (x_base @ A.T, x_pert @ (A + mu Z_A).T), each (M, rank), for A (rank, K)."""
    M, K = x_base.shape
    rank = lora_a.shape[0]
    xa = torch.empty((M, rank), dtype=torch.float32, device=x_base.device)
    xa_pert = torch.empty_like(xa)
    block_m, block_k = INTERPRETER_LORA_DOWN_BLOCKS if INTERPRETED else LORA_DOWN_BLOCKS
    _lora_down_kernel[(triton.cdiv(M, block_m),)](
        x_base, x_pert, lora_a, xa, xa_pert, M, K, rank, seed, a_offset, float(mu),
        SHARED=x_pert is None, R_PAD=_rank_pad(rank), PRECISION=dot_precision(x_base),
        INTERP_BF16=interp_bf16(x_base), BLOCK_M=block_m, BLOCK_K=block_k,
    )
    return xa, xa_pert


def lora_perturbed_linear(
    x_base: torch.Tensor, x_pert: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, *, scale: float, seed: int, a_offset: int, b_offset: int,
    mu: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_base, y_pert), each (M, N) in x's dtype, for x (M, K), frozen W (N, K) and b (N,), A (r, K), B (N, r).

    y_base = x_base @ W.T + b + scale * (x_base @ A.T) @ B.T
    y_pert = x_pert @ W.T + b + scale * (x_pert @ (A + mu Z_A).T) @ (B + mu Z_B).T   (x_pert None: x_base)
    Z_A[j, k] = randn(seed, a_offset + j*K + k), Z_B[n, j] = randn(seed, b_offset + n*r + j).
    """
    y_base, y_pert = _empty_outputs(x_base, weight)
    if y_base.numel() == 0:
        return y_base, y_pert
    rank = lora_a.shape[0]
    xa, xa_pert = _lora_down(x_base, x_pert, lora_a, seed=seed, a_offset=a_offset, mu=mu)
    _launch_linear(
        x_base, x_pert, weight, bias, y_base, y_pert,
        seed=seed, weight_offset=0, bias_offset=0, mu=float(mu),
        rank=rank, u_seed=0, u_offset=0, v_offset=0, inv_sqrt_rank=0.0,
        xa_ptr=xa, xa_pert_ptr=xa_pert, lora_b_ptr=lora_b, lora_b_offset=b_offset, lora_scale=float(scale),
        LOWRANK=False, LORA=True, R_PAD=_rank_pad(rank),
    )
    return y_base, y_pert
