// Seeded in-place updates: perturb, ZO-SGD and ZO-Adam/AdamW, full or low-rank directions, q
// directions summed in the same pass that reads and writes the parameter.
//
// Full: a grid-stride loop over the stream's groups of four (tl.randn4x: one Philox call per
// four elements); element i of G is sum_j grads[j] * randn(seeds[j], offset + i). A group whose
// elements all lie in the parameter is one vector load/store of the parameter and moments when
// offset is a multiple of 4 and every pointer is aligned; otherwise element by element, masked.
// Low rank: G = U (sum_j grads[j] V_j).T / sqrt(rank). A first kernel writes the two small
// factors (cols x rank and rows x rank, never the parameter's size) to a workspace; a tiled
// kernel then forms G tile by tile in registers and applies the rule.
#include "cuda/zo_update_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/convert.cuh"
#include "philox.h"

namespace heron {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // elements per stream group (tl.randn4x): one vector access
constexpr int64_t kMaxBlocks = 65535 * 4;
// Low-rank apply tile: kTileRows x kTileCols parameter elements, rank consumed kRankChunk at a time.
constexpr int kTileRows = 32;
constexpr int kTileCols = 64;
constexpr int kRankChunk = 32;
constexpr int kRowGroups = kThreads / kTileCols;          // thread rows: tid / kTileCols
constexpr int kRowsPerThread = kTileRows / kRowGroups;    // rows rg, rg + kRowGroups, ...
static_assert(kThreads % kTileCols == 0 && kTileRows % kRowGroups == 0, "tile must split over the block");

enum class Rule { kAdd, kSgd, kAdam };

// The q directions: sum_j grads[j] * randn(seeds[j], offset + i), or one host-side (seed, grad).
struct Directions {
  const int64_t* seeds;  // (q,) device
  const float* grads;    // (q,) device
  int64_t q;
  bool single;  // use (seed, grad) below instead of the arrays
  uint64_t seed;
  float grad;
  uint64_t offset;

  __device__ __forceinline__ float at(int64_t i) const {
    const uint64_t counter = offset + static_cast<uint64_t>(i);
    if (single) return grad * philox::randn_at(seed, counter);
    float sum = 0.0f;
    for (int64_t j = 0; j < q; ++j) {
      sum = fmaf(grads[j], philox::randn_at(static_cast<uint64_t>(seeds[j]), counter), sum);
    }
    return sum;
  }

  // The four elements of stream group `group` (counters 4 * group .. 4 * group + 3).
  __device__ __forceinline__ void at_group(uint64_t group, float (&out)[4]) const {
    if (single) {
      const philox::Normals z = philox::randn4x(seed, group);
      out[0] = grad * z.n0;
      out[1] = grad * z.n1;
      out[2] = grad * z.n2;
      out[3] = grad * z.n3;
      return;
    }
    out[0] = out[1] = out[2] = out[3] = 0.0f;
    for (int64_t j = 0; j < q; ++j) {
      const philox::Normals z = philox::randn4x(static_cast<uint64_t>(seeds[j]), group);
      out[0] = fmaf(grads[j], z.n0, out[0]);
      out[1] = fmaf(grads[j], z.n1, out[1]);
      out[2] = fmaf(grads[j], z.n2, out[2]);
      out[3] = fmaf(grads[j], z.n3, out[3]);
    }
  }
};

// Rule constants, folded on the host in double as the reference does with Python floats.
struct Hyper {
  float lr, weight_decay;
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float step_size;   // lr / (1 - beta1**step)
  float sqrt_bias2;  // sqrt(1 - beta2**step)
  float decay;       // 1 - lr * weight_decay (AdamW)
  bool decoupled;
};

template <Rule R>
__device__ __forceinline__ void apply_rule(const Hyper& h, float& p, float g, float& m, float& v) {
  if constexpr (R == Rule::kAdd) {
    p = p + g;
  } else if constexpr (R == Rule::kSgd) {
    p = p - h.lr * (g + h.weight_decay * p);
  } else {
    if (h.decoupled) {
      p = p * h.decay;
    } else {
      g = g + h.weight_decay * p;
    }
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * g * g;
    p = p - (h.step_size * m) / (sqrtf(v) / h.sqrt_bias2 + h.eps);
  }
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// One aligned vector access of VEC elements.
template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* src, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(src);
  #pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float(pack.v[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* dst, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
  #pragma unroll
  for (int e = 0; e < VEC; ++e) pack.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Pack<T, VEC>*>(dst) = pack;
}

// Full directions; element i of the flat parameter uses counter offset + i. Thread item g is the
// stream group offset / 4 + g, elements 4g - lead .. 4g - lead + 3 (lead = offset % 4).
// VECTOR (lead == 0, pointers aligned): whole groups inside the parameter are one vector access.
template <typename T, Rule R, bool VECTOR>
__global__ void __launch_bounds__(kThreads)
    update_full_kernel(T* __restrict__ param, float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                       int64_t numel, const Directions dir, const Hyper h) {
  const int64_t lead = static_cast<int64_t>(dir.offset & 3u);
  const int64_t groups = (numel + lead + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    float z[kVec];
    dir.at_group((dir.offset >> 2) + static_cast<uint64_t>(g), z);
    const int64_t base = 4 * g - lead;
    if (VECTOR && base + kVec <= numel) {
      float p[kVec], m[kVec] = {}, v[kVec] = {};
      load_pack<T, kVec>(param + base, p);
      if constexpr (R == Rule::kAdam) {
        load_pack<float, kVec>(exp_avg + base, m);
        load_pack<float, kVec>(exp_avg_sq + base, v);
      }
      #pragma unroll
      for (int e = 0; e < kVec; ++e) apply_rule<R>(h, p[e], z[e], m[e], v[e]);
      store_pack<T, kVec>(param + base, p);
      if constexpr (R == Rule::kAdam) {
        store_pack<float, kVec>(exp_avg + base, m);
        store_pack<float, kVec>(exp_avg_sq + base, v);
      }
      continue;
    }
    #pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t i = base + e;
      if (i < 0 || i >= numel) continue;
      float p = to_float(param[i]), m = 0.0f, v = 0.0f;
      if constexpr (R == Rule::kAdam) {
        m = exp_avg[i];
        v = exp_avg_sq[i];
      }
      apply_rule<R>(h, p, z[e], m, v);
      param[i] = from_float<T>(p);
      if constexpr (R == Rule::kAdam) {
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
      }
    }
  }
}

// workspace[0, cols*rank)              = sum_j grads[j] V_j, (cols, rank), V_j keyed (seeds[j], v_offset)
// workspace[cols*rank, (rows+cols)*rank) = U, (rows, rank), keyed (u_seed, u_offset)
__global__ void __launch_bounds__(kThreads)
    lowrank_factors_kernel(float* __restrict__ workspace, int64_t rows, int64_t cols, int64_t rank,
                           const Directions v_dirs, uint64_t u_seed, uint64_t u_offset) {
  const int64_t v_size = cols * rank;
  const int64_t total = (rows + cols) * rank;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    workspace[i] = i < v_size ? v_dirs.at(i) : philox::randn_at(u_seed, u_offset + static_cast<uint64_t>(i - v_size));
  }
}

// G[n, k] = sum_i U[n, i] * Vc[k, i] / sqrt(rank) for a kTileRows x kTileCols tile, then the rule.
// Thread (rg, c) = (tid / kTileCols, tid % kTileCols) owns column c, rows rg + kRowGroups * t.
template <typename T, Rule R>
__global__ void __launch_bounds__(kThreads)
    update_lowrank_kernel(T* __restrict__ param, float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                          int64_t rows, int64_t cols, int64_t rank, const float* __restrict__ v_comb,
                          const float* __restrict__ u, float inv_sqrt_rank, const Hyper h) {
  __shared__ float us[kTileRows][kRankChunk + 1];
  __shared__ float vs[kTileCols][kRankChunk + 1];  // odd stride: lanes read different banks
  const int tid = threadIdx.x;
  const int rg = tid / kTileCols, c = tid % kTileCols;
  const int64_t col_tiles = (cols + kTileCols - 1) / kTileCols;
  const int64_t tiles = ((rows + kTileRows - 1) / kTileRows) * col_tiles;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t r0 = (tile / col_tiles) * kTileRows;
    const int64_t c0 = (tile % col_tiles) * kTileCols;
    float g[kRowsPerThread] = {};
    for (int64_t j0 = 0; j0 < rank; j0 += kRankChunk) {
      __syncthreads();  // the previous chunk (or tile) is consumed
      for (int e = tid; e < kTileRows * kRankChunk; e += kThreads) {
        const int rr = e / kRankChunk, j = e % kRankChunk;
        const int64_t row = r0 + rr, jj = j0 + j;
        us[rr][j] = (row < rows && jj < rank) ? u[row * rank + jj] : 0.0f;
      }
      for (int e = tid; e < kTileCols * kRankChunk; e += kThreads) {
        const int cc = e / kRankChunk, j = e % kRankChunk;
        const int64_t col = c0 + cc, jj = j0 + j;
        vs[cc][j] = (col < cols && jj < rank) ? v_comb[col * rank + jj] : 0.0f;
      }
      __syncthreads();
      #pragma unroll 8
      for (int j = 0; j < kRankChunk; ++j) {
        const float vj = vs[c][j];
        #pragma unroll
        for (int t = 0; t < kRowsPerThread; ++t) g[t] = fmaf(us[rg + kRowGroups * t][j], vj, g[t]);
      }
    }
    const int64_t col = c0 + c;
    if (col < cols) {
      #pragma unroll
      for (int t = 0; t < kRowsPerThread; ++t) {
        const int64_t row = r0 + rg + kRowGroups * t;
        if (row >= rows) continue;
        const int64_t idx = row * cols + col;
        float p = to_float(param[idx]);
        float m = 0.0f, v = 0.0f;
        if constexpr (R == Rule::kAdam) {
          m = exp_avg[idx];
          v = exp_avg_sq[idx];
        }
        apply_rule<R>(h, p, g[t] * inv_sqrt_rank, m, v);
        param[idx] = from_float<T>(p);
        if constexpr (R == Rule::kAdam) {
          exp_avg[idx] = m;
          exp_avg_sq[idx] = v;
        }
      }
    }
  }
}

int grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
}

int grid_for_tiles(int64_t tiles) {
  return static_cast<int>(tiles < kMaxBlocks ? (tiles > 0 ? tiles : 1) : kMaxBlocks);
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, Rule R>
cudaError_t run_lowrank(const ZoUpdateArgs& a, float* exp_avg, float* exp_avg_sq, const Directions& dir,
                        const Hyper& h, cudaStream_t stream) {
  Directions v_dirs = dir;
  v_dirs.offset = a.v_offset;
  lowrank_factors_kernel<<<grid_for((a.rows + a.cols) * a.rank), kThreads, 0, stream>>>(
      a.workspace, a.rows, a.cols, a.rank, v_dirs, a.u_seed, a.u_offset);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const int64_t tiles = ((a.rows + kTileRows - 1) / kTileRows) * ((a.cols + kTileCols - 1) / kTileCols);
  const float inv_sqrt_rank = static_cast<float>(1.0 / std::sqrt(static_cast<double>(a.rank)));
  update_lowrank_kernel<T, R><<<grid_for_tiles(tiles), kThreads, 0, stream>>>(
      static_cast<T*>(a.param), exp_avg, exp_avg_sq, a.rows, a.cols, a.rank, a.workspace,
      a.workspace + a.cols * a.rank, inv_sqrt_rank, h);
  return cudaGetLastError();
}

template <typename T, Rule R>
cudaError_t run_full(const ZoUpdateArgs& a, float* exp_avg, float* exp_avg_sq, const Directions& dir, const Hyper& h,
                     cudaStream_t stream) {
  T* param = static_cast<T*>(a.param);
  const bool vector = (dir.offset & 3u) == 0 && aligned(param, sizeof(T) * kVec) &&
                      (R != Rule::kAdam || (aligned(exp_avg, sizeof(float) * kVec) &&
                                            aligned(exp_avg_sq, sizeof(float) * kVec)));
  const int grid = grid_for((a.numel + 3) / 4 + 1);  // one thread item per group
  if (vector) {
    update_full_kernel<T, R, true><<<grid, kThreads, 0, stream>>>(param, exp_avg, exp_avg_sq, a.numel, dir, h);
  } else {
    update_full_kernel<T, R, false><<<grid, kThreads, 0, stream>>>(param, exp_avg, exp_avg_sq, a.numel, dir, h);
  }
  return cudaGetLastError();
}

template <typename T, Rule R>
cudaError_t run_typed(const ZoUpdateArgs& a, float* exp_avg, float* exp_avg_sq, const Directions& dir, const Hyper& h,
                      cudaStream_t stream) {
  if constexpr (R != Rule::kAdd) {  // perturb is full-rank only
    if (a.rank > 0) return run_lowrank<T, R>(a, exp_avg, exp_avg_sq, dir, h, stream);
  }
  return run_full<T, R>(a, exp_avg, exp_avg_sq, dir, h, stream);
}

template <Rule R>
cudaError_t run(const ZoUpdateArgs& a, float* exp_avg, float* exp_avg_sq, const Directions& dir, const Hyper& h,
                cudaStream_t stream) {
  if (a.numel < 0 || a.q < 0 || a.rank < 0) return cudaErrorInvalidValue;
  if (a.numel == 0) return cudaSuccess;
  if (!dir.single && a.q > 0 && (a.seeds == nullptr || a.grads == nullptr)) return cudaErrorInvalidValue;
  if (a.rank > 0 && (a.rows < 0 || a.cols < 0 || a.rows * a.cols != a.numel || a.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (R == Rule::kAdam && (exp_avg == nullptr || exp_avg_sq == nullptr)) return cudaErrorInvalidValue;
  switch (a.kind) {
    case ScalarKind::kFloat32:
      return run_typed<float, R>(a, exp_avg, exp_avg_sq, dir, h, stream);
    case ScalarKind::kBFloat16:
      return run_typed<__nv_bfloat16, R>(a, exp_avg, exp_avg_sq, dir, h, stream);
    case ScalarKind::kFloat16:
      return run_typed<__half, R>(a, exp_avg, exp_avg_sq, dir, h, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

Directions directions_of(const ZoUpdateArgs& a) {
  Directions dir{};
  dir.seeds = a.seeds;
  dir.grads = a.grads;
  dir.q = a.q;
  dir.single = false;
  dir.offset = a.offset;
  return dir;
}

}  // namespace

cudaError_t launch_zo_sgd_update(const ZoUpdateArgs& args, double lr, double weight_decay, cudaStream_t stream) {
  Hyper h{};
  h.lr = static_cast<float>(lr);
  h.weight_decay = static_cast<float>(weight_decay);
  return run<Rule::kSgd>(args, nullptr, nullptr, directions_of(args), h, stream);
}

cudaError_t launch_zo_adam_update(const ZoUpdateArgs& args, float* exp_avg, float* exp_avg_sq,
                                  const AdamHyper& hyper, cudaStream_t stream) {
  if (hyper.step < 1) return cudaErrorInvalidValue;
  const double step = static_cast<double>(hyper.step);
  Hyper h{};
  h.lr = static_cast<float>(hyper.lr);
  h.weight_decay = static_cast<float>(hyper.weight_decay);
  h.beta1 = static_cast<float>(hyper.beta1);
  h.one_minus_beta1 = static_cast<float>(1.0 - hyper.beta1);
  h.beta2 = static_cast<float>(hyper.beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - hyper.beta2);
  h.eps = static_cast<float>(hyper.eps);
  h.step_size = static_cast<float>(hyper.lr / (1.0 - std::pow(hyper.beta1, step)));
  h.sqrt_bias2 = static_cast<float>(std::sqrt(1.0 - std::pow(hyper.beta2, step)));
  h.decay = static_cast<float>(1.0 - hyper.lr * hyper.weight_decay);
  h.decoupled = hyper.decoupled_weight_decay;
  return run<Rule::kAdam>(args, exp_avg, exp_avg_sq, directions_of(args), h, stream);
}

cudaError_t launch_perturb(void* param, ScalarKind kind, int64_t numel, uint64_t seed, uint64_t offset, double alpha,
                           cudaStream_t stream) {
  ZoUpdateArgs args;
  args.param = param;
  args.kind = kind;
  args.numel = numel;
  args.offset = offset;
  Directions dir{};
  dir.single = true;
  dir.seed = seed;
  dir.grad = static_cast<float>(alpha);
  dir.offset = offset;
  return run<Rule::kAdd>(args, nullptr, nullptr, dir, Hyper{}, stream);
}

}  // namespace cuda
}  // namespace heron
