// Argument checks for the fused CPU launchers (on top of common.h): every message names the
// argument and says what it got.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"

namespace heron {

// A contiguous CPU float32 / bfloat16 / float16 tensor.
inline void check_cpu_float(const torch::Tensor& t, const char* name) {
  check_tensor(t, name, c10::DeviceType::CPU);
  scalar_kind(t, name);
}

inline void check_sizes(const torch::Tensor& t, const char* name, std::vector<int64_t> sizes, const char* meaning) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(sizes), name, " must have shape ", c10::IntArrayRef(sizes), " ",
              meaning, ", got ", t.sizes());
}

inline void check_dim(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_same_dtype(const torch::Tensor& t, const char* name, const torch::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
}

inline void check_finite(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value), name, " must be finite, got ", value);
}

inline void check_non_negative(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0, name, " must be non-negative, got ", value);
}

// a * b for non-negative sizes, refusing int64 overflow.
inline int64_t checked_product(int64_t a, int64_t b, const char* what) {
  int64_t product = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &product), what, " overflows int64: ", a, " * ", b);
  return product;
}

// The rank of a low-rank direction (the low-rank ops' own; 0 would be the full direction).
inline void check_lowrank_rank(int64_t rank) {
  TORCH_CHECK(rank >= 1, "rank must be >= 1 for a low-rank direction, got ", rank);
}

// The keys of a low-rank direction of an (rows, cols) tensor: U (rows, rank) on (u_seed,
// u_offset), V (cols, rank) on (seed, v_offset).
inline void check_lowrank_keys(int64_t rank, int64_t rows, int64_t cols, int64_t seed, int64_t u_seed,
                               int64_t u_offset, int64_t v_offset) {
  check_lowrank_rank(rank);
  check_non_negative(u_seed, "u_seed");
  check_key(u_seed, u_offset, checked_product(rows, rank, "U's numel"), "u_offset");
  check_key(seed, v_offset, checked_product(cols, rank, "V's numel"), "v_offset");
}

// seeds: int64 (q,), every seed in [0, 2**63) with offset + numel in range; grads: float32 (q,).
inline void check_seeds_grads(const torch::Tensor& seeds, const torch::Tensor& grads, int64_t offset, int64_t numel) {
  check_tensor(seeds, "seeds", c10::DeviceType::CPU);
  check_tensor(grads, "grads", c10::DeviceType::CPU);
  TORCH_CHECK(seeds.scalar_type() == torch::kInt64, "seeds must be int64, got ", seeds.scalar_type());
  TORCH_CHECK(grads.scalar_type() == torch::kFloat32, "grads must be float32, got ", grads.scalar_type());
  check_dim(seeds, "seeds", 1);
  TORCH_CHECK(grads.dim() == 1 && grads.size(0) == seeds.size(0), "grads must have shape (q,) = (", seeds.size(0),
              ",) like seeds, got ", grads.sizes());
  const int64_t* values = seeds.data_ptr<int64_t>();
  for (int64_t j = 0; j < seeds.size(0); ++j) {
    TORCH_CHECK(values[j] >= 0, "seeds[", j, "] must be non-negative, got ", values[j]);
  }
  check_key(0, offset, numel);
}

// An Adam moment: contiguous float32 CPU tensor of the parameter's shape, not sharing its memory.
inline void check_moment(const torch::Tensor& moment, const char* name, const torch::Tensor& param) {
  check_tensor(moment, name, c10::DeviceType::CPU);
  TORCH_CHECK(moment.scalar_type() == torch::kFloat32, name, " must be float32, got ", moment.scalar_type());
  TORCH_CHECK(moment.sizes() == param.sizes(), name, " must have param's shape ", param.sizes(), ", got ",
              moment.sizes());
  TORCH_CHECK(moment.numel() == 0 || moment.data_ptr() != param.data_ptr(), name, " must not share param's memory");
}

}  // namespace heron
