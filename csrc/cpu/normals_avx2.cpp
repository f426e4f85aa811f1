// The AVX2 + FMA lane policy of the CPU generator (normals_simd.h): 8 groups per vector, 16 groups
// (64 normals) per step.
// This whole file is compiled for AVX2 + FMA and is only called after a run-time CPU check;
// everything in it but the one exported function has internal linkage.
#if defined(__x86_64__)
// No FMA contraction: only the fused operations the algorithm names, as the other policies do.
#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx2,fma")

#include <immintrin.h>

#include <cstdint>

#include "cpu/normals_simd.h"

namespace heron {
namespace cpu {
namespace {

using namespace simd;  // the contract constants

struct Avx2 {
  using F = __m256;
  using I = __m256i;
  using M = __m256i;  // all-ones lanes where true
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t kGroups = 16;

  static F set(float v) { return _mm256_set1_ps(v); }
  static I iset(int32_t v) { return _mm256_set1_epi32(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static I to_int(F a) { return _mm256_cvttps_epi32(a); }
  static I bits_of(F a) { return _mm256_castps_si256(a); }
  static F float_of(I a) { return _mm256_castsi256_ps(a); }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub_i(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I bit_and(I a, I b) { return _mm256_and_si256(a, b); }
  static I bit_or(I a, I b) { return _mm256_or_si256(a, b); }
  static I bit_xor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I sra(I a, int n) { return _mm256_srai_epi32(a, n); }
  static I srl(I a, int n) { return _mm256_srli_epi32(a, n); }
  static I sll(I a, int n) { return _mm256_slli_epi32(a, n); }
  static M gt(I a, I b) { return _mm256_cmpgt_epi32(a, b); }
  static I add_where(M m, I a, I b) { return _mm256_add_epi32(a, _mm256_and_si256(b, m)); }
  static I sub_where(M m, I a, I b) { return _mm256_sub_epi32(a, _mm256_and_si256(b, m)); }
  static F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
  static void split_unit(F u, F& f, F& e) { simd::split_unit_bits<Avx2>(u, f, e); }
  static M odd(I a) { return _mm256_cmpeq_epi32(_mm256_and_si256(a, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)); }
  static I xor_and(I a, I b, I c) { return _mm256_xor_si256(a, _mm256_and_si256(b, c)); }

  // hi and lo 32-bit halves of a * k per 32-bit lane (k broadcast): even and odd lanes multiplied
  // separately (vpmuludq) and recombined with blends.
  static void mulhilo(I a, I k, I& hi, I& lo) {
    const I even = _mm256_mul_epu32(a, k);                        // lanes 0, 2, 4, 6 as 64-bit
    const I odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), k);  // lanes 1, 3, 5, 7
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }

  // Philox4x32-10 words of 16 groups as two independent vectors of 8; lane i of vector v holds group
  // base + 8 v + 2 (i % 4) + i / 4 (undone by `store`).
  static void philox(uint64_t seed, uint64_t base, I (&words)[2][4]) {
    const I lanes = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const I sign = _mm256_set1_epi32(INT32_MIN);
    const I round_a = _mm256_set1_epi32(static_cast<int32_t>(kRoundA));
    const I round_b = _mm256_set1_epi32(static_cast<int32_t>(kRoundB));
    I c0[2], c1[2], c2[2], c3[2];
    for (int v = 0; v < 2; ++v) {
      const uint64_t start = base + 8 * static_cast<uint64_t>(v);
      const I start_lo = _mm256_set1_epi32(static_cast<int32_t>(start));
      c0[v] = _mm256_add_epi32(start_lo, lanes);
      // Carry into the high word where the low word wrapped (unsigned c0 < start_lo).
      const I carry = _mm256_cmpgt_epi32(_mm256_xor_si256(start_lo, sign), _mm256_xor_si256(c0[v], sign));
      c1[v] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int32_t>(start >> 32)), carry);
      c2[v] = _mm256_setzero_si256();
      c3[v] = _mm256_setzero_si256();
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kRounds; ++round) {
      const I key0 = _mm256_set1_epi32(static_cast<int32_t>(k0)), key1 = _mm256_set1_epi32(static_cast<int32_t>(k1));
      for (int v = 0; v < 2; ++v) {
        I hi_b, lo_b, hi_a, lo_a;
        mulhilo(c2[v], round_b, hi_b, lo_b);
        mulhilo(c0[v], round_a, hi_a, lo_a);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[v]), key0);
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[v]), key1);
        c1[v] = lo_b;
        c3[v] = lo_a;
      }
      k0 += kKeyA;
      k1 += kKeyB;
    }
    for (int v = 0; v < 2; ++v) {
      words[v][0] = c0[v];
      words[v][1] = c1[v];
      words[v][2] = c2[v];
      words[v][3] = c3[v];
    }
  }

  // out[4g + j] = n_j of group g (see Avx512::store; here 128-bit lane l, position m holds group 2m + l).
  static void store(float* out, F n0, F n1, F n2, F n3) {
    const __m256 t0 = _mm256_unpacklo_ps(n0, n1), t1 = _mm256_unpackhi_ps(n0, n1);
    const __m256 t2 = _mm256_unpacklo_ps(n2, n3), t3 = _mm256_unpackhi_ps(n2, n3);
    const __m256d d0 = _mm256_castps_pd(t0), d1 = _mm256_castps_pd(t1);
    const __m256d d2 = _mm256_castps_pd(t2), d3 = _mm256_castps_pd(t3);
    _mm256_storeu_ps(out, _mm256_castpd_ps(_mm256_unpacklo_pd(d0, d2)));
    _mm256_storeu_ps(out + 8, _mm256_castpd_ps(_mm256_unpackhi_pd(d0, d2)));
    _mm256_storeu_ps(out + 16, _mm256_castpd_ps(_mm256_unpacklo_pd(d1, d3)));
    _mm256_storeu_ps(out + 24, _mm256_castpd_ps(_mm256_unpackhi_pd(d1, d3)));
  }
};

}  // namespace

void normals4_avx2(float* out, int64_t groups, uint64_t seed, uint64_t first_group) {
  simd::normals4_all<Avx2>(out, groups, seed, first_group);
}

}  // namespace cpu
}  // namespace heron

#endif  // __x86_64__
