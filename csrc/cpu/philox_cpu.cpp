#include "cpu/philox_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/normals_simd.h"
#include "philox.h"

// No FMA contraction: the generator's scalar policy must round exactly like the vector ones
// (normals_simd.h), and the clones below like each other, so the stream does not depend on the
// machine's instruction set.
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

// The scalar lane policy of normals_simd.h: the generic path, and the tail of the vector ones.
// std::fma is correctly rounded (hardware or not), so it matches vfmadd bit for bit.
struct Scalar {
  using F = float;
  using I = int32_t;
  using M = bool;
  static constexpr int64_t kLanes = 1;
  static constexpr int64_t kGroups = 1;

  static F set(float v) { return v; }
  static I iset(int32_t v) { return v; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F fma(F a, F b, F c) { return std::fma(a, b, c); }
  static F fnma(F a, F b, F c) { return std::fma(-a, b, c); }
  static F max(F a, F b) { return a > b ? a : b; }
  static F sqrt(F a) { return std::sqrt(a); }
  static F round(F a) { return std::nearbyint(a); }
  static F to_float(I a) { return static_cast<float>(a); }
  static I to_int(F a) { return static_cast<int32_t>(a); }
  static I bits_of(F a) { return static_cast<int32_t>(float_bits(a)); }
  static F float_of(I a) { return bits_float(static_cast<uint32_t>(a)); }
  static I add_i(I a, I b) { return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b)); }
  static I sub_i(I a, I b) { return static_cast<int32_t>(static_cast<uint32_t>(a) - static_cast<uint32_t>(b)); }
  static I bit_and(I a, I b) { return a & b; }
  static I bit_or(I a, I b) { return a | b; }
  static I bit_xor(I a, I b) { return a ^ b; }
  static I sra(I a, int n) { return a >> n; }
  static I srl(I a, int n) { return static_cast<int32_t>(static_cast<uint32_t>(a) >> n); }
  static I sll(I a, int n) { return static_cast<int32_t>(static_cast<uint32_t>(a) << n); }
  static M gt(I a, I b) { return a > b; }
  static I add_where(M m, I a, I b) { return m ? add_i(a, b) : a; }
  static I sub_where(M m, I a, I b) { return m ? sub_i(a, b) : a; }
  static F select(M m, F a, F b) { return m ? a : b; }
  static void split_unit(F u, F& f, F& e) { simd::split_unit_bits<Scalar>(u, f, e); }
  static M odd(I a) { return (a & 1) != 0; }
  static I xor_and(I a, I b, I c) { return a ^ (b & c); }

  static void philox(uint64_t seed, uint64_t group, I (&words)[1][4]) {
    const philox::Words w = philox::words_at(seed, group);
    words[0][0] = static_cast<int32_t>(w.w0);
    words[0][1] = static_cast<int32_t>(w.w1);
    words[0][2] = static_cast<int32_t>(w.w2);
    words[0][3] = static_cast<int32_t>(w.w3);
  }

  static void store(float* out, F n0, F n1, F n2, F n3) {
    out[0] = n0;
    out[1] = n1;
    out[2] = n2;
    out[3] = n3;
  }
};

// Normals of `groups` whole groups from `first_group`: out[4k + j] = element 4 (first_group + k) + j,
// by the widest implementation the CPU runs.
using GroupsFn = void (*)(float* out, int64_t groups, uint64_t seed, uint64_t first_group);

void normals4_generic(float* out, int64_t groups, uint64_t seed, uint64_t first_group) {
  simd::normals4_all<Scalar>(out, groups, seed, first_group);
}

// The widest generator that may run: 0 generic, 1 AVX2 + FMA, 2 AVX-512 (the default where it
// exists). HERON_CPU_ISA=avx2 or =generic lowers it, so the tests can check the other paths
// against the default one on a newer CPU.
int isa_cap() {
  const char* cap = std::getenv("HERON_CPU_ISA");
  if (cap == nullptr) return 2;
  if (std::strcmp(cap, "avx2") == 0) return 1;
  return std::strcmp(cap, "generic") == 0 ? 0 : 2;
}

GroupsFn select_generator() {
  const int max_level = isa_cap();
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (max_level >= 2 && avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) {
    return normals4_avx512;
  }
  if (max_level >= 1 && avx2) return normals4_avx2;
#else
  (void)max_level;
#endif
  return normals4_generic;
}

void normals4(float* out, int64_t groups, uint64_t seed, uint64_t first_group) {
  static const GroupsFn generator = select_generator();
  generator(out, groups, seed, first_group);
}

// Calls block(start, count) over the StreamBlocks of [0, n) (counters offset + i), OpenMP when n
// is large.
template <typename Block>
void for_each_block(int64_t n, uint64_t offset, Block block) {
  const StreamBlocks blocks{n, offset};
#pragma omp parallel for schedule(static) if (parallel_worth(n))
  for (int64_t b = 0; b < blocks.count(); ++b) {
    block(blocks.start(b), blocks.size(b));
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
  if (count <= 0) return;
  const int64_t lead = static_cast<int64_t>(first & 3u);
  const int64_t groups = (lead + count + 3) / 4;
  if (lead == 0 && count % 4 == 0) {
    normals4(out, groups, seed, first >> 2);
    return;
  }
  // The range starts or ends inside a group: generate the whole groups, keep the range.
  float whole[kNormalBlock + 8];
  normals4(whole, groups, seed, first >> 2);
  std::memcpy(out, whole + lead, static_cast<size_t>(count) * sizeof(float));
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
    for_each_block(n, offset, [=](int64_t start, int64_t count) {
      randn_block(dst + start, count, seed, offset + static_cast<uint64_t>(start));
    });
    return;
  }
  uint16_t* dst = static_cast<uint16_t*>(out);
  for_each_block(n, offset, [=](int64_t start, int64_t count) {
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
