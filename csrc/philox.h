// heron's one perturbation contract (stream version 2), usable from host and device code.
//
// Element c = offset + i of a direction keyed by (seed, offset) is word c % 4 of
//     randn4x(seed, c / 4)
// exactly as Triton's tl.randn4x defines it:
//   * the 64-bit group counter g = c / 4 is split into c0 = lo32(g), c1 = hi32(g), c2 = c3 = 0;
//   * the 64-bit seed is split into the key k0 = lo32(seed), k1 = hi32(seed);
//   * Philox4x32-10 maps (c0, c1, c2, c3; k0, k1) to four 32-bit words w0..w3;
//   * each word becomes a uniform: read as int32, negative values bit-inverted, the result
//     converted to float and multiplied by 4.6566127342e-10f (so the uniform lies in [0, 1));
//   * Box-Muller on (u0, u1) and on (u2, u3): with u = max(1e-7, u_even), r = sqrt(-2 log u),
//     t = 2 pi u_odd, the pair's normals are (r cos t, r sin t).
// So (n0, n1) come from (u0, u1) and (n2, n3) from (u2, u3): one Philox call gives four normals.
// Nothing depends on tile, block or thread indices, so every backend produces the same stream;
// kernels generate whole groups and use the elements their range needs. The Philox words are
// bit-identical everywhere; the normals agree within 1e-5 (each backend's own log/sin/cos).
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

// The four normals of one Philox call (tl.randn4x): n[j] is element 4g + j of the stream.
struct Normals {
  float n0, n1, n2, n3;
};

// sqrt(-2 log max(u, 1e-7)) for the even word of a pair. Device code keeps the accurate logf:
// near u = 1 the radius is small and an absolute log error e moves it by e / r.
HERON_HD float box_muller_radius(uint32_t word) {
  float u = uniform_from_word(word);
  u = u > kMinUniform ? u : kMinUniform;
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * logf(u));
#else
  return std::sqrt(-2.0f * std::log(u));
#endif
}

// (cos t, sin t) for t = 2 pi u of the odd word of a pair. Device code uses the fast __sincosf on
// t reduced to [-pi, pi) (its documented range: absolute error below 2^-21.41, so below 2.2e-6
// once scaled by the radius, at most 5.68); the reduction is exact (Sterbenz).
HERON_HD void box_muller_angle(uint32_t word, float& cos_t, float& sin_t) {
  const float t = kTwoPi * uniform_from_word(word);
#if defined(__CUDA_ARCH__)
  __sincosf(t >= 3.14159274f ? t - kTwoPi : t, &sin_t, &cos_t);
#else
  cos_t = std::cos(t);
  sin_t = std::sin(t);
#endif
}

// tl.randn4x: the four normals of group `group` under `seed`.
HERON_HD Normals randn4x(uint64_t seed, uint64_t group) {
  const Words w = words_at(seed, group);
  const float r01 = box_muller_radius(w.w0), r23 = box_muller_radius(w.w2);
  float c01, s01, c23, s23;
  box_muller_angle(w.w1, c01, s01);
  box_muller_angle(w.w3, c23, s23);
  return Normals{r01 * c01, r01 * s01, r23 * c23, r23 * s23};
}

// Element `counter` of the stream keyed by `seed`: word counter % 4 of randn4x(seed, counter / 4),
// computing only that word's pair and the cosine or sine it needs. For code that needs single
// elements at scattered counters; contiguous ranges should use randn4x on whole groups.
HERON_HD float randn_at(uint64_t seed, uint64_t counter) {
  const Words w = words_at(seed, counter >> 2);
  const bool second_pair = (counter & 2u) != 0;
  const float r = box_muller_radius(second_pair ? w.w2 : w.w0);
  float cos_t, sin_t;
  box_muller_angle(second_pair ? w.w3 : w.w1, cos_t, sin_t);
  return r * ((counter & 1u) != 0 ? sin_t : cos_t);
}

}  // namespace philox
}  // namespace heron
