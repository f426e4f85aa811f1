"""Plain-PyTorch reference implementations: the truth every kernel is tested against.

Nothing here needs a compiler. Philox4x32-10 is done in int64 tensors holding 32-bit words, so it
runs on any device torch supports; it is slow and materialises everything, by design.
"""

from __future__ import annotations

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


def normal_from_words(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Box-Muller on the first two words, first output (tl.randn). float32."""
    u1 = torch.clamp_min(uniform_from_words(w0), MIN_UNIFORM)
    theta = torch.tensor(TWO_PI, dtype=torch.float32, device=w1.device) * uniform_from_words(w1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def randn(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 tensor of shape (numel,) with element i = randn(seed, offset + i)."""
    counters = offset + torch.arange(numel, dtype=torch.int64, device=device)
    words = philox_words(seed, counters)
    return normal_from_words(words[:, 0], words[:, 1])
