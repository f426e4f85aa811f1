// heron's one perturbation contract, usable from host and device code.
//
// Element i of a direction keyed by (seed, offset) is
//     randn(seed, offset + i)
// exactly as Triton's tl.randn defines it:
//   * the 64-bit counter c = offset + i is split into c0 = lo32(c), c1 = hi32(c), c2 = c3 = 0;
//   * the 64-bit seed is split into the key k0 = lo32(seed), k1 = hi32(seed);
//   * Philox4x32-10 maps (c0, c1, c2, c3; k0, k1) to four 32-bit words w0..w3;
//   * w0 and w1 become uniforms: the word is read as int32, negative values are bit-inverted,
//     and the result is multiplied by 4.6566127342e-10f (so the uniform lies in [0, 1));
//   * Box-Muller: u1 = max(1e-7, u1); n = sqrt(-2 log u1) * cos(2 pi u2).
// Nothing depends on tile, block or thread indices, so every backend produces the same stream.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define HERON_HD __host__ __device__ __forceinline__
#else
#define HERON_HD inline
#endif

namespace heron {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;
// Triton's uint32 -> [0, 1) scale: the largest float with INT32_MAX * scale < 1.
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

struct Words {
  uint32_t w0, w1, w2, w3;
};

HERON_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with kRounds rounds; the same update order as triton.language.random.philox_impl.
HERON_HD Words philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                          uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mulhi(kRoundB, prev_c2) ^ c1 ^ k0;
    c2 = mulhi(kRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kRoundB * prev_c2;
    c3 = kRoundA * prev_c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Words{c0, c1, c2, c3};
}

// The four words for 64-bit counter `counter` under 64-bit `seed` (tl.randint4x semantics).
HERON_HD Words words_at(uint64_t seed, uint64_t counter) {
  return philox4x32(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// tl.random.uint_to_uniform_float for 32-bit words.
HERON_HD float uniform_from_word(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// tl.random.pair_uniform_to_normal, first output only (what tl.randn returns).
HERON_HD float normal_from_words(uint32_t w0, uint32_t w1) {
  float u1 = uniform_from_word(w0);
  const float u2 = uniform_from_word(w1);
  u1 = u1 > kMinUniform ? u1 : kMinUniform;
  const float theta = kTwoPi * u2;
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * logf(u1)) * cosf(theta);
#else
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(theta);
#endif
}

// randn(seed, counter): element `counter` of the stream keyed by `seed`.
HERON_HD float randn_at(uint64_t seed, uint64_t counter) {
  const Words w = words_at(seed, counter);
  return normal_from_words(w.w0, w.w1);
}

}  // namespace philox
}  // namespace heron
