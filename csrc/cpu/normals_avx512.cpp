// The AVX-512 lane policy of the CPU generator (normals_simd.h): 16 groups per vector, 32 groups
// (128 normals) per step.
// This whole file is compiled for AVX-512F/DQ + FMA and is only called after a run-time CPU check;
// everything in it but the one exported function has internal linkage, so no code for this
// instruction set can be shared with (and reached from) the rest of the library.
#if defined(__x86_64__)
// No FMA contraction: only the fused operations the algorithm names, as the other policies do.
#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx512f,avx512dq,avx2,fma")
// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstdint>

#include "cpu/normals_simd.h"

namespace heron {
namespace cpu {
namespace {

using namespace simd;  // the contract constants

struct Avx512 {
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static constexpr int64_t kLanes = 16;
  static constexpr int64_t kGroups = 32;

  static F set(float v) { return _mm512_set1_ps(v); }
  static I iset(int32_t v) { return _mm512_set1_epi32(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static I to_int(F a) { return _mm512_cvttps_epi32(a); }
  static I bits_of(F a) { return _mm512_castps_si512(a); }
  static F float_of(I a) { return _mm512_castsi512_ps(a); }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I bit_and(I a, I b) { return _mm512_and_si512(a, b); }
  static I bit_or(I a, I b) { return _mm512_or_si512(a, b); }
  static I bit_xor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I sra(I a, int n) { return _mm512_srai_epi32(a, static_cast<unsigned>(n)); }
  static I srl(I a, int n) { return _mm512_srli_epi32(a, static_cast<unsigned>(n)); }
  static I sll(I a, int n) { return _mm512_slli_epi32(a, static_cast<unsigned>(n)); }
  static F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  // split_unit_bits in two instructions: m = getmant(u) in [3/4, 3/2), e = getexp(u) = floor(log2 u),
  // plus one where m < 1 (u's mantissa was halved).
  static void split_unit(F u, F& f, F& e) {
    const F m = _mm512_getmant_ps(u, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
    const F exponent = _mm512_getexp_ps(u);
    e = _mm512_mask_add_ps(exponent, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ), exponent,
                           _mm512_set1_ps(1.0f));
    f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  }
  static M odd(I a) { return _mm512_test_epi32_mask(a, _mm512_set1_epi32(1)); }
  static I xor_and(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x78); }  // a ^ (b & c)

  // Philox4x32-10 on one 32-bit word per 64-bit lane: vpmuludq multiplies the low halves into full
  // 64-bit products, so hi = product >> 32 and lo = the product itself (its upper half is never
  // read: the next multiply reads low halves only, and xor keeps low halves independent of upper
  // ones). No lane shuffles. Four registers of 8 groups (four independent dependency chains),
  // packed to two vectors of 32-bit lanes at the end. Lane i of vector v holds group
  // base + 16 v + 4 (i % 4) + i / 4, the order `store` undoes.
  static void philox(uint64_t seed, uint64_t base, I (&words)[2][4]) {
    const __m512i lanes_lo = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13);
    const __m512i lanes_hi = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i round_a = _mm512_set1_epi64(kRoundA);
    const __m512i round_b = _mm512_set1_epi64(kRoundB);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    // Round 1 with c2 = c3 = 0: c0 = c1 ^ k0, c1 = 0, c2 = hi(A c0) ^ k1, c3 = lo(A c0).
    __m512i c0[4], c1[4], c2[4], c3[4];
    for (int s = 0; s < 4; ++s) {
      const __m512i start = _mm512_set1_epi64(static_cast<int64_t>(base + 16 * static_cast<uint64_t>(s / 2)));
      const __m512i counter = _mm512_add_epi64(start, s % 2 == 0 ? lanes_lo : lanes_hi);
      const __m512i product_a = _mm512_mul_epu32(counter, round_a);
      c0[s] = _mm512_xor_si512(_mm512_srli_epi64(counter, 32), _mm512_set1_epi64(k0));
      c1[s] = _mm512_setzero_si512();
      c2[s] = _mm512_xor_si512(_mm512_srli_epi64(product_a, 32), _mm512_set1_epi64(k1));
      c3[s] = product_a;
    }
    k0 += kKeyA;
    k1 += kKeyB;
    for (int round = 1; round < kRounds; ++round) {
      const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
      for (int s = 0; s < 4; ++s) {
        const __m512i product_b = _mm512_mul_epu32(c2[s], round_b), product_a = _mm512_mul_epu32(c0[s], round_a);
        // 0x96: three-way xor.
        c0[s] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(product_b, 32), c1[s], key0, 0x96);
        c2[s] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(product_a, 32), c3[s], key1, 0x96);
        c1[s] = product_b;
        c3[s] = product_a;
      }
      k0 += kKeyA;
      k1 += kKeyB;
    }
    for (int v = 0; v < 2; ++v) {
      words[v][0] = pack(c0[2 * v], c0[2 * v + 1]);
      words[v][1] = pack(c1[2 * v], c1[2 * v + 1]);
      words[v][2] = pack(c2[2 * v], c2[2 * v + 1]);
      words[v][3] = pack(c3[2 * v], c3[2 * v + 1]);
    }
  }

  // The low halves of two registers of 8 64-bit lanes as one register of 16 32-bit lanes (a's
  // first), in one two-source permute.
  static I pack(__m512i a, __m512i b) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_permutex2var_epi32(a, even, b);
  }

  // out[4g + j] = n_j of group g: in 128-bit lane l, position m holds group 4m + l; the two unpack
  // stages gather lane position m's four normals into 128-bit lane l of register m.
  static void store(float* out, F n0, F n1, F n2, F n3) {
    const __m512 t0 = _mm512_unpacklo_ps(n0, n1), t1 = _mm512_unpackhi_ps(n0, n1);
    const __m512 t2 = _mm512_unpacklo_ps(n2, n3), t3 = _mm512_unpackhi_ps(n2, n3);
    const __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
    const __m512d d2 = _mm512_castps_pd(t2), d3 = _mm512_castps_pd(t3);
    _mm512_storeu_ps(out, _mm512_castpd_ps(_mm512_unpacklo_pd(d0, d2)));
    _mm512_storeu_ps(out + 16, _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d2)));
    _mm512_storeu_ps(out + 32, _mm512_castpd_ps(_mm512_unpacklo_pd(d1, d3)));
    _mm512_storeu_ps(out + 48, _mm512_castpd_ps(_mm512_unpackhi_pd(d1, d3)));
  }
};

}  // namespace

void normals4_avx512(float* out, int64_t groups, uint64_t seed, uint64_t first_group) {
  simd::normals4_all<Avx512>(out, groups, seed, first_group);
}

}  // namespace cpu
}  // namespace heron

#endif  // __x86_64__
