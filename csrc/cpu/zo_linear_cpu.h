// Perturbed linear layers on CPU (docs/kernels.md): the base and perturbed streams of a linear
// layer in one call. GEMMs go through ATen (MKL / oneDNN); the direction is generated tile by tile
// into one reusable buffer of at most linear_tile_bytes(), whatever the layer size.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace heron {
namespace cpu {

// Keys of the weight and bias directions. rank == 0: full Z keyed (seed, weight_offset);
// rank > 0: Z = U V^T / sqrt(rank), U keyed (u_seed, u_offset), V keyed (seed, v_offset).
struct LinearKey {
  uint64_t seed, weight_offset, bias_offset;
  int64_t rank;
  uint64_t u_seed, u_offset, v_offset;
};

// x_base (M, K), x_pert (M, K) or none (shared input), weight (N, K), bias (N,) or none, all of one
// dtype (float32, bfloat16, float16), contiguous. Returns (y_base, y_pert), (M, N) in that dtype.
std::tuple<at::Tensor, at::Tensor> perturbed_linear(const at::Tensor& x_base, const std::optional<at::Tensor>& x_pert,
                                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                    const LinearKey& key, double mu);

// Keys of the adapter directions: Z_A keyed (seed, a_offset) over A (r, K), Z_B (seed, b_offset)
// over B (N, r).
struct LoraKey {
  uint64_t seed, a_offset, b_offset;
};

// Frozen weight (N, K) and bias; adapters lora_a (r, K), lora_b (N, r); dtypes as above.
std::tuple<at::Tensor, at::Tensor> lora_perturbed_linear(const at::Tensor& x_base,
                                                         const std::optional<at::Tensor>& x_pert,
                                                         const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                         double scale, const LoraKey& key, double mu);

// The tile budget in bytes (default 2 MiB); the setter returns the previous value (for tests).
int64_t linear_tile_bytes();
int64_t set_linear_tile_bytes(int64_t bytes);

}  // namespace cpu
}  // namespace heron
