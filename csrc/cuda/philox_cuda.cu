#include "cuda/philox_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/convert.cuh"
#include "philox.h"

namespace heron {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65535 * 4;

// Grid-stride loop over the groups of four the range touches: thread t generates group
// offset / 4 + t (tl.randn4x) and writes the elements of it that lie in [0, n). Element i always
// uses counter offset + i, whatever the launch shape.
template <typename T>
__global__ void randn_kernel(T* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t lead = static_cast<int64_t>(offset & 3u);
  const int64_t groups = (n + lead + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const philox::Normals z = philox::randn4x(seed, (offset >> 2) + static_cast<uint64_t>(g));
    const float values[4] = {z.n0, z.n1, z.n2, z.n3};
    const int64_t base = 4 * g - lead;  // element index of the group's first word
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (base + j >= 0 && base + j < n) out[base + j] = from_float<T>(values[j]);
    }
  }
}

__global__ void words_kernel(uint4* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const philox::Words w = philox::words_at(seed, offset + static_cast<uint64_t>(i));
    out[i] = make_uint4(w.w0, w.w1, w.w2, w.w3);
  }
}

int grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
}

}  // namespace

cudaError_t launch_philox_randn(void* out, ScalarKind kind, int64_t n, uint64_t seed,
                                uint64_t offset, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int grid = grid_for((n + 3) / 4 + 1);  // one thread per group
  switch (kind) {
    case ScalarKind::kFloat32:
      randn_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<float*>(out), n, seed, offset);
      break;
    case ScalarKind::kBFloat16:
      randn_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          static_cast<__nv_bfloat16*>(out), n, seed, offset);
      break;
    case ScalarKind::kFloat16:
      randn_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<__half*>(out), n, seed, offset);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_philox_words(uint32_t* out, int64_t n, uint64_t seed, uint64_t offset,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  words_kernel<<<grid_for(n), kThreads, 0, stream>>>(reinterpret_cast<uint4*>(out), n, seed, offset);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace heron
