// CUDA launchers for the seeded zeroth-order parameter updates (raw pointers; launched on the
// caller's stream). Math: python/heron/kernels/reference.py; contract: docs/kernels.md.
//
// The update direction is G = sum_j grads[j] * z_j over q directions read from device arrays
// (no host sync), z_j keyed (seeds[j], offset) over the parameter's flat index, or low rank
// z_j = U V_j.T / sqrt(rank) for a (rows, cols) parameter. The parameter (float32, bfloat16 or
// float16) is read and written once, in place; the math and Adam moments are float32.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/philox_cuda.h"

namespace heron {
namespace cuda {

struct ZoUpdateArgs {
  void* param = nullptr;  // numel elements of `kind`, contiguous
  ScalarKind kind = ScalarKind::kFloat32;
  int64_t numel = 0;
  const int64_t* seeds = nullptr;  // (q,) device
  const float* grads = nullptr;    // (q,) device
  int64_t q = 0;
  uint64_t offset = 0;  // full directions: element i of z_j is randn(seeds[j], offset + i)
  // rank > 0: the parameter is (rows, cols); U[n, i] = randn(u_seed, u_offset + n*rank + i),
  // V_j[k, i] = randn(seeds[j], v_offset + k*rank + i); `offset` is unused.
  int64_t rank = 0;
  int64_t rows = 0, cols = 0;
  uint64_t u_seed = 0, u_offset = 0, v_offset = 0;
  float* workspace = nullptr;  // rank > 0: zo_lowrank_workspace_floats(rows, cols, rank) floats
};

// float32 scratch for a low-rank update: sum_j grads[j] V_j (cols x rank) and U (rows x rank).
inline int64_t zo_lowrank_workspace_floats(int64_t rows, int64_t cols, int64_t rank) {
  return (rows + cols) * rank;
}

// param -= lr * (G + weight_decay * param)
cudaError_t launch_zo_sgd_update(const ZoUpdateArgs& args, double lr, double weight_decay, cudaStream_t stream);

struct AdamHyper {
  double lr = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;  // 1-based, after this update
  bool decoupled_weight_decay = false;  // AdamW
};

// Adam / AdamW on G with float32 moments exp_avg, exp_avg_sq (numel each, contiguous).
cudaError_t launch_zo_adam_update(const ZoUpdateArgs& args, float* exp_avg, float* exp_avg_sq,
                                  const AdamHyper& hyper, cudaStream_t stream);

// param += alpha * z, z keyed (seed, offset) over the flat index.
cudaError_t launch_perturb(void* param, ScalarKind kind, int64_t numel, uint64_t seed, uint64_t offset, double alpha,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace heron
