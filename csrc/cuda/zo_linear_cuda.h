// CUDA launchers for the fused perturbed linear layers (raw pointers; launched on the caller's
// stream). The math is python/heron/kernels/reference.py; the contract is docs/kernels.md. Every tensor is
// 2-D row-major contiguous and has the element type `kind`; accumulation is float32. The
// direction Z is generated tile by tile inside the GEMM and never written to memory.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/philox_cuda.h"

namespace heron {
namespace cuda {

// Largest low-rank / LoRA rank the fused kernels accept (the x @ V projection lives in registers).
constexpr int kMaxLinearRank = 64;

struct PerturbedLinearArgs {
  const void* x_base = nullptr;  // (M, K)
  const void* x_pert = nullptr;  // (M, K), or nullptr: both streams read x_base (loaded once)
  const void* weight = nullptr;  // (N, K)
  const void* bias = nullptr;    // (N,) or nullptr
  void* y_base = nullptr;        // (M, N) = x_base @ W.T + b
  void* y_pert = nullptr;        // (M, N) = x_pert @ (W + mu Z).T + b + mu z_b
  ScalarKind kind = ScalarKind::kFloat32;
  int64_t M = 0, N = 0, K = 0;
  uint64_t seed = 0;
  uint64_t weight_offset = 0;  // full Z[n, k] = randn(seed, weight_offset + n*K + k)
  uint64_t bias_offset = 0;    // z_b[n] = randn(seed, bias_offset + n)
  float mu = 0.0f;
  // rank 0: full Z. 1..kMaxLinearRank: Z = U V.T / sqrt(rank) with
  // U[n, j] = randn(u_seed, u_offset + n*rank + j), V[k, j] = randn(seed, v_offset + k*rank + j).
  int rank = 0;
  uint64_t u_seed = 0, u_offset = 0, v_offset = 0;
};

cudaError_t launch_perturbed_linear(const PerturbedLinearArgs& args, cudaStream_t stream);

struct LoraLinearArgs {
  const void* x_base = nullptr;  // (M, K)
  const void* x_pert = nullptr;  // (M, K) or nullptr (x_base used for both streams)
  const void* weight = nullptr;  // (N, K), frozen
  const void* bias = nullptr;    // (N,) or nullptr, frozen
  const void* lora_a = nullptr;  // (rank, K); Z_A[j, k] = randn(seed, a_offset + j*K + k)
  const void* lora_b = nullptr;  // (N, rank); Z_B[n, j] = randn(seed, b_offset + n*rank + j)
  void* y_base = nullptr;        // (M, N)
  void* y_pert = nullptr;        // (M, N)
  ScalarKind kind = ScalarKind::kFloat32;
  int64_t M = 0, N = 0, K = 0;
  int rank = 0;  // 1..kMaxLinearRank
  float scale = 1.0f;
  uint64_t seed = 0, a_offset = 0, b_offset = 0;
  float mu = 0.0f;
  // float32 scratch of lora_workspace_floats(splits, M, rank) elements on the tensors' device:
  // split-K partial sums of x_base @ A.T and x_pert @ (A + mu Z_A).T, layout (splits, 2, M, rank).
  float* workspace = nullptr;
  int splits = 1;  // from lora_split_count on the same device
};

// Number of K splits for the x @ A.T pass (enough blocks to fill the current device when M is
// small). Queries the current device; deterministic for a given device, M and K.
int lora_split_count(int64_t M, int64_t K);

inline int64_t lora_workspace_floats(int splits, int64_t M, int rank) {
  return static_cast<int64_t>(splits) * 2 * M * rank;
}

cudaError_t launch_lora_perturbed_linear(const LoraLinearArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace heron
