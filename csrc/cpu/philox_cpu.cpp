#include "cpu/philox_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "philox.h"

namespace heron {
namespace cpu {
namespace {

// Counters handled per inner block: large enough for SIMD lanes, small enough for L1.
constexpr int64_t kBlock = 256;
// Work below this many elements runs on one thread (thread start-up costs more).
constexpr int64_t kParallelGrain = 1 << 15;

// Philox words w0, w1 for counters [first, first + count) in SIMD-friendly form.
// Written as plain loops over arrays so the compiler vectorises the 32-bit arithmetic.
__attribute__((target_clones("avx2", "default")))
void block_normals(float* out, int64_t count, uint64_t seed, uint64_t first) {
  uint32_t c0[kBlock], c1[kBlock], c2[kBlock], c3[kBlock];
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t counter = first + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(counter);
    c1[j] = static_cast<uint32_t>(counter >> 32);
    c2[j] = 0u;
    c3[j] = 0u;
  }
  uint32_t k0 = seed_lo, k1 = seed_hi;
  for (int round = 0; round < philox::kRounds; ++round) {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) {
      const uint32_t p0 = c0[j], p2 = c2[j];
      const uint64_t prod_b = static_cast<uint64_t>(philox::kRoundB) * p2;
      const uint64_t prod_a = static_cast<uint64_t>(philox::kRoundA) * p0;
      c0[j] = static_cast<uint32_t>(prod_b >> 32) ^ c1[j] ^ k0;
      c2[j] = static_cast<uint32_t>(prod_a >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(prod_b);
      c3[j] = static_cast<uint32_t>(prod_a);
    }
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  for (int64_t j = 0; j < count; ++j) out[j] = philox::normal_from_words(c0[j], c1[j]);
}

template <typename Store>
void generate(int64_t n, uint64_t seed, uint64_t offset, Store store) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n >= kParallelGrain)
  for (int64_t b = 0; b < blocks; ++b) {
    float buffer[kBlock];
    const int64_t start = b * kBlock;
    const int64_t count = std::min(kBlock, n - start);
    block_normals(buffer, count, seed, offset + static_cast<uint64_t>(start));
    store(start, count, buffer);
  }
}

}  // namespace

uint16_t float_to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

uint16_t float_to_fp16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  if (abs_bits >= 0x7F800000u) {  // inf or NaN
    return static_cast<uint16_t>(sign | 0x7C00u | (abs_bits > 0x7F800000u ? 0x200u : 0u));
  }
  if (abs_bits >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (abs_bits < 0x38800000u) {  // subnormal half (or zero): round at 2^-24 granularity
    float magnitude;
    std::memcpy(&magnitude, &abs_bits, sizeof(magnitude));
    // Adding 0.5 shifts the value so the float's own RNE rounds at the half subnormal step.
    const float shifted = magnitude + 0.5f;
    uint32_t shifted_bits;
    std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
    return static_cast<uint16_t>(sign | (shifted_bits - 0x3F000000u));
  }
  const uint32_t mantissa_odd = (abs_bits >> 13) & 1u;
  const uint32_t rounded = abs_bits + 0xC8000FFFu + mantissa_odd;  // rebias exponent, round
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

float fp16_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x3FFu;
  uint32_t wide;
  if (exponent == 0x1Fu) {
    wide = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    std::memcpy(&wide, &magnitude, sizeof(wide));
    wide |= sign;
  } else {
    wide = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

void philox_randn(void* out, ScalarKind kind, int64_t n, uint64_t seed, uint64_t offset) {
  switch (kind) {
    case ScalarKind::kFloat32: {
      float* dst = static_cast<float*>(out);
      generate(n, seed, offset, [dst](int64_t start, int64_t count, const float* values) {
        std::memcpy(dst + start, values, static_cast<size_t>(count) * sizeof(float));
      });
      return;
    }
    case ScalarKind::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(out);
      generate(n, seed, offset, [dst](int64_t start, int64_t count, const float* values) {
        for (int64_t j = 0; j < count; ++j) dst[start + j] = float_to_bf16_bits(values[j]);
      });
      return;
    }
    case ScalarKind::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(out);
      generate(n, seed, offset, [dst](int64_t start, int64_t count, const float* values) {
        for (int64_t j = 0; j < count; ++j) dst[start + j] = float_to_fp16_bits(values[j]);
      });
      return;
    }
  }
}

void philox_words(uint32_t* out, int64_t n, uint64_t seed, uint64_t offset) {
#pragma omp parallel for schedule(static) if (n >= kParallelGrain)
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
