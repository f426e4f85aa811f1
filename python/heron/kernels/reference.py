"""Plain-PyTorch reference implementations: the truth every kernel is tested against.

Nothing here needs a compiler. Philox4x32-10 is done in int64 tensors holding 32-bit words, so it
runs on any device torch supports; it is slow and materialises everything, by design.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10
MIN_UNIFORM = 1.0e-7
TWO_PI = 6.283185307179586


def _mul_hi_lo(constant: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of constant * word (both < 2**32) without int64 overflow.

    The product can reach 2**64, so it is assembled from 16-bit halves of the constant.
    """
    c_hi, c_lo = constant >> 16, constant & 0xFFFF
    low_part = word * c_lo  # < 2**48
    high_part = word * c_hi  # < 2**48
    # product = high_part * 2**16 + low_part
    total_low = (low_part & MASK32) + ((high_part & 0xFFFF) << 16)
    lo = total_low & MASK32
    hi = ((low_part >> 32) + (high_part >> 16) + (total_low >> 32)) & MASK32
    return hi, lo


def philox_words(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 words for 64-bit counters.

    Args:
        seed: 0 <= seed < 2**63, the key (k0 = low 32 bits, k1 = high 32 bits).
        counters: int64 tensor of shape (n,), each in [0, 2**63).
    Returns:
        int64 tensor of shape (n, 4) holding the words w0..w3 as values in [0, 2**32).
    """
    c0 = counters & MASK32
    c1 = (counters >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """tl.random.uint_to_uniform_float: 32-bit words (int64 holding [0, 2**32)) -> float32 [0, 1)."""
    signed = torch.where(words >= 2**31, words - 2**32, words)
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative int32
    scale = torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=words.device)
    return signed.to(torch.float32) * scale


def _box_muller(u_radius: torch.Tensor, u_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tl.random.pair_uniform_to_normal: (r cos t, r sin t), r = sqrt(-2 log max(u, 1e-7)), t = 2 pi u'."""
    u = torch.clamp_min(u_radius, MIN_UNIFORM)
    theta = torch.tensor(TWO_PI, dtype=torch.float32, device=u_angle.device) * u_angle
    r = torch.sqrt(-2.0 * torch.log(u))
    return r * torch.cos(theta), r * torch.sin(theta)


def normals_from_words(words: torch.Tensor) -> torch.Tensor:
    """tl.randn4x on Philox words: (n, 4) words (int64 holding [0, 2**32)) -> (n, 4) float32 normals,
    (n0, n1) from the uniforms of (w0, w1) and (n2, n3) from (w2, w3)."""
    uniforms = uniform_from_words(words)
    n0, n1 = _box_muller(uniforms[:, 0], uniforms[:, 1])
    n2, n3 = _box_muller(uniforms[:, 2], uniforms[:, 3])
    return torch.stack([n0, n1, n2, n3], dim=-1)


def randn(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 tensor of shape (numel,) with element i = randn(seed, offset + i): word c % 4 of
    tl.randn4x(seed, c // 4) for c = offset + i. Whole groups are generated, then sliced."""
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    first_group, last_group = offset // 4, (offset + numel - 1) // 4
    groups = first_group + torch.arange(last_group - first_group + 1, dtype=torch.int64, device=device)
    normals = normals_from_words(philox_words(seed, groups)).flatten()
    start = offset - 4 * first_group
    return normals[start:start + numel]


# ---------------------------------------------------------------------------------------------
# Reference ops (materialise the direction; compute in float32; cast outputs to the input dtype)
# ---------------------------------------------------------------------------------------------

def direction(seed: int, offset: int, shape, device) -> torch.Tensor:
    """float32 tensor of `shape` whose flat element i is randn(seed, offset + i)."""
    numel = 1
    for dim in shape:
        numel *= dim
    return randn(seed, offset, numel, device).view(tuple(shape))


def lowrank_factors(
    out_features: int, in_features: int, rank: int, *, seed: int, u_seed: int, u_offset: int,
    v_offset: int, device, randn_fn=direction,
) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out x r) keyed by (u_seed, u_offset) and V (in x r) keyed by (seed, v_offset), float32.

    The low-rank direction of a (out x in) weight is Z = U @ V.T / sqrt(r).
    """
    u = randn_fn(u_seed, u_offset, (out_features, rank), device)
    v = randn_fn(seed, v_offset, (in_features, rank), device)
    return u, v


def lowrank_direction(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Z = U @ V.T / sqrt(r) for U (out x r), V (in x r); float32 (out x in)."""
    return (u @ v.T) / math.sqrt(u.shape[1])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight.T
    return y if bias is None else y + bias


def perturbed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, seed: int, offset: int,
    bias_offset: int, mu: float, x_pert: torch.Tensor | None = None, weight_direction=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_base = x @ W.T + b, y_pert = x_pert @ (W + mu Z).T + (b + mu z_b).

    Args:
        x: (..., in) base-stream input; x_pert: (..., in) perturbed-stream input (None: x).
        weight: (out, in); bias: (out,) or None.
        Z[o, i] = randn(seed, offset + o * in + i); z_b[o] = randn(seed, bias_offset + o).
        weight_direction: a precomputed float32 Z (out, in) to use instead (low-rank mode).
    Returns:
        (y_base, y_pert), each (..., out) in x's dtype; computed in float32.
    """
    device = x.device
    xf = x.float()
    xp = xf if x_pert is None else x_pert.float()
    w = weight.float()
    b = None if bias is None else bias.float()
    z = direction(seed, offset, weight.shape, device) if weight_direction is None else weight_direction
    y_base = _linear(xf, w, b)
    b_pert = None if b is None else b + mu * direction(seed, bias_offset, b.shape, device)
    y_pert = _linear(xp, w + mu * z, b_pert)
    return y_base.to(x.dtype), y_pert.to(x.dtype)


def lowrank_perturbed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, seed: int, u_seed: int,
    rank: int, u_offset: int, v_offset: int, bias_offset: int, mu: float,
    x_pert: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """perturbed_linear with the weight direction Z = U @ V.T / sqrt(rank) (see lowrank_factors);
    the bias (if any) still gets the full direction z_b[o] = randn(seed, bias_offset + o)."""
    u, v = lowrank_factors(weight.shape[0], weight.shape[1], rank, seed=seed, u_seed=u_seed,
                           u_offset=u_offset, v_offset=v_offset, device=x.device)
    return perturbed_linear(x, weight, bias, seed=seed, offset=0, bias_offset=bias_offset, mu=mu,
                            x_pert=x_pert, weight_direction=lowrank_direction(u, v))


def lora_perturbed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
    lora_b: torch.Tensor, *, scale: float, seed: int, a_offset: int, b_offset: int, mu: float,
    x_pert: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen W (out x in), b; adapters A (r x in), B (out x r); only A and B are perturbed.

    y_base = x @ W.T + b + scale * (x @ A.T) @ B.T
    y_pert = x_pert @ W.T + b + scale * (x_pert @ (A + mu Z_A).T) @ (B + mu Z_B).T
    with Z_A[j, i] = randn(seed, a_offset + j * in + i), Z_B[o, j] = randn(seed, b_offset + o * r + j).
    Returns (y_base, y_pert), (..., out) in x's dtype; computed in float32.
    """
    device = x.device
    xf = x.float()
    xp = xf if x_pert is None else x_pert.float()
    w, a, b_mat = weight.float(), lora_a.float(), lora_b.float()
    bias_f = None if bias is None else bias.float()
    a_pert = a + mu * direction(seed, a_offset, a.shape, device)
    b_pert = b_mat + mu * direction(seed, b_offset, b_mat.shape, device)
    y_base = _linear(xf, w, bias_f) + scale * (xf @ a.T) @ b_mat.T
    y_pert = _linear(xp, w, bias_f) + scale * (xp @ a_pert.T) @ b_pert.T
    return y_base.to(x.dtype), y_pert.to(x.dtype)


def combined_direction(
    shape, seeds, grads, *, offset: int, device, lowrank: dict | None = None, randn_fn=direction,
) -> torch.Tensor:
    """G = sum_j grads[j] * z_j, z_j the direction keyed by (seeds[j], offset), float32 `shape`.

    lowrank: None for full directions, or {"rank", "u_seed", "u_offset", "v_offset"} for
    z_j = U V_j.T / sqrt(rank) (U keyed by u_seed, V_j by seeds[j]); shape must be 2-D.
    """
    total = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    for seed, g in zip(seeds, grads, strict=True):
        if lowrank is None:
            z = randn_fn(int(seed), offset, tuple(shape), device)
        else:
            u, v = lowrank_factors(shape[0], shape[1], lowrank["rank"], seed=int(seed),
                                   u_seed=lowrank["u_seed"], u_offset=lowrank["u_offset"],
                                   v_offset=lowrank["v_offset"], device=device, randn_fn=randn_fn)
            z = lowrank_direction(u, v)
        total = total + float(g) * z
    return total


def zo_sgd_update(
    param: torch.Tensor, seeds, grads, *, offset: int, lr: float, weight_decay: float = 0.0,
    lowrank: dict | None = None, randn_fn=direction,
) -> torch.Tensor:
    """p - lr * (sum_j g_j z_j + weight_decay * p), returned (param's dtype; math in float32).

    grads are the projected-gradient scalars, already divided by q when averaging q directions.
    """
    p = param.float()
    g = combined_direction(param.shape, seeds, grads, offset=offset, device=param.device,
                           lowrank=lowrank, randn_fn=randn_fn)
    return (p - lr * (g + weight_decay * p)).to(param.dtype)


def zo_adam_update(
    param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, seeds, grads, *,
    offset: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    step: int, decoupled_weight_decay: bool, lowrank: dict | None = None, randn_fn=direction,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam (decoupled_weight_decay=False) or AdamW step with gradient sum_j g_j z_j.

    step is the 1-based step count after this update (for bias correction).
    Returns (param, exp_avg, exp_avg_sq); moments float32, param in its dtype.
    """
    p = param.float()
    grad = combined_direction(param.shape, seeds, grads, offset=offset, device=param.device,
                              lowrank=lowrank, randn_fn=randn_fn)
    if decoupled_weight_decay:
        p = p * (1.0 - lr * weight_decay)
    else:
        grad = grad + weight_decay * p
    m = beta1 * exp_avg + (1.0 - beta1) * grad
    v = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    p = p - (lr / bias1) * m / (torch.sqrt(v) / math.sqrt(bias2) + eps)
    return p.to(param.dtype), m, v


def perturb(param: torch.Tensor, seed: int, offset: int, alpha: float) -> torch.Tensor:
    """param + alpha * z, z keyed by (seed, offset); param's dtype, math in float32."""
    return (param.float() + alpha * direction(seed, offset, param.shape, param.device)).to(param.dtype)
