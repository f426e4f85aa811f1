// Fused zeroth-order parameter updates on CPU (docs/kernels.md): the q directions are regenerated
// block by block from their seeds and applied in one pass over the parameter. Torch-free (raw
// pointers), OpenMP over blocks; results do not depend on the number of threads.
#pragma once

#include <cstdint>

#include "cpu/philox_cpu.h"

namespace heron {
namespace cpu {

// A parameter of `numel` elements of `kind`, viewed as (rows, cols) for low-rank directions.
struct ParamSpec {
  void* data;
  ScalarKind kind;
  int64_t numel;
  int64_t rows, cols;  // rows * cols == numel; only read in low-rank mode
};

// The combined direction G = sum_j grads[j] * z_j over q seeds (docs/kernels.md):
//   rank == 0: z_j[i] = randn(seeds[j], offset + i)
//   rank > 0 : z_j = U V_j^T / sqrt(rank), U[n, r] = randn(u_seed, u_offset + n*rank + r) (rows x rank),
//              V_j[k, r] = randn(seeds[j], v_offset + k*rank + r) (cols x rank).
struct DirectionSpec {
  const int64_t* seeds;  // (q,)
  const float* grads;    // (q,)
  int64_t q;
  uint64_t offset;
  int64_t rank;
  uint64_t u_seed, u_offset, v_offset;
};

// param -= lr * (G + weight_decay * param)
void zo_sgd_update(const ParamSpec& param, const DirectionSpec& direction, double lr, double weight_decay);

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;                 // 1-based, after this update
  bool decoupled_weight_decay;  // AdamW
};

// One Adam / AdamW step with gradient G; exp_avg and exp_avg_sq are float32 of param.numel.
void zo_adam_update(const ParamSpec& param, float* exp_avg, float* exp_avg_sq, const DirectionSpec& direction,
                    const AdamHyper& hyper);

// param += alpha * z, z keyed by (seed, offset).
void perturb(const ParamSpec& param, uint64_t seed, uint64_t offset, double alpha);

}  // namespace cpu
}  // namespace heron
