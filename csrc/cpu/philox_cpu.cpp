#include "cpu/philox_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "philox.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// No FMA contraction (AVX-512F has FMA on zmm, the AVX2 target does not): the clones must round
// identically so the stream does not depend on the machine's instruction set.
#pragma GCC optimize("fp-contract=off")

namespace heron {
namespace cpu {
namespace {

// Work below this many elements runs on one thread (thread start-up costs more).
constexpr int64_t kParallelGrain = 1 << 15;

// Whether `n` elements are worth a parallel region: enough work, and not already inside one (the
// linear kernels generate tiles from their own per-block tasks).
bool parallel_worth(int64_t n) {
#ifdef _OPENMP
  return n >= kParallelGrain && !omp_in_parallel();
#else
  (void)n;
  return false;
#endif
}

// ln(x) for a normal float x in (0, 1) (Cephes logf: x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// ln(m) = f - f^2/2 + f^3 P(f) with f = m - 1 exact, ln 2 split in two so e*ln2 adds exactly).
// Max error about 1 ulp. Plain arithmetic and integer selects, so `omp simd` loops vectorise it.
inline float log_unit(float x) {
  const uint32_t bits = float_bits(x);
  const uint32_t mantissa_bits = (bits & 0x007FFFFFu) | 0x3F000000u;  // m in [0.5, 1)
  const int32_t low = mantissa_bits < 0x3F3504F3u ? 1 : 0;            // m < sqrt(1/2): use 2m
  const int32_t exponent = static_cast<int32_t>(bits >> 23) - 126 - low;
  const float f = bits_float(mantissa_bits + (static_cast<uint32_t>(low) << 23)) - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float e = static_cast<float>(exponent);
  float y = p * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * e;
}

// cos(x) for x in [0, 8) (Cephes cosf: j = floor(x*4/pi) rounded up to even, three-part
// Cody-Waite reduction r = x - j*pi/4, |r| <= pi/4, then the sin or cos minimax polynomial).
// Max error about 1 ulp on this range; branch-free for vectorisation.
inline float cos_small(float x) {
  const int32_t octant = (static_cast<int32_t>(x * 1.27323954473516f) + 1) & ~1;  // even, 0..8
  const float j = static_cast<float>(octant);
  const float r = ((x - j * 0.78515625f) - j * 2.4187564849853515625e-4f) - j * 3.77489497744594108e-8f;
  const float z = r * r;
  float cos_r = 2.443315711809948e-5f;
  cos_r = cos_r * z - 1.388731625493765e-3f;
  cos_r = cos_r * z + 4.166664568298827e-2f;
  cos_r = cos_r * z * z - 0.5f * z + 1.0f;
  float sin_r = -1.9515295891e-4f;
  sin_r = sin_r * z + 8.3321608736e-3f;
  sin_r = sin_r * z - 1.6666654611e-1f;
  sin_r = sin_r * z * r + r;
  // cos(r + j pi/4) for j mod 8 = 0, 2, 4, 6: cos r, -sin r, -cos r, sin r.
  const int32_t quadrant = (octant >> 1) & 3;
  const uint32_t value = blend_bits((quadrant & 1) != 0, float_bits(sin_r), float_bits(cos_r));
  const uint32_t negate = static_cast<uint32_t>((quadrant + 1) & 2) << 30;  // quadrants 1, 2
  return bits_float(value ^ negate);
}

// philox::normal_from_words with the vectorisable log and cos above.
inline float normal_from_words_simd(uint32_t w0, uint32_t w1) {
  // max(u1, kMinUniform) on the bit patterns: positive floats order like their bits.
  const uint32_t u1_bits = float_bits(philox::uniform_from_word(w0));
  const uint32_t min_bits = float_bits(philox::kMinUniform);
  const float u1 = bits_float(u1_bits > min_bits ? u1_bits : min_bits);
  const float u2 = philox::uniform_from_word(w1);
  return std::sqrt(-2.0f * log_unit(u1)) * cos_small(philox::kTwoPi * u2);
}

// Philox4x32-10 words w0, w1 for counters first + j, j in [0, count), c2 = c3 = 0. Four
// implementations with bit-identical results, chosen once at run time: GCC's auto-vectorisation
// of the 32x32->64 products spends most of its time in lane shuffles, so the AVX2 / AVX-512
// versions multiply even and odd lanes separately (vpmuludq) and recombine them with blends, and
// the default AVX-512 one keeps one word per 64-bit lane and needs neither.
using WordsFn = void (*)(uint32_t* w0, uint32_t* w1, int64_t count, uint64_t seed, uint64_t first);

void philox_w01_generic(uint32_t* w0, uint32_t* w1, int64_t count, uint64_t seed, uint64_t first) {
  for (int64_t j = 0; j < count; ++j) {
    const philox::Words w = philox::words_at(seed, first + static_cast<uint64_t>(j));
    w0[j] = w.w0;
    w1[j] = w.w1;
  }
}

#if defined(__x86_64__)
// hi and lo 32-bit halves of a * k per 32-bit lane (k broadcast).
__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i k, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, k);                        // lanes 0, 2, 4, 6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), k);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2")))
void philox_w01_avx2(uint32_t* w0, uint32_t* w1, int64_t count, uint64_t seed, uint64_t first) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i round_a = _mm256_set1_epi32(static_cast<int32_t>(philox::kRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int32_t>(philox::kRoundB));
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const uint64_t base = first + static_cast<uint64_t>(j);
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int32_t>(base));
    __m256i c0 = _mm256_add_epi32(base_lo, lane);
    // Carry into the high word where the low word wrapped (unsigned c0 < base_lo).
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int32_t>(base >> 32)), carry);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < philox::kRounds; ++round) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mulhilo_avx2(c2, round_b, hi_b, lo_b);
      mulhilo_avx2(c0, round_a, hi_a, lo_a);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int32_t>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int32_t>(k1)));
      c1 = lo_b;
      c3 = lo_a;
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + j), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + j), c1);
  }
  philox_w01_generic(w0 + j, w1 + j, count - j, seed, first + static_cast<uint64_t>(j));
}

// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) inline void mulhilo_avx512(__m512i a, __m512i k, __m512i& hi, __m512i& lo) {
  // Lane moves by in-lane shuffles rather than 64-bit shifts: both multiplies and shifts of zmm
  // registers compete for one port, shuffles use another.
  const __m512i even = _mm512_mul_epu32(a, k);
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), k);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(even, _MM_PERM_DDBB), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_shuffle_epi32(odd, _MM_PERM_CCAA));
}

__attribute__((target("avx512f")))
void philox_w01_avx512(uint32_t* w0, uint32_t* w1, int64_t count, uint64_t seed, uint64_t first) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i round_a = _mm512_set1_epi32(static_cast<int32_t>(philox::kRoundA));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int32_t>(philox::kRoundB));
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    const uint64_t base = first + static_cast<uint64_t>(j);
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int32_t>(base));
    __m512i c0 = _mm512_add_epi32(base_lo, lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, base_lo);
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int32_t>(base >> 32));
    __m512i c1 = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < philox::kRounds; ++round) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mulhilo_avx512(c2, round_b, hi_b, lo_b);
      mulhilo_avx512(c0, round_a, hi_a, lo_a);
      // 0x96: three-way xor.
      c0 = _mm512_ternarylogic_epi32(hi_b, c1, _mm512_set1_epi32(static_cast<int32_t>(k0)), 0x96);
      c2 = _mm512_ternarylogic_epi32(hi_a, c3, _mm512_set1_epi32(static_cast<int32_t>(k1)), 0x96);
      c1 = lo_b;
      c3 = lo_a;
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
    _mm512_storeu_si512(w0 + j, c0);
    _mm512_storeu_si512(w1 + j, c1);
  }
  philox_w01_avx2(w0 + j, w1 + j, count - j, seed, first + static_cast<uint64_t>(j));
}
// One 32-bit word per 64-bit lane: vpmuludq multiplies the low halves into full 64-bit products,
// so hi = product >> 32 and lo = the product itself (its upper half is never read: the next
// multiply reads low halves only, and xor keeps low halves independent of upper ones). No lane
// shuffles or blends, which the 32-bit-lane version above spends most of its shuffle port on.
__attribute__((target("avx512f")))
void philox_w01_avx512_wide(uint32_t* w0, uint32_t* w1, int64_t count, uint64_t seed, uint64_t first) {
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i round_a = _mm512_set1_epi64(philox::kRoundA);
  const __m512i round_b = _mm512_set1_epi64(philox::kRoundB);
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    const uint64_t base = first + static_cast<uint64_t>(j);
    // Two independent groups of 8 counters for instruction-level parallelism.
    __m512i c0a = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(base)), lane);
    __m512i c0b = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(base + 8)), lane);
    __m512i c1a = _mm512_srli_epi64(c0a, 32), c1b = _mm512_srli_epi64(c0b, 32);
    __m512i c2a = _mm512_setzero_si512(), c2b = _mm512_setzero_si512();
    __m512i c3a = _mm512_setzero_si512(), c3b = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < philox::kRounds; ++round) {
      const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
      const __m512i pba = _mm512_mul_epu32(c2a, round_b), pbb = _mm512_mul_epu32(c2b, round_b);
      const __m512i paa = _mm512_mul_epu32(c0a, round_a), pab = _mm512_mul_epu32(c0b, round_a);
      c0a = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pba, 32), c1a, key0, 0x96);
      c0b = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pbb, 32), c1b, key0, 0x96);
      c2a = _mm512_ternarylogic_epi64(_mm512_srli_epi64(paa, 32), c3a, key1, 0x96);
      c2b = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pab, 32), c3b, key1, 0x96);
      c1a = pba;
      c1b = pbb;
      c3a = paa;
      c3b = pab;
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + j), _mm512_cvtepi64_epi32(c0a));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + j + 8), _mm512_cvtepi64_epi32(c0b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + j), _mm512_cvtepi64_epi32(c1a));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + j + 8), _mm512_cvtepi64_epi32(c1b));
  }
  philox_w01_avx2(w0 + j, w1 + j, count - j, seed, first + static_cast<uint64_t>(j));
}
#pragma GCC diagnostic pop
#endif

// The widest word generator that may run: 0 generic, 1 AVX2, 2 AVX-512 with 32-bit lanes, 3 AVX-512
// with 64-bit lanes (the default where AVX-512 exists: ~12% faster words on a Xeon with AVX-512).
// HERON_CPU_ISA=avx512, =avx2 or =generic lowers it, so the tests can check the other paths against
// the default one on a newer CPU.
int isa_cap() {
  const char* cap = std::getenv("HERON_CPU_ISA");
  if (cap == nullptr) return 3;
  if (std::strcmp(cap, "avx512") == 0) return 2;
  if (std::strcmp(cap, "avx2") == 0) return 1;
  return std::strcmp(cap, "generic") == 0 ? 0 : 3;
}

// The widest implementation the CPU runs, within isa_cap().
WordsFn select_words_fn() {
  const int max_level = isa_cap();
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (max_level >= 3 && __builtin_cpu_supports("avx512f")) return philox_w01_avx512_wide;
  if (max_level >= 2 && __builtin_cpu_supports("avx512f")) return philox_w01_avx512;
  if (max_level >= 1 && __builtin_cpu_supports("avx2")) return philox_w01_avx2;
#else
  (void)max_level;
#endif
  return philox_w01_generic;
}

// out[j] = normal_from_words(w0[j], w1[j]) (Box-Muller on the vectorisable log and cos above).
__attribute__((target_clones("avx512f", "avx2", "default")))
void normals_from_words(float* out, const uint32_t* w0, const uint32_t* w1, int64_t count) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) out[j] = normal_from_words_simd(w0[j], w1[j]);
}

// Calls block(start, count) over [0, n) in kNormalBlock pieces, OpenMP when n is large.
template <typename Block>
void for_each_block(int64_t n, Block block) {
  const int64_t blocks = (n + kNormalBlock - 1) / kNormalBlock;
#pragma omp parallel for schedule(static) if (parallel_worth(n))
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kNormalBlock;
    block(start, std::min(kNormalBlock, n - start));
  }
}

// out[j] = base[j] + alpha * z[j] (base null: alpha * z[j]); out may alias base.
__attribute__((target_clones("avx2", "default")))
void axpy_block(float* out, const float* base, float alpha, const float* z, int64_t count) {
  if (base == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) out[j] = alpha * z[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) out[j] = base[j] + alpha * z[j];
  }
}

}  // namespace

void randn_block(float* out, int64_t count, uint64_t seed, uint64_t first) {
  static const WordsFn philox_w01 = select_words_fn();
  uint32_t w0[kNormalBlock], w1[kNormalBlock];
  philox_w01(w0, w1, count, seed, first);
  normals_from_words(out, w0, w1, count);
}

__attribute__((target_clones("avx2", "default")))
void load_as_float(float* dst, const void* src, ScalarKind kind, int64_t count) {
  switch (kind) {
    case ScalarKind::kFloat32:
      std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
      return;
    case ScalarKind::kBFloat16: {
      const uint16_t* bits = static_cast<const uint16_t*>(src);
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) dst[j] = bf16_bits_to_float(bits[j]);
      return;
    }
    case ScalarKind::kFloat16: {
      const uint16_t* bits = static_cast<const uint16_t*>(src);
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) dst[j] = fp16_bits_to_float(bits[j]);
      return;
    }
  }
}

__attribute__((target_clones("avx2", "default")))
void store_from_float(void* dst, ScalarKind kind, const float* src, int64_t count) {
  switch (kind) {
    case ScalarKind::kFloat32:
      std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
      return;
    case ScalarKind::kBFloat16: {
      uint16_t* bits = static_cast<uint16_t*>(dst);
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) bits[j] = float_to_bf16_bits(src[j]);
      return;
    }
    case ScalarKind::kFloat16: {
      uint16_t* bits = static_cast<uint16_t*>(dst);
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) bits[j] = float_to_fp16_bits(src[j]);
      return;
    }
  }
}

void philox_randn(void* out, ScalarKind kind, int64_t n, uint64_t seed, uint64_t offset) {
  if (kind == ScalarKind::kFloat32) {
    float* dst = static_cast<float*>(out);
    for_each_block(n, [=](int64_t start, int64_t count) {
      randn_block(dst + start, count, seed, offset + static_cast<uint64_t>(start));
    });
    return;
  }
  uint16_t* dst = static_cast<uint16_t*>(out);
  for_each_block(n, [=](int64_t start, int64_t count) {
    float values[kNormalBlock];
    randn_block(values, count, seed, offset + static_cast<uint64_t>(start));
    store_from_float(dst + start, kind, values, count);
  });
}

void philox_randn_tile(float* out, int64_t ld_out, const DirectionTile& tile, float alpha,
                       const float* base, int64_t ld_base) {
  const int64_t rows = tile.row_end - tile.row_begin;
  const int64_t cols = tile.col_end - tile.col_begin;
  if (rows <= 0 || cols <= 0) return;
  const int64_t blocks_per_row = (cols + kNormalBlock - 1) / kNormalBlock;
  const int64_t blocks = rows * blocks_per_row;
#pragma omp parallel for schedule(static) if (parallel_worth(rows * cols))
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t row = b / blocks_per_row;
    const int64_t col = (b % blocks_per_row) * kNormalBlock;
    const int64_t count = std::min(kNormalBlock, cols - col);
    const uint64_t first = tile.offset +
                           static_cast<uint64_t>(tile.row_begin + row) * static_cast<uint64_t>(tile.cols) +
                           static_cast<uint64_t>(tile.col_begin + col);
    float z[kNormalBlock];
    randn_block(z, count, tile.seed, first);
    axpy_block(out + row * ld_out + col, base == nullptr ? nullptr : base + row * ld_base + col, alpha, z,
               count);
  }
}

void philox_words(uint32_t* out, int64_t n, uint64_t seed, uint64_t offset) {
#pragma omp parallel for schedule(static) if (parallel_worth(n))
  for (int64_t i = 0; i < n; ++i) {
    const philox::Words w = philox::words_at(seed, offset + static_cast<uint64_t>(i));
    out[4 * i + 0] = w.w0;
    out[4 * i + 1] = w.w1;
    out[4 * i + 2] = w.w2;
    out[4 * i + 3] = w.w3;
  }
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace heron
