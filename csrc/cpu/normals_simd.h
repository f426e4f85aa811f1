// The CPU generator's arithmetic, written once for every instruction set: Philox4x32-10 words to
// the four normals of tl.randn4x (csrc/philox.h), as a template over a lane policy V.
//
// A policy (scalar in philox_cpu.cpp, AVX2 in normals_avx2.cpp, AVX-512 in normals_avx512.cpp)
// supplies the vector types F (float) and I (int32) with one lane per group, the lane operations
// below, `philox` (the words of kGroups consecutive groups, in whatever lane order it likes) and
// `store` (the normals back in element order). Every operation is exactly rounded (add, sub, mul,
// fma, sqrt, round-to-nearest-even, int <-> float), so all policies give bit-identical results.
//
// Box-Muller, per pair (w_even, w_odd) -> (r cos t, r sin t):
//   u = max(1e-7, uniform(w_even)), r = sqrt(-2 * log(u)), t = 2 pi_f * uniform(w_odd) (float mul,
//   as the contract rounds it). log: u = m * 2^e with m in [sqrt(1/2), sqrt(2)), f = m - 1 exact,
//   ln(1 + f) = f - f^2/2 + f^3 P(f) (Cephes logf), ln 2 split in two; about 1 ulp. cos/sin: j =
//   round(t * 2/pi), x = t - j pi/2 (pi/2 in two parts, fused), |x| <= pi/4, Cephes' sinf/cosf
//   polynomials in x, then the quadrant j mod 4 swaps and negates them; about 1 ulp of 1.
// Worst case against the correctly rounded r cos t: about 1e-6 (r <= 5.68).
//
// Instantiate only in a translation unit compiled for the policy's instruction set, and only with
// policies of internal linkage (so no instantiation is shared across instruction sets); such a
// translation unit must not call any other inline function with external linkage either.
#pragma once

#include <cstdint>

#include "philox.h"  // the contract's constants (its inline functions are not called here)

namespace heron {
namespace cpu {
namespace simd {

using philox::kKeyA;
using philox::kKeyB;
using philox::kMinUniform;
using philox::kRoundA;
using philox::kRoundB;
using philox::kRounds;
using philox::kTwoPi;
using philox::kUniformScale;
constexpr float kTwoOverPi = 0.636619772f;
constexpr float kHalfPiHi = 1.57079637f;       // float(pi / 2)
constexpr float kHalfPiLo = -4.37113883e-8f;   // pi / 2 - kHalfPiHi

// tl.random.uint_to_uniform_float: the word as int32, negatives bit-inverted (x ^ (x >> 31)).
template <class V>
inline typename V::F uniform(typename V::I word) {
  const typename V::I x = V::bit_xor(word, V::sra(word, 31));
  return V::mul(V::to_float(x), V::set(kUniformScale));
}

// ln(u) for normal u in (0, 1).
template <class V>
inline typename V::F log_unit(typename V::F u) {
  using F = typename V::F;
  using I = typename V::I;
  const I bits = V::bits_of(u);
  const I m_bits = V::bit_or(V::bit_and(bits, V::iset(0x007FFFFF)), V::iset(0x3F800000));  // m in [1, 2)
  const auto big = V::gt(m_bits, V::iset(0x3FB504F3));                                      // m > sqrt(2)
  const I e_int = V::add_where(big, V::sub_i(V::srl(bits, 23), V::iset(127)), V::iset(1));
  const F f = V::sub(V::float_of(V::sub_where(big, m_bits, V::iset(0x00800000))), V::set(1.0f));
  const F e = V::to_float(e_int);
  const F z = V::mul(f, f);
  F p = V::set(7.0376836292e-2f);
  p = V::fma(p, f, V::set(-1.1514610310e-1f));
  p = V::fma(p, f, V::set(1.1676998740e-1f));
  p = V::fma(p, f, V::set(-1.2420140846e-1f));
  p = V::fma(p, f, V::set(1.4249322787e-1f));
  p = V::fma(p, f, V::set(-1.6668057665e-1f));
  p = V::fma(p, f, V::set(2.0000714765e-1f));
  p = V::fma(p, f, V::set(-2.4999993993e-1f));
  p = V::fma(p, f, V::set(3.3333331174e-1f));
  F y = V::mul(V::mul(f, z), p);
  y = V::fma(e, V::set(-2.12194440e-4f), y);
  y = V::fma(z, V::set(-0.5f), y);
  return V::fma(e, V::set(0.693359375f), V::add(f, y));
}

// (r cos t, r sin t) for one pair of words.
template <class V>
inline void box_muller(typename V::I w_even, typename V::I w_odd, typename V::F& n_cos, typename V::F& n_sin) {
  using F = typename V::F;
  using I = typename V::I;
  const F u = V::max(uniform<V>(w_even), V::set(kMinUniform));
  const F r = V::sqrt(V::mul(log_unit<V>(u), V::set(-2.0f)));

  const F t = V::mul(uniform<V>(w_odd), V::set(kTwoPi));
  const F j = V::round(V::mul(t, V::set(kTwoOverPi)));
  const F minus_j = V::sub(V::set(0.0f), j);
  const F x = V::fma(minus_j, V::set(kHalfPiLo), V::fma(minus_j, V::set(kHalfPiHi), t));
  const F z = V::mul(x, x);
  F sin_p = V::fma(V::set(-1.9515295891e-4f), z, V::set(8.3321608736e-3f));
  sin_p = V::fma(sin_p, z, V::set(-1.6666654611e-1f));
  const F sin_x = V::fma(sin_p, V::mul(x, z), x);
  F cos_p = V::fma(V::set(2.443315711809948e-5f), z, V::set(-1.388731625493765e-3f));
  cos_p = V::fma(cos_p, z, V::set(4.166664568298827e-2f));
  const F cos_x = V::fma(cos_p, V::mul(z, z), V::fma(z, V::set(-0.5f), V::set(1.0f)));
  // t = x + q pi/2: cos t = (cos x, -sin x, -cos x, sin x)[q], sin t = (sin x, cos x, -sin x, -cos x)[q].
  const I q = V::to_int(j);
  const auto odd = V::gt(V::bit_and(q, V::iset(1)), V::iset(0));
  const I cos_sign = V::sll(V::bit_and(V::add_i(q, V::iset(1)), V::iset(2)), 30);
  const I sin_sign = V::sll(V::bit_and(q, V::iset(2)), 30);
  const F cos_t = V::float_of(V::bit_xor(V::bits_of(V::select(odd, sin_x, cos_x)), cos_sign));
  const F sin_t = V::float_of(V::bit_xor(V::bits_of(V::select(odd, cos_x, sin_x)), sin_sign));
  n_cos = V::mul(r, cos_t);
  n_sin = V::mul(r, sin_t);
}

// out[4k + j] = normal j of group first_group + k for k below the largest multiple of V::kGroups
// that fits in `groups`; returns that count (the caller finishes the rest with a narrower policy).
template <class V>
inline int64_t normals4(float* out, int64_t groups, uint64_t seed, uint64_t first_group) {
  int64_t k = 0;
  for (; k + V::kGroups <= groups; k += V::kGroups) {
    typename V::I w0, w1, w2, w3;
    V::philox(seed, first_group + static_cast<uint64_t>(k), w0, w1, w2, w3);
    typename V::F n0, n1, n2, n3;
    box_muller<V>(w0, w1, n0, n1);
    box_muller<V>(w2, w3, n2, n3);
    V::store(out + 4 * k, n0, n1, n2, n3);
  }
  return k;
}

}  // namespace simd

// The vector policies' entry points (x86-64 only; call them only where the CPU has the instruction
// set): simd::normals4 with 16 groups (AVX-512F/DQ + FMA) or 8 groups (AVX2 + FMA) per step.
int64_t normals4_avx512(float* out, int64_t groups, uint64_t seed, uint64_t first_group);
int64_t normals4_avx2(float* out, int64_t groups, uint64_t seed, uint64_t first_group);

}  // namespace cpu
}  // namespace heron
