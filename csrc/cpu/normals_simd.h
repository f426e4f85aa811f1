// The CPU generator's arithmetic, written once for every instruction set: Philox4x32-10 words to
// the four normals of tl.randn4x (csrc/philox.h), as a template over a lane policy V.
//
// A policy (scalar in philox_cpu.cpp, AVX2 in normals_avx2.cpp, AVX-512 in normals_avx512.cpp)
// supplies the vector types F (float) and I (int32) with kLanes lanes, one group per lane, the
// lane operations below, `philox` (the words of kGroups consecutive groups as kGroups / kLanes
// vectors per word, in whatever lane order it likes: several independent dependency chains keep
// the multipliers busy) and `store` (one vector of each normal back in element order). Every
// operation is exactly rounded (add, sub, mul, fma, sqrt, round-to-nearest-even, int <-> float),
// so all policies give bit-identical results.
//
// Box-Muller, per pair (w_even, w_odd) -> (r cos t, r sin t):
//   u = max(1e-7, uniform(w_even)), r = sqrt(-2 * log(u)), t = 2 pi_f * uniform(w_odd) (float mul,
//   as the contract rounds it). log: u = m * 2^e with m in [3/4, 3/2), f = m - 1 exact,
//   ln(1 + f) = f - f^2/2 + f^3 P(f) (Cephes logf's form, P refitted for this range and evaluated
//   by Estrin's scheme for a shorter dependency chain), ln 2 split in two; about 1 ulp. cos/sin: j = round(t * 2/pi), x = t - j pi/2 (pi/2 in
//   two parts, fused), |x| <= pi/4, Cephes' sinf/cosf polynomials in x, then the quadrant j mod 4
//   swaps and negates them; about 1 ulp of 1.
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

// u = (1 + f) * 2^e for normal u > 0 with 1 + f in [3/4, 3/2) (f exact): the reduction of
// log_unit, on the bit pattern (what AVX-512's vgetmantps / vgetexpps compute in one step each).
template <class V>
inline void split_unit_bits(typename V::F u, typename V::F& f, typename V::F& e) {
  using I = typename V::I;
  const I bits = V::bits_of(u);
  const I m_bits = V::bit_or(V::bit_and(bits, V::iset(0x007FFFFF)), V::iset(0x3F800000));  // m in [1, 2)
  const auto high = V::gt(m_bits, V::iset(0x3FBFFFFF));                                     // m >= 3/2
  f = V::sub(V::float_of(V::sub_where(high, m_bits, V::iset(0x00800000))), V::set(1.0f));
  e = V::to_float(V::add_where(high, V::sub_i(V::srl(bits, 23), V::iset(127)), V::iset(1)));
}

// ln(u) for normal u in (0, 1): ln(1 + f) = f - f^2/2 + f^3 P(f) + e ln 2 with P of degree 8, a
// near-minimax fit of (ln(1 + f) - f + f^2/2) / f^3 for relative error on [-1/4, 1/2] (0.1 ulp
// before rounding), evaluated by Estrin's scheme; ln 2 split in two so e ln 2 adds exactly.
template <class V>
inline typename V::F log_unit(typename V::F u) {
  using F = typename V::F;
  F f, e;
  V::split_unit(u, f, e);
  const F z = V::mul(f, f);
  const F z2 = V::mul(z, z);
  const F p01 = V::fma(V::set(-2.5000163913e-1f), f, V::set(3.3333340287e-1f));
  const F p23 = V::fma(V::set(-1.6655296087e-1f), f, V::set(1.9999605417e-1f));
  const F p45 = V::fma(V::set(-1.2727789581e-1f), f, V::set(1.4276239276e-1f));
  const F p67 = V::fma(V::set(-9.1161251068e-2f), f, V::set(1.1700662225e-1f));
  const F p = V::fma(V::fma(V::set(3.7672176957e-2f), z2, V::fma(p67, z, p45)), z2, V::fma(p23, z, p01));
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
  const F x = V::fnma(j, V::set(kHalfPiLo), V::fnma(j, V::set(kHalfPiHi), t));
  const F z = V::mul(x, x);
  F sin_p = V::fma(V::set(-1.9515295891e-4f), z, V::set(8.3321608736e-3f));
  sin_p = V::fma(sin_p, z, V::set(-1.6666654611e-1f));
  const F sin_x = V::fma(sin_p, V::mul(x, z), x);
  F cos_p = V::fma(V::set(2.443315711809948e-5f), z, V::set(-1.388731625493765e-3f));
  cos_p = V::fma(cos_p, z, V::set(4.166664568298827e-2f));
  const F cos_x = V::fma(cos_p, V::mul(z, z), V::fma(z, V::set(-0.5f), V::set(1.0f)));
  // t = x + q pi/2: cos t = (cos x, -sin x, -cos x, sin x)[q], sin t = (sin x, cos x, -sin x, -cos x)[q],
  // so cos t takes bit 1 of q + 1 as its sign and sin t bit 1 of q (shifted to bit 31; q <= 4).
  const I q = V::to_int(j);
  const auto odd = V::odd(q);
  const I cos_sign = V::sll(V::add_i(q, V::iset(1)), 30);
  const I sin_sign = V::sll(q, 30);
  const I sign_bit = V::iset(INT32_MIN);
  const F cos_t = V::float_of(V::xor_and(V::bits_of(V::select(odd, sin_x, cos_x)), cos_sign, sign_bit));
  const F sin_t = V::float_of(V::xor_and(V::bits_of(V::select(odd, cos_x, sin_x)), sin_sign, sign_bit));
  n_cos = V::mul(r, cos_t);
  n_sin = V::mul(r, sin_t);
}

// out[4k + j] = normal j of group first_group + k for k below the largest multiple of V::kGroups
// that fits in `groups`; returns that count (the caller finishes the rest with a narrower policy).
// Per step: the Philox words of kGroups groups first (integer multiplies), then Box-Muller per
// vector (floating point), which keeps more independent work in flight than one vector at a time.
template <class V>
inline int64_t normals4(float* out, int64_t groups, uint64_t seed, uint64_t first_group) {
  constexpr int64_t kVectors = V::kGroups / V::kLanes;
  static_assert(kVectors * V::kLanes == V::kGroups, "kGroups must be whole vectors");
  int64_t k = 0;
  for (; k + V::kGroups <= groups; k += V::kGroups) {
    typename V::I words[kVectors][4];
    V::philox(seed, first_group + static_cast<uint64_t>(k), words);
    for (int64_t v = 0; v < kVectors; ++v) {
      typename V::F n0, n1, n2, n3;
      box_muller<V>(words[v][0], words[v][1], n0, n1);
      box_muller<V>(words[v][2], words[v][3], n2, n3);
      V::store(out + 4 * (k + v * V::kLanes), n0, n1, n2, n3);
    }
  }
  return k;
}

// normals4 for every one of `groups` groups: a last partial step is generated whole into a
// scratch buffer (the extra groups are just more of the stream) and the needed part copied.
template <class V>
inline void normals4_all(float* out, int64_t groups, uint64_t seed, uint64_t first_group) {
  const int64_t done = normals4<V>(out, groups, seed, first_group);
  if (done == groups) return;
  alignas(64) float scratch[4 * V::kGroups];
  normals4<V>(scratch, V::kGroups, seed, first_group + static_cast<uint64_t>(done));
  __builtin_memcpy(out + 4 * done, scratch, static_cast<size_t>(4 * (groups - done)) * sizeof(float));
}

}  // namespace simd

// The vector policies' entry points (x86-64 only; call them only where the CPU has the instruction
// set): simd::normals4_all with 32 groups (AVX-512F/DQ + FMA) or 16 groups (AVX2 + FMA) per step.
void normals4_avx512(float* out, int64_t groups, uint64_t seed, uint64_t first_group);
void normals4_avx2(float* out, int64_t groups, uint64_t seed, uint64_t first_group);

}  // namespace cpu
}  // namespace heron
