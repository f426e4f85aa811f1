// Fused ZO updates. Every parameter block of at most kNormalBlock elements is handled independently: its
// combined direction G is built in a stack buffer (q generated blocks, or the low-rank product),
// then the block is updated: a float32 parameter in place, a low-precision one loaded as float32,
// updated and stored back. The parameter (and moments) a few blocks ahead are prefetched while a
// block's direction is generated, so the memory traffic overlaps the arithmetic. Peak extra memory: a few
// kNormalBlock-float stack buffers per thread in full mode; in low-rank mode also U (rows x rank)
// and the q transposed V_j (q x rank x cols) float32, i.e. 4 * rank * (rows + q*cols) bytes.
// The float math mirrors heron.kernels.reference operation by operation (float32, scalars rounded to
// float32 as torch does), so results agree with it up to the generator's last-bit differences.
#include "cpu/zo_update_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

// No FMA contraction: the AVX-512 clones below must round like the AVX2 and default ones (and like
// the reference's separate operations), so results do not depend on the machine's instruction set.
#pragma GCC optimize("fp-contract=off")

namespace heron {
namespace cpu {
namespace {

// Parameters smaller than this run on one thread (thread start-up costs more).
constexpr int64_t kParallelGrain = 1 << 14;

// The hyper-parameters as float32, derived in double like the Python reference does.
struct AdamScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;   // lr / (1 - beta1^step)
  float sqrt_bias2;  // sqrt(1 - beta2^step)
  float eps, weight_decay, decay;  // decay = 1 - lr * weight_decay (AdamW)
  bool decoupled;
};

AdamScalars adam_scalars(const AdamHyper& h) {
  const double bias1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bias2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
  AdamScalars s;
  s.beta1 = static_cast<float>(h.beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.step_size = static_cast<float>(h.lr / bias1);
  s.sqrt_bias2 = static_cast<float>(std::sqrt(bias2));
  s.eps = static_cast<float>(h.eps);
  s.weight_decay = static_cast<float>(h.weight_decay);
  s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.decoupled = h.decoupled_weight_decay;
  return s;
}

// g[t] = weight * z[t] (first) or g[t] + weight * z[t] (accumulate).
__attribute__((target_clones("avx512f", "avx2", "default")))
void scale_into(float* g, const float* z, float weight, int64_t count, bool accumulate) {
  if (accumulate) {
#pragma omp simd
    for (int64_t t = 0; t < count; ++t) g[t] = g[t] + weight * z[t];
  } else {
#pragma omp simd
    for (int64_t t = 0; t < count; ++t) g[t] = weight * z[t];
  }
}

// Full mode: the combined direction is weight * g[t] with the returned weight: for one direction
// g = randn(seeds[0], offset + start + t) and weight = grads[0] (the update rule applies it, one pass
// fewer); otherwise g[t] = sum_j grads[j] * randn(seeds[j], ...) and weight 1 (zeros for q = 0).
// t < count <= kNormalBlock.
float full_direction(const DirectionSpec& d, int64_t start, int64_t count, float* g) {
  if (d.q == 0) {
    std::fill(g, g + count, 0.0f);
    return 1.0f;
  }
  const uint64_t first = d.offset + static_cast<uint64_t>(start);
  randn_block(g, count, static_cast<uint64_t>(d.seeds[0]), first);
  if (d.q == 1) return d.grads[0];
  scale_into(g, g, d.grads[0], count, false);
  float z[kNormalBlock];
  for (int64_t j = 1; j < d.q; ++j) {
    randn_block(z, count, static_cast<uint64_t>(d.seeds[j]), first);
    scale_into(g, z, d.grads[j], count, true);
  }
  return 1.0f;
}

// The low-rank factors of all q directions, float32.
struct LowRankFactors {
  int64_t rank = 0, cols = 0;
  float sqrt_rank = 1.0f;
  std::vector<float> u;   // (rows, rank)
  std::vector<float> vt;  // (q, rank, cols): V_j transposed, so the column loop is contiguous
};

LowRankFactors make_factors(const ParamSpec& p, const DirectionSpec& d) {
  LowRankFactors f;
  f.rank = d.rank;
  f.cols = p.cols;
  f.sqrt_rank = static_cast<float>(std::sqrt(static_cast<double>(d.rank)));
  f.u.resize(static_cast<size_t>(p.rows * d.rank));
  philox_randn(f.u.data(), ScalarKind::kFloat32, p.rows * d.rank, d.u_seed, d.u_offset);
  f.vt.resize(static_cast<size_t>(d.q * d.rank * p.cols));
  std::vector<float> v(static_cast<size_t>(p.cols * d.rank));  // V_j (cols, rank)
  for (int64_t j = 0; j < d.q; ++j) {
    philox_randn(v.data(), ScalarKind::kFloat32, p.cols * d.rank, static_cast<uint64_t>(d.seeds[j]), d.v_offset);
    float* vt_j = f.vt.data() + j * d.rank * p.cols;
    for (int64_t k = 0; k < p.cols; ++k) {
      for (int64_t r = 0; r < d.rank; ++r) vt_j[r * p.cols + k] = v[k * d.rank + r];
    }
  }
  return f;
}

// g[t] = sum_j grads[j] * (sum_r u_row[r] * V_j[col + t, r]) / sqrt(rank), within one row.
__attribute__((target_clones("avx512f", "avx2", "default")))
void lowrank_segment(float* g, int64_t len, const float* u_row, const float* vt_col, const LowRankFactors& f,
                     const float* grads, int64_t q) {
  float s[kNormalBlock];
  for (int64_t t = 0; t < len; ++t) g[t] = 0.0f;
  for (int64_t j = 0; j < q; ++j) {
    const float* vt_j = vt_col + j * f.rank * f.cols;
    for (int64_t t = 0; t < len; ++t) s[t] = 0.0f;
    for (int64_t r = 0; r < f.rank; ++r) {
      const float u = u_row[r];
      const float* v = vt_j + r * f.cols;
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) s[t] = s[t] + u * v[t];
    }
    const float weight = grads[j];
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) g[t] = g[t] + weight * (s[t] / f.sqrt_rank);
  }
}

// Low-rank mode over flat elements [start, start + count), split at row ends.
void lowrank_direction(const DirectionSpec& d, const LowRankFactors& f, int64_t start, int64_t count, float* g) {
  for (int64_t t = 0; t < count;) {
    const int64_t row = (start + t) / f.cols, col = (start + t) % f.cols;
    const int64_t len = std::min(count - t, f.cols - col);
    lowrank_segment(g + t, len, f.u.data() + row * f.rank, f.vt.data() + col, f, d.grads, d.q);
    t += len;
  }
}

// Prefetches `bytes` bytes from `ptr` into the cache (no-op for null).
inline void prefetch(const void* ptr, int64_t bytes) {
  if (ptr == nullptr) return;
  const char* bytes_ptr = static_cast<const char*>(ptr);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(bytes_ptr + b, 1, 3);
}

// Blocks ahead of the one being updated whose memory is prefetched (generating one block's
// direction takes about as long as fetching a few blocks from DRAM).
constexpr int64_t kPrefetchBlocks = 2;

// Calls rule(start, count, p, g, weight) per block with p the parameter block as float32 (a float32
// parameter's own memory; otherwise a converted copy stored back afterwards) and weight * g the
// combined direction over the block. `moments` (null or two float32 arrays of numel) are prefetched too.
template <typename Rule>
void update_blocks(const ParamSpec& param, const DirectionSpec& d, float* const (&moments)[2], Rule rule) {
  LowRankFactors factors;
  if (d.rank > 0) factors = make_factors(param, d);
  const bool in_place = param.kind == ScalarKind::kFloat32;
  const int64_t element_size = in_place ? 4 : 2;
  char* data = static_cast<char*>(param.data);
  // Full directions: blocks cut at the stream's group boundaries (each group generated once).
  const StreamBlocks blocks{param.numel, d.rank > 0 ? 0 : d.offset};
#pragma omp parallel for schedule(static) if (param.numel >= kParallelGrain)
  for (int64_t b = 0; b < blocks.count(); ++b) {
    const int64_t start = blocks.start(b);
    const int64_t count = blocks.size(b);
    if (b + kPrefetchBlocks < blocks.count()) {
      const int64_t ahead = blocks.start(b + kPrefetchBlocks), ahead_count = blocks.size(b + kPrefetchBlocks);
      prefetch(data + ahead * element_size, ahead_count * element_size);
      for (float* moment : moments) prefetch(moment == nullptr ? nullptr : moment + ahead, ahead_count * 4);
    }
    float g[kNormalBlock], converted[kNormalBlock];
    float weight = 1.0f;
    if (d.rank > 0) {
      lowrank_direction(d, factors, start, count, g);
    } else {
      weight = full_direction(d, start, count, g);
    }
    void* block = data + start * element_size;
    float* p = in_place ? static_cast<float*>(block) : converted;
    if (!in_place) load_as_float(p, block, param.kind, count);
    rule(start, count, p, g, weight);
    if (!in_place) store_from_float(block, param.kind, p, count);
  }
}

// p = p - lr * (w g + weight_decay * p)
__attribute__((target_clones("avx512f", "avx2", "default")))
void sgd_rule(float* p, const float* g, float w, int64_t count, float lr, float weight_decay) {
#pragma omp simd
  for (int64_t t = 0; t < count; ++t) p[t] = p[t] - lr * (w * g[t] + weight_decay * p[t]);
}

// The Adam / AdamW step of heron.kernels.reference.zo_adam_update on one block with gradient w g (m, v
// updated in place).
__attribute__((target_clones("avx512f", "avx2", "default")))
void adam_rule(float* p, float* m, float* v, const float* g_in, float w, int64_t count, const AdamScalars& s) {
#pragma omp simd
  for (int64_t t = 0; t < count; ++t) {
    float param = p[t], g = w * g_in[t];
    if (s.decoupled) {
      param = param * s.decay;
    } else {
      g = g + s.weight_decay * param;
    }
    const float m_new = s.beta1 * m[t] + s.one_minus_beta1 * g;
    const float v_new = s.beta2 * v[t] + s.one_minus_beta2 * g * g;
    m[t] = m_new;
    v[t] = v_new;
    p[t] = param - s.step_size * m_new / (std::sqrt(v_new) / s.sqrt_bias2 + s.eps);
  }
}

// p = p + w g
__attribute__((target_clones("avx512f", "avx2", "default")))
void add_rule(float* p, const float* g, float w, int64_t count) {
#pragma omp simd
  for (int64_t t = 0; t < count; ++t) p[t] = p[t] + w * g[t];
}

}  // namespace

void zo_sgd_update(const ParamSpec& param, const DirectionSpec& direction, double lr, double weight_decay) {
  const float lr_f = static_cast<float>(lr), wd_f = static_cast<float>(weight_decay);
  update_blocks(param, direction, {nullptr, nullptr},
                [=](int64_t, int64_t count, float* p, const float* g, float w) { sgd_rule(p, g, w, count, lr_f, wd_f); });
}

void zo_adam_update(const ParamSpec& param, float* exp_avg, float* exp_avg_sq, const DirectionSpec& direction,
                    const AdamHyper& hyper) {
  const AdamScalars s = adam_scalars(hyper);
  update_blocks(param, direction, {exp_avg, exp_avg_sq},
                [=, &s](int64_t start, int64_t count, float* p, const float* g, float w) {
                  adam_rule(p, exp_avg + start, exp_avg_sq + start, g, w, count, s);
                });
}

void perturb(const ParamSpec& param, uint64_t seed, uint64_t offset, double alpha) {
  const int64_t seeds[1] = {static_cast<int64_t>(seed)};
  const float grads[1] = {static_cast<float>(alpha)};
  const DirectionSpec direction{seeds, grads, 1, offset, 0, 0, 0, 0};
  update_blocks(param, direction, {nullptr, nullptr},
                [](int64_t, int64_t count, float* p, const float* g, float w) { add_rule(p, g, w, count); });
}

}  // namespace cpu
}  // namespace heron
