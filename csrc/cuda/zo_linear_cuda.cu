// Fused perturbed linear layers: one shared-memory tiled GEMM family (y = x @ W.T, x (M, K),
// W (N, K), both K-contiguous) with the direction generated in the tile loader or the epilogue.
//
// Block tile kBM x kBN of the output, K consumed kBK at a time; 256 threads as a 16 x 16 grid,
// each owning a 4 x 4 register micro-tile per accumulated stream. Tiles are staged k-major in
// shared memory (tile[kk][row]) so the inner loop reads 4 consecutive rows as one float4.
//
// Modes (template flags, one kernel):
//   kFull     y_pert accumulates x_pert @ (W + mu Z).T with Z[n, k] made in the W loader, whole
//             groups of the stream at a time (add_weight_direction).
//   kLowRank  y_pert = x_pert @ W.T + mu/sqrt(r) (x_pert @ V) @ U.T: V[k, :] made per K tile and
//             x_pert @ V accumulated in registers; U rows made in the epilogue.
//   kLora     W frozen; the epilogue adds scale * xa @ B.T and scale * xa_pert @ (B + mu Z_B).T,
//             xa / xa_pert (M x r) coming from lora_down_kernel (split-K partials).
// SHARED (x_pert == x): each x tile feeds both streams; when W is not perturbed (kLowRank,
// kLora) the two streams even share one accumulator.
#include "cuda/zo_linear_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/convert.cuh"
#include "philox.h"

namespace heron {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kTM = 4;                   // micro-tile rows per thread
constexpr int kTN = 4;                   // micro-tile columns per thread
constexpr int kGridCols = kBN / kTN;     // 16 threads across the N side of the tile
constexpr int kLd = kBM + 4;             // row stride of a [kBK][64] tile: keeps float4 alignment
constexpr int kTileFloats = kBK * kLd;
constexpr int kLoraChunk = 16;           // adapter columns staged per LoRA epilogue pass
constexpr int kMaxSplits = 32;
constexpr int64_t kMaxGrid = 1 << 20;    // tile loops are grid-stride beyond this
static_assert(kBM == kBN, "the tile loader assumes square output tiles");
static_assert((kBM / kTM) * (kBN / kTN) == kThreads, "one micro-tile per thread");
static_assert(kLd % 4 == 0 && kTileFloats % 4 == 0, "float4 reads need 16-byte aligned rows");

enum class Mode { kFull, kLowRank, kLora };

constexpr int imax(int a, int b) { return a > b ? a : b; }

// Shared-memory layout (in floats) of perturbed_gemm_kernel. The epilogue buffers alias the
// K-loop tiles, which are dead by then; the bias buffers are separate (filled before the K loop).
template <Mode MODE, bool SHARED, int RMAX>
struct GemmLayout {
  // Whether y_pert needs its own accumulator (x_pert differs from x, or W is perturbed).
  static constexpr bool kSeparate = MODE == Mode::kFull || !SHARED;
  // (m, j) pairs of x_pert @ V owned per thread (kLowRank).
  static constexpr int kPairs = MODE == Mode::kLowRank ? kBM * RMAX / kThreads : 1;
  static constexpr int kX = 0;                                              // [kBK][kLd]
  static constexpr int kXp = kX + kTileFloats;                              // [kBK][kLd], !SHARED
  static constexpr int kW = kXp + (SHARED ? 0 : kTileFloats);               // [kBK][kLd]
  static constexpr int kWp = kW + kTileFloats;                              // [kBK][kLd], kFull
  static constexpr int kV = kWp + (MODE == Mode::kFull ? kTileFloats : 0);  // [kBK][RMAX], kLowRank
  static constexpr int kMainEnd = kV + (MODE == Mode::kLowRank ? kBK * RMAX : 0);
  static constexpr int kEpilogue = MODE == Mode::kLowRank ? (kBM + kBN) * (RMAX + 1)
                                   : MODE == Mode::kLora  ? 2 * (kBM + kBN) * (kLoraChunk + 1)
                                                          : 0;
  static constexpr int kBias = imax(kMainEnd, kEpilogue);  // [2][kBN]: b, and b + mu z_b
  static constexpr int kTotal = kBias + 2 * kBN;
  static_assert(MODE != Mode::kLowRank || (kBM * RMAX) % kThreads == 0, "RMAX must split evenly");
  static_assert(kTotal * sizeof(float) <= 48 * 1024, "static shared memory limit");
};

struct GemmArgs {
  const void* x;       // (M, K)
  const void* x_pert;  // (M, K); ignored when SHARED
  const void* weight;  // (N, K)
  const void* bias;    // (N,); ignored unless HAS_BIAS
  void* y_base;        // (M, N)
  void* y_pert;        // (M, N)
  int64_t M, N, K;
  uint64_t seed, weight_offset, bias_offset;
  float mu;
  int rank;                            // kLowRank: the direction's rank; kLora: the adapter rank
  uint64_t u_seed, u_offset, v_offset;  // kLowRank
  float lowrank_coef;                  // kLowRank: mu / sqrt(rank)
  const void* lora_b;                  // kLora: (N, rank)
  const float* lora_xa;                // kLora: (splits, 2, M, rank) partial sums
  int splits;
  float scale;
  uint64_t b_offset;
};

// dst[kk][rr] = src[r0 + rr, k0 + kk] for a (rows, K) row-major src; zero outside it.
// Consecutive threads read consecutive k (coalesced).
template <typename T>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, const T* __restrict__ src, int64_t rows,
                                          int64_t K, int64_t r0, int64_t k0) {
  for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
    const int rr = e / kBK, kk = e % kBK;
    const int64_t r = r0 + rr, k = k0 + kk;
    dst[kk * kLd + rr] = (r < rows && k < K) ? to_float(src[r * K + k]) : 0.0f;
  }
}

// acc[i] += sum_kk X[kk][m_i] * P[kk][j] over one K tile, for the (m, j) pairs this thread owns:
// pair tid + i*kThreads, so j = tid % RMAX for every i and m_i = tid / RMAX + i * (kThreads / RMAX).
// X is [kBK][kLd], P is [kBK][ldp].
template <int RMAX>
__device__ __forceinline__ void project_accumulate(float (&acc)[kBM * RMAX / kThreads], const float* __restrict__ X,
                                                   const float* __restrict__ P, int ldp) {
  static_assert(kThreads % RMAX == 0, "a thread's pairs must share one column j");
  constexpr int kRowStep = kThreads / RMAX;
  const int j = threadIdx.x % RMAX, m = threadIdx.x / RMAX;
  #pragma unroll 4
  for (int kk = 0; kk < kBK; ++kk) {
    const float pv = P[kk * ldp + j];
    #pragma unroll
    for (int i = 0; i < kBM * RMAX / kThreads; ++i) acc[i] = fmaf(X[kk * kLd + m + i * kRowStep], pv, acc[i]);
  }
}

// wps[kk][nn] += mu * Z[n0 + nn, k0 + kk] over the K tile (inside (N, K)), Z[n, k] = randn(seed,
// weight_offset + n*K + k), made by whole groups of the stream: row nn's kBK counters touch at most
// kGroupsPerRow groups, one thread item per (row, group), each writing the words that fall in the
// tile. Waits for the tile's W values first (every element is then touched by one thread only).
constexpr int kGroupsPerRow = kBK / 4 + 1;

__device__ __forceinline__ void add_weight_direction(float* __restrict__ wps, const GemmArgs& a, int64_t n0,
                                                     int64_t k0) {
  __syncthreads();
  for (int e = threadIdx.x; e < kBN * kGroupsPerRow; e += kThreads) {
    const int nn = e / kGroupsPerRow, gi = e % kGroupsPerRow;
    const int64_t n = n0 + nn;
    const uint64_t row_first = a.weight_offset + static_cast<uint64_t>(n * a.K + k0);  // counter of kk = 0
    const int kk0 = gi * 4 - static_cast<int>(row_first & 3u);                         // kk of the group's word 0
    if (n >= a.N || kk0 >= kBK) continue;
    const philox::Normals z = philox::randn4x(a.seed, (row_first >> 2) + static_cast<uint64_t>(gi));
    const float values[4] = {z.n0, z.n1, z.n2, z.n3};
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kk = kk0 + j;
      if (kk >= 0 && kk < kBK && k0 + kk < a.K) wps[kk * kLd + nn] += a.mu * values[j];
    }
  }
}

template <typename T, Mode MODE, bool SHARED, bool HAS_BIAS, int RMAX>
__global__ void __launch_bounds__(kThreads) perturbed_gemm_kernel(const GemmArgs a) {
  using L = GemmLayout<MODE, SHARED, RMAX>;
  constexpr bool kSeparate = L::kSeparate;
  constexpr int kPairs = L::kPairs;
  __shared__ __align__(16) float smem[L::kTotal];

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ xp = SHARED ? x : static_cast<const T*>(a.x_pert);
  const T* __restrict__ w = static_cast<const T*>(a.weight);
  float* xs = smem + L::kX;
  float* xps = SHARED ? xs : smem + L::kXp;
  float* ws = smem + L::kW;
  float* wps = MODE == Mode::kFull ? smem + L::kWp : ws;
  float* vs = smem + L::kV;
  float* sbias = smem + L::kBias;

  const int64_t M = a.M, N = a.N, K = a.K;
  const int tid = threadIdx.x;
  const int ty = tid / kGridCols, tx = tid % kGridCols;
  const int64_t n_tiles = (N + kBN - 1) / kBN;
  const int64_t tiles = ((M + kBM - 1) / kBM) * n_tiles;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t m0 = (tile / n_tiles) * kBM;
    const int64_t n0 = (tile % n_tiles) * kBN;

    if constexpr (HAS_BIAS) {
      const T* __restrict__ bias = static_cast<const T*>(a.bias);
      for (int nn = tid; nn < kBN; nn += kThreads) {
        const int64_t n = n0 + nn;
        float b = 0.0f, bp = 0.0f;
        if (n < N) {
          b = to_float(bias[n]);
          // The LoRA bias is frozen; otherwise the bias gets the full direction z_b.
          bp = MODE == Mode::kLora ? b
                                   : b + a.mu * philox::randn_at(a.seed, a.bias_offset + static_cast<uint64_t>(n));
        }
        sbias[nn] = b;
        sbias[kBN + nn] = bp;
      }
    }

    float acc_b[kTM][kTN] = {};
    float acc_p[kSeparate ? kTM : 1][kTN] = {};
    float xv[kPairs] = {};  // kLowRank: this thread's pairs of x_pert @ V (BM x RMAX)

    for (int64_t k0 = 0; k0 < K; k0 += kBK) {
      load_tile(xs, x, M, K, m0, k0);
      if constexpr (!SHARED) load_tile(xps, xp, M, K, m0, k0);
      for (int e = tid; e < kBN * kBK; e += kThreads) {
        const int nn = e / kBK, kk = e % kBK;
        const int64_t n = n0 + nn, k = k0 + kk;
        const float wv = (n < N && k < K) ? to_float(w[n * K + k]) : 0.0f;
        ws[kk * kLd + nn] = wv;
        if constexpr (MODE == Mode::kFull) wps[kk * kLd + nn] = wv;
      }
      if constexpr (MODE == Mode::kFull) add_weight_direction(wps, a, n0, k0);
      if constexpr (MODE == Mode::kLowRank) {
        for (int e = tid; e < kBK * RMAX; e += kThreads) {
          const int kk = e / RMAX, j = e % RMAX;
          const int64_t k = k0 + kk;
          vs[e] = (k < K && j < a.rank)
                      ? philox::randn_at(a.seed, a.v_offset + static_cast<uint64_t>(k * a.rank + j))
                      : 0.0f;
        }
      }
      __syncthreads();

      #pragma unroll 4
      for (int kk = 0; kk < kBK; ++kk) {
        const float4 xa4 = *reinterpret_cast<const float4*>(xs + kk * kLd + ty * kTM);
        const float4 wa4 = *reinterpret_cast<const float4*>(ws + kk * kLd + tx * kTN);
        const float xr[kTM] = {xa4.x, xa4.y, xa4.z, xa4.w};
        const float wr[kTN] = {wa4.x, wa4.y, wa4.z, wa4.w};
        #pragma unroll
        for (int i = 0; i < kTM; ++i)
          #pragma unroll
          for (int j = 0; j < kTN; ++j) acc_b[i][j] = fmaf(xr[i], wr[j], acc_b[i][j]);
        if constexpr (kSeparate) {
          const float4 xp4 = SHARED ? xa4 : *reinterpret_cast<const float4*>(xps + kk * kLd + ty * kTM);
          const float4 wp4 = MODE == Mode::kFull ? *reinterpret_cast<const float4*>(wps + kk * kLd + tx * kTN) : wa4;
          const float xpr[kTM] = {xp4.x, xp4.y, xp4.z, xp4.w};
          const float wpr[kTN] = {wp4.x, wp4.y, wp4.z, wp4.w};
          #pragma unroll
          for (int i = 0; i < kTM; ++i)
            #pragma unroll
            for (int j = 0; j < kTN; ++j) acc_p[i][j] = fmaf(xpr[i], wpr[j], acc_p[i][j]);
        }
      }
      if constexpr (MODE == Mode::kLowRank) project_accumulate<RMAX>(xv, xps, vs, RMAX);
      __syncthreads();
    }
    __syncthreads();  // the bias buffers are visible even when K == 0

    // Low-rank / LoRA terms, added on top of the accumulators.
    float extra_b[kTM][kTN] = {};
    float extra_p[kTM][kTN] = {};
    if constexpr (MODE == Mode::kLowRank) {
      constexpr int kLdr = RMAX + 1;
      float* xvs = smem;                 // [kBM][kLdr]: x_pert @ V
      float* us = smem + kBM * kLdr;     // [kBN][kLdr]: U rows n0..n0+kBN
      #pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const int pair = tid + i * kThreads;
        xvs[(pair / RMAX) * kLdr + pair % RMAX] = xv[i];
      }
      for (int e = tid; e < kBN * RMAX; e += kThreads) {
        const int nn = e / RMAX, j = e % RMAX;
        const int64_t n = n0 + nn;
        us[nn * kLdr + j] = (n < N && j < a.rank)
                                ? philox::randn_at(a.u_seed, a.u_offset + static_cast<uint64_t>(n * a.rank + j))
                                : 0.0f;
      }
      __syncthreads();
      float sum[kTM][kTN] = {};
      for (int j = 0; j < a.rank; ++j) {
        float xr[kTM], ur[kTN];
        #pragma unroll
        for (int i = 0; i < kTM; ++i) xr[i] = xvs[(ty * kTM + i) * kLdr + j];
        #pragma unroll
        for (int jn = 0; jn < kTN; ++jn) ur[jn] = us[(tx * kTN + jn) * kLdr + j];
        #pragma unroll
        for (int i = 0; i < kTM; ++i)
          #pragma unroll
          for (int jn = 0; jn < kTN; ++jn) sum[i][jn] = fmaf(xr[i], ur[jn], sum[i][jn]);
      }
      #pragma unroll
      for (int i = 0; i < kTM; ++i)
        #pragma unroll
        for (int jn = 0; jn < kTN; ++jn) extra_p[i][jn] = a.lowrank_coef * sum[i][jn];
    }
    if constexpr (MODE == Mode::kLora) {
      constexpr int kLdc = kLoraChunk + 1;
      const T* __restrict__ lora_b = static_cast<const T*>(a.lora_b);
      const int rank = a.rank;
      float* xas = smem;                  // [kBM][kLdc]: x_base @ A.T, one chunk
      float* xaps = xas + kBM * kLdc;     // [kBM][kLdc]: x_pert @ (A + mu Z_A).T
      float* bs = xaps + kBM * kLdc;      // [kBN][kLdc]: B
      float* bps = bs + kBN * kLdc;       // [kBN][kLdc]: B + mu Z_B
      float lb[kTM][kTN] = {}, lp[kTM][kTN] = {};
      for (int c0 = 0; c0 < rank; c0 += kLoraChunk) {
        for (int e = tid; e < kBM * kLoraChunk; e += kThreads) {
          const int mm = e / kLoraChunk, j = e % kLoraChunk;
          const int64_t m = m0 + mm;
          const int jj = c0 + j;
          float s_b = 0.0f, s_p = 0.0f;
          if (m < M && jj < rank) {
            for (int s = 0; s < a.splits; ++s) {  // fixed order: deterministic
              s_b += a.lora_xa[((2 * static_cast<int64_t>(s) + 0) * M + m) * rank + jj];
              s_p += a.lora_xa[((2 * static_cast<int64_t>(s) + 1) * M + m) * rank + jj];
            }
          }
          xas[mm * kLdc + j] = s_b;
          xaps[mm * kLdc + j] = s_p;
        }
        for (int e = tid; e < kBN * kLoraChunk; e += kThreads) {
          const int nn = e / kLoraChunk, j = e % kLoraChunk;
          const int64_t n = n0 + nn;
          const int jj = c0 + j;
          float bv = 0.0f, z = 0.0f;
          if (n < N && jj < rank) {
            bv = to_float(lora_b[n * rank + jj]);
            z = philox::randn_at(a.seed, a.b_offset + static_cast<uint64_t>(n * rank + jj));
          }
          bs[nn * kLdc + j] = bv;
          bps[nn * kLdc + j] = bv + a.mu * z;
        }
        __syncthreads();
        #pragma unroll 4
        for (int j = 0; j < kLoraChunk; ++j) {
          float xr[kTM], xpr[kTM], br[kTN], bpr[kTN];
          #pragma unroll
          for (int i = 0; i < kTM; ++i) {
            xr[i] = xas[(ty * kTM + i) * kLdc + j];
            xpr[i] = xaps[(ty * kTM + i) * kLdc + j];
          }
          #pragma unroll
          for (int jn = 0; jn < kTN; ++jn) {
            br[jn] = bs[(tx * kTN + jn) * kLdc + j];
            bpr[jn] = bps[(tx * kTN + jn) * kLdc + j];
          }
          #pragma unroll
          for (int i = 0; i < kTM; ++i)
            #pragma unroll
            for (int jn = 0; jn < kTN; ++jn) {
              lb[i][jn] = fmaf(xr[i], br[jn], lb[i][jn]);
              lp[i][jn] = fmaf(xpr[i], bpr[jn], lp[i][jn]);
            }
        }
        __syncthreads();
      }
      #pragma unroll
      for (int i = 0; i < kTM; ++i)
        #pragma unroll
        for (int jn = 0; jn < kTN; ++jn) {
          extra_b[i][jn] = a.scale * lb[i][jn];
          extra_p[i][jn] = a.scale * lp[i][jn];
        }
    }

    T* __restrict__ y_base = static_cast<T*>(a.y_base);
    T* __restrict__ y_pert = static_cast<T*>(a.y_pert);
    #pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t m = m0 + ty * kTM + i;
      if (m >= M) continue;
      #pragma unroll
      for (int jn = 0; jn < kTN; ++jn) {
        const int nn = tx * kTN + jn;
        const int64_t n = n0 + nn;
        if (n >= N) continue;
        float yb = acc_b[i][jn];
        float yp;
        if constexpr (kSeparate) {
          yp = acc_p[i][jn];
        } else {
          yp = acc_b[i][jn];
        }
        if constexpr (HAS_BIAS) {
          yb += sbias[nn];
          yp += sbias[kBN + nn];
        }
        y_base[m * N + n] = from_float<T>(yb + extra_b[i][jn]);
        y_pert[m * N + n] = from_float<T>(yp + extra_p[i][jn]);
      }
    }
    __syncthreads();  // shared memory is rewritten by the next tile
  }
}

struct LoraDownArgs {
  const void* x;       // (M, K)
  const void* x_pert;  // (M, K); ignored when SHARED
  const void* lora_a;  // (rank, K)
  float* out;          // (splits, 2, M, rank)
  int64_t M, K;
  int rank;
  int64_t tiles_per_split;  // K tiles (of kBK) per blockIdx.y
  uint64_t seed, a_offset;
  float mu;
};

// out[s, 0] = x @ A.T and out[s, 1] = x_pert @ (A + mu Z_A).T over the K range of split s
// (blockIdx.y); Z_A[j, k] = randn(seed, a_offset + j*K + k) is made while staging A.
template <typename T, bool SHARED, int RMAX>
__global__ void __launch_bounds__(kThreads) lora_down_kernel(const LoraDownArgs a) {
  constexpr int kLdp = RMAX + 1;  // odd stride: the transposing store of A is conflict-free
  constexpr int kPairs = kBM * RMAX / kThreads;
  constexpr int kXTiles = SHARED ? 1 : 2;
  static_assert((kBM * RMAX) % kThreads == 0, "RMAX must split evenly");
  __shared__ __align__(16) float smem[kXTiles * kTileFloats + 2 * kBK * kLdp];
  float* xs = smem;
  float* xps = SHARED ? xs : smem + kTileFloats;
  float* as = smem + kXTiles * kTileFloats;  // [kBK][kLdp]: A.T
  float* aps = as + kBK * kLdp;              // [kBK][kLdp]: (A + mu Z_A).T

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ xp = SHARED ? x : static_cast<const T*>(a.x_pert);
  const T* __restrict__ lora_a = static_cast<const T*>(a.lora_a);
  const int64_t M = a.M, K = a.K;
  const int rank = a.rank;
  const int tid = threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t k_begin = split * a.tiles_per_split * kBK;
  const int64_t k_end_tiles = k_begin + a.tiles_per_split * kBK;
  const int64_t k_end = k_end_tiles < K ? k_end_tiles : K;
  const int64_t m_tiles = (M + kBM - 1) / kBM;

  for (int64_t mt = blockIdx.x; mt < m_tiles; mt += gridDim.x) {
    const int64_t m0 = mt * kBM;
    float acc_b[kPairs] = {};
    float acc_p[kPairs] = {};
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
      load_tile(xs, x, M, K, m0, k0);  // k_end is K or a multiple of kBK: a tile never crosses splits
      if constexpr (!SHARED) load_tile(xps, xp, M, K, m0, k0);
      for (int e = tid; e < RMAX * kBK; e += kThreads) {
        const int j = e / kBK, kk = e % kBK;
        const int64_t k = k0 + kk;
        float av = 0.0f, z = 0.0f;
        if (j < rank && k < K) {
          const int64_t flat = static_cast<int64_t>(j) * K + k;
          av = to_float(lora_a[flat]);
          z = philox::randn_at(a.seed, a.a_offset + static_cast<uint64_t>(flat));
        }
        as[kk * kLdp + j] = av;
        aps[kk * kLdp + j] = av + a.mu * z;
      }
      __syncthreads();
      project_accumulate<RMAX>(acc_b, xs, as, kLdp);
      project_accumulate<RMAX>(acc_p, xps, aps, kLdp);
      __syncthreads();
    }
    // Every split writes its partial, zeros for an empty K range included.
    #pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const int pair = tid + i * kThreads;
      const int mm = pair / RMAX, j = pair % RMAX;
      const int64_t m = m0 + mm;
      if (m < M && j < rank) {
        a.out[((2 * split + 0) * M + m) * rank + j] = acc_b[i];
        a.out[((2 * split + 1) * M + m) * rank + j] = acc_p[i];
      }
    }
  }
}

int grid_for_tiles(int64_t tiles) {
  return static_cast<int>(tiles < kMaxGrid ? (tiles > 0 ? tiles : 1) : kMaxGrid);
}

template <typename T, Mode MODE, int RMAX>
void launch_gemm(const GemmArgs& a, cudaStream_t stream) {
  const int64_t tiles = ((a.M + kBM - 1) / kBM) * ((a.N + kBN - 1) / kBN);
  const int grid = grid_for_tiles(tiles);
  const bool shared = a.x_pert == nullptr, bias = a.bias != nullptr;
  if (shared && bias) {
    perturbed_gemm_kernel<T, MODE, true, true, RMAX><<<grid, kThreads, 0, stream>>>(a);
  } else if (shared) {
    perturbed_gemm_kernel<T, MODE, true, false, RMAX><<<grid, kThreads, 0, stream>>>(a);
  } else if (bias) {
    perturbed_gemm_kernel<T, MODE, false, true, RMAX><<<grid, kThreads, 0, stream>>>(a);
  } else {
    perturbed_gemm_kernel<T, MODE, false, false, RMAX><<<grid, kThreads, 0, stream>>>(a);
  }
}

template <typename T>
void launch_perturbed_typed(const GemmArgs& a, cudaStream_t stream) {
  if (a.rank == 0) {
    launch_gemm<T, Mode::kFull, 0>(a, stream);
  } else if (a.rank <= 16) {
    launch_gemm<T, Mode::kLowRank, 16>(a, stream);
  } else {
    launch_gemm<T, Mode::kLowRank, kMaxLinearRank>(a, stream);
  }
}

template <typename T, int RMAX>
void launch_lora_down(const LoraDownArgs& a, int splits, cudaStream_t stream) {
  const dim3 grid(grid_for_tiles((a.M + kBM - 1) / kBM), splits);
  if (a.x_pert == nullptr) {
    lora_down_kernel<T, true, RMAX><<<grid, kThreads, 0, stream>>>(a);
  } else {
    lora_down_kernel<T, false, RMAX><<<grid, kThreads, 0, stream>>>(a);
  }
}

template <typename T>
cudaError_t launch_lora_typed(const LoraLinearArgs& p, cudaStream_t stream) {
  const int64_t k_tiles = (p.K + kBK - 1) / kBK;
  LoraDownArgs down{};
  down.x = p.x_base;
  down.x_pert = p.x_pert;
  down.lora_a = p.lora_a;
  down.out = p.workspace;
  down.M = p.M;
  down.K = p.K;
  down.rank = p.rank;
  down.tiles_per_split = (k_tiles + p.splits - 1) / p.splits;
  down.seed = p.seed;
  down.a_offset = p.a_offset;
  down.mu = p.mu;
  if (p.rank <= 16) {
    launch_lora_down<T, 16>(down, p.splits, stream);
  } else {
    launch_lora_down<T, kMaxLinearRank>(down, p.splits, stream);
  }
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;

  GemmArgs g{};
  g.x = p.x_base;
  g.x_pert = p.x_pert;
  g.weight = p.weight;
  g.bias = p.bias;
  g.y_base = p.y_base;
  g.y_pert = p.y_pert;
  g.M = p.M;
  g.N = p.N;
  g.K = p.K;
  g.seed = p.seed;
  g.mu = p.mu;
  g.rank = p.rank;
  g.lora_b = p.lora_b;
  g.lora_xa = p.workspace;
  g.splits = p.splits;
  g.scale = p.scale;
  g.b_offset = p.b_offset;
  launch_gemm<T, Mode::kLora, 0>(g, stream);
  return cudaGetLastError();
}

}  // namespace

int lora_split_count(int64_t M, int64_t K) {
  int sms = 132;
  int device = 0;
  int value = 0;
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && value > 0) {
    sms = value;
  } else {
    (void)cudaGetLastError();  // do not leave the failed query for the next launch check
  }
  const int64_t m_tiles = (M + kBM - 1) / kBM;
  const int64_t k_tiles = (K + kBK - 1) / kBK;
  int64_t splits = m_tiles > 0 ? (2 * static_cast<int64_t>(sms) + m_tiles - 1) / m_tiles : 1;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits > k_tiles) splits = k_tiles;
  return static_cast<int>(splits > 1 ? splits : 1);
}

cudaError_t launch_perturbed_linear(const PerturbedLinearArgs& p, cudaStream_t stream) {
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.rank < 0 || p.rank > kMaxLinearRank) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.y_base == nullptr || p.y_pert == nullptr) return cudaErrorInvalidValue;
  GemmArgs g{};
  g.x = p.x_base;
  g.x_pert = p.x_pert;
  g.weight = p.weight;
  g.bias = p.bias;
  g.y_base = p.y_base;
  g.y_pert = p.y_pert;
  g.M = p.M;
  g.N = p.N;
  g.K = p.K;
  g.seed = p.seed;
  g.weight_offset = p.weight_offset;
  g.bias_offset = p.bias_offset;
  g.mu = p.mu;
  g.rank = p.rank;
  g.u_seed = p.u_seed;
  g.u_offset = p.u_offset;
  g.v_offset = p.v_offset;
  g.lowrank_coef = p.rank > 0 ? static_cast<float>(static_cast<double>(p.mu) / std::sqrt(static_cast<double>(p.rank)))
                              : 0.0f;
  switch (p.kind) {
    case ScalarKind::kFloat32:
      launch_perturbed_typed<float>(g, stream);
      break;
    case ScalarKind::kBFloat16:
      launch_perturbed_typed<__nv_bfloat16>(g, stream);
      break;
    case ScalarKind::kFloat16:
      launch_perturbed_typed<__half>(g, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_lora_perturbed_linear(const LoraLinearArgs& p, cudaStream_t stream) {
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.rank < 1 || p.rank > kMaxLinearRank || p.splits < 1 ||
      p.splits > kMaxSplits) {
    return cudaErrorInvalidValue;
  }
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.y_base == nullptr || p.y_pert == nullptr || p.workspace == nullptr) return cudaErrorInvalidValue;
  switch (p.kind) {
    case ScalarKind::kFloat32:
      return launch_lora_typed<float>(p, stream);
    case ScalarKind::kBFloat16:
      return launch_lora_typed<__nv_bfloat16>(p, stream);
    case ScalarKind::kFloat16:
      return launch_lora_typed<__half>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace heron
