// CUDA generators for the perturbation stream (raw pointers; launched on the caller's stream).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace heron {
namespace cuda {

// Element types the generators can write; the same numbering as heron::cpu::ScalarKind.
enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// out[i] = randn(seed, offset + i), i in [0, n), written as `kind`.
cudaError_t launch_philox_randn(void* out, ScalarKind kind, int64_t n, uint64_t seed,
                                uint64_t offset, cudaStream_t stream);

// out[4*i + j] = Philox4x32-10 word j at counter offset + i.
cudaError_t launch_philox_words(uint32_t* out, int64_t n, uint64_t seed, uint64_t offset,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace heron
