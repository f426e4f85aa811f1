// CPU (OpenMP, vectorised) generators for the perturbation stream. Torch-free: raw pointers only,
// so the same core builds in the extension and in the standalone CMake tests.
#pragma once

#include <cstdint>
#include <cstring>

namespace heron {
namespace cpu {

// Output element types a generator can write.
enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Elements per block of the serial generator below: large enough for SIMD lanes, small enough
// that a few block buffers live on the stack and in L1. A multiple of 4 (whole groups).
constexpr int64_t kNormalBlock = 256;

// out[i] = randn(seed, offset + i) for i in [0, n), written as `kind` (round to nearest even).
// `out` points to n elements of that type. Results do not depend on the number of threads.
void philox_randn(void* out, ScalarKind kind, int64_t n, uint64_t seed, uint64_t offset);

// out[4*i + j] = word j of Philox4x32-10 at (group) counter offset + i, for i in [0, n).
void philox_words(uint32_t* out, int64_t n, uint64_t seed, uint64_t offset);

// Serial building block of the fused kernels: out[i] = randn(seed, first + i), i in [0, count),
// count <= kNormalBlock. Generates the whole groups of four the range touches (vectorised:
// AVX-512 / AVX2 / generic chosen at run time, bit-identical results on all); no threads started.
void randn_block(float* out, int64_t count, uint64_t seed, uint64_t first);

// Elements [0, n) of a stream range whose counters are offset + i, cut into blocks of at most
// kNormalBlock at group boundaries: only the first block may start inside a group and only the
// last end inside one, so no group is generated twice. Block b is [start(b), start(b) + size(b)).
struct StreamBlocks {
  int64_t n;
  uint64_t offset;

  int64_t lead() const { return static_cast<int64_t>(offset & 3u); }
  int64_t count() const { return n <= 0 ? 0 : (n + lead() + kNormalBlock - 1) / kNormalBlock; }
  int64_t start(int64_t b) const { return b == 0 ? 0 : b * kNormalBlock - lead(); }
  int64_t size(int64_t b) const {
    const int64_t end = (b + 1) * kNormalBlock - lead();
    return (end < n ? end : n) - start(b);
  }
};

// A rectangular piece of the direction of an (rows x cols) tensor keyed by (seed, offset):
// element (n, k) is randn(seed, offset + n*cols + k), the tensor's row-major flat index.
struct DirectionTile {
  uint64_t seed;
  uint64_t offset;
  int64_t cols;                   // K, the full row length of the tensor (not of the tile)
  int64_t row_begin, row_end;     // n0 <= n < n1
  int64_t col_begin, col_end;     // k0 <= k < k1
};

// out[(n-n0)*ld_out + (k-k0)] = base[(n-n0)*ld_base + (k-k0)] + alpha * Z[n, k] over the tile,
// or alpha * Z[n, k] when base is null. `base` may alias `out` (same ld). OpenMP over rows and
// column blocks when the tile is large; the values never depend on the thread count.
void philox_randn_tile(float* out, int64_t ld_out, const DirectionTile& tile, float alpha,
                       const float* base, int64_t ld_base);

// Element-type conversions used by every CPU kernel (round to nearest even, NaN kept). Inline and
// branch-free so that loops over them vectorise.
inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// a where select is true, else b, through masks. Unlike `select ? a : b` on floats, GCC cannot
// sink the arithmetic producing a or b into a branch (which it would then refuse to if-convert, as
// float operations may trap), so loops using it still vectorise.
inline uint32_t blend_bits(bool select, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(select);
  return (a & mask) | (b & ~mask);
}

inline uint16_t float_to_bf16_bits(float value) {
  const uint32_t bits = float_bits(value);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(blend_bits(is_nan, (bits >> 16) | 0x40u, rounded));
}

inline float bf16_bits_to_float(uint16_t bits) { return bits_float(static_cast<uint32_t>(bits) << 16); }

inline uint16_t float_to_fp16_bits(float value) {
  const uint32_t bits = float_bits(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  // Normal half: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
  const uint32_t normal = (abs_bits + 0xC8000FFFu + ((abs_bits >> 13) & 1u)) >> 13;
  // Subnormal half (or zero): adding 0.5 makes the float's own RNE round at the 2^-24 step.
  const uint32_t subnormal = float_bits(bits_float(abs_bits) + 0.5f) - 0x3F000000u;
  uint32_t half = blend_bits(abs_bits < 0x38800000u, subnormal, normal);
  half = blend_bits(abs_bits >= 0x477FF000u, 0x7C00u, half);  // rounds to inf (and inf itself)
  half = blend_bits(abs_bits > 0x7F800000u, 0x7E00u, half);   // NaN stays quiet NaN
  return static_cast<uint16_t>(sign | half);
}

inline float fp16_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x3FFu;
  const uint32_t normal = ((exponent + 112u) << 23) | (mantissa << 13);
  const uint32_t special = 0x7F800000u | (mantissa << 13);                       // inf or NaN
  const uint32_t subnormal = float_bits(static_cast<float>(mantissa) * 5.9604644775390625e-8f);  // 2^-24
  const uint32_t magnitude = blend_bits(exponent == 0x1Fu, special, blend_bits(exponent == 0u, subnormal, normal));
  return bits_float(sign | magnitude);
}

// Loads/stores of `count` elements of `kind` as float32 (conversions above).
void load_as_float(float* dst, const void* src, ScalarKind kind, int64_t count);
void store_from_float(void* dst, ScalarKind kind, const float* src, int64_t count);

// Number of OpenMP threads the kernels use (1 when built without OpenMP).
int num_threads();

}  // namespace cpu
}  // namespace heron
