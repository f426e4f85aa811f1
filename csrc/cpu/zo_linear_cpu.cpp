// Perturbed linear layers: plain ATen GEMMs (MKL) into column blocks of the outputs, the direction
// generated tile by tile into a reusable float32 buffer of at most linear_tile_bytes().
//
// Work split: every task runs on one thread, its GEMMs single-threaded (SequentialBlas), and the
// partition depends only on the shapes and the tile budget, so results are bit-identical for any
// thread count (MKL's own multi-threaded GEMM is not). Every sum is float32.
//   * Frozen products x W^T + b (the base stream; both streams for low rank and LoRA): a grid of
//     output tiles of up to 1024 x 1024, one GEMM per tile and stream, then the tile's rank-r terms.
//   * The perturbed product of a full direction: fixed row blocks of the weight, each swept in K
//     tiles of the buffer's width, so Z is generated once per weight element; one block per task,
//     or, for tall inputs on narrow layers, all threads on each tile (cooperative_pert_product).
//
// Peak extra memory beyond the two (M, N) outputs, in bytes (T = linear_tile_bytes(), 2 MiB by
// default, P = threads; r = rank):
//   float32 inputs
//     full (shared input or two inputs)   P*T + 8N (z_b, b + mu z_b)
//     low rank                            4r(N + K) (U, V) + 4Mr (x_pert V) + 8N
//     LoRA                                4r(N + K) (A + mu Z_A, B + mu Z_B) + 8Mr (x A^T, x_pert A_pert^T)
//   bfloat16 / float16 inputs: the same plus P*T for low rank and LoRA (weight tiles converted to
//   float32; the weight is never converted whole), float32 copies of x and x_pert (4MK each),
//   bias (4N), LoRA A and B (4r(N + K)), and the two float32 outputs (8MN) converted to x's dtype
//   at the end.
#include "cpu/zo_linear_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "cpu/philox_cpu.h"

// MKL (linked into libtorch_cpu on x86) exports this; weak so a torch built on another BLAS still
// loads (that BLAS, e.g. OpenBLAS, already runs single-threaded inside an OpenMP region).
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace heron {
namespace cpu {
namespace {

// Makes the BLAS single-threaded on this thread for the guard's lifetime. ATen turns MKL's dynamic
// threading off, so inside a parallel region MKL would otherwise partition each GEMM for the
// global thread count, and the result bits would depend on it.
class SequentialBlas {
 public:
  SequentialBlas() : previous_(set_local_threads(1)) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  static int set_local_threads(int threads) {
    if (MKL_Set_Num_Threads_Local == nullptr) return 0;
    // ATen initialises each thread's settings lazily on its first parallel call, and that resets
    // MKL's thread-local count: do it first, so it cannot undo the setting below mid-task.
    at::get_num_threads();
    return MKL_Set_Num_Threads_Local(threads);
  }

  int previous_;
};

std::atomic<int64_t> g_tile_bytes{int64_t{2} << 20};

// Rows of x per task of the skinny (M, K) x (K, r) products.
constexpr int64_t kRowsPerTask = 256;
// A weight row block has at most this many rows (the width of each GEMM call)...
constexpr int64_t kMaxBlockRows = 512;
// ...and layers are cut into at least this many blocks (when each keeps kMinBlockRows rows), so
// small layers still spread over the threads.
constexpr int64_t kMinBlocks = 8;
constexpr int64_t kMinBlockRows = 32;

// The fixed partition of an (N, K) weight: row blocks of `rows` (the last may be shorter), each
// swept in K tiles of `cols` columns; rows * cols fits the tile budget.
struct Partition {
  int64_t n, k;
  int64_t rows, cols, blocks;
};

// The tile budget in float32 elements.
int64_t tile_budget_floats() {
  return std::max<int64_t>(1, g_tile_bytes.load() / static_cast<int64_t>(sizeof(float)));
}

// min_blocks: the layer is cut into at least this many blocks when each keeps kMinBlockRows rows
// (kMinBlocks for one block per task; 1 when all threads share each block).
Partition partition(int64_t n, int64_t k, int64_t min_blocks = kMinBlocks) {
  const int64_t budget = tile_budget_floats();
  int64_t rows = std::min(n, kMaxBlockRows);
  rows = std::min(rows, std::max(kMinBlockRows, (n + min_blocks - 1) / min_blocks));
  rows = std::max<int64_t>(1, std::min(rows, budget));
  const int64_t cols = std::max<int64_t>(1, std::min(k, budget / rows));
  // Even out the blocks: the same count, sizes differing by at most one.
  const int64_t blocks = n == 0 ? 0 : (n + rows - 1) / rows;
  if (blocks > 0) rows = (n + blocks - 1) / blocks;
  return {n, k, rows, cols, blocks};
}

// Output tiles of the frozen products are at most kMaxTile x kMaxTile: MKL's single-threaded GEMM
// on a 1024 x 1024 output tile runs at ~97% of its whole-matrix speed, on a 128-column block at ~72%.
// Until there are kMinBlocks tasks they are halved: the row side while it is the longer one and
// above kKeepRows (short GEMMs lose more than narrow ones), else the column side down to
// 2 * kMinTile, else the row side down to 2 * kMinTile.
constexpr int64_t kMaxTile = 1024;
constexpr int64_t kMinTile = 64;
constexpr int64_t kKeepRows = 512;

struct Grid {
  int64_t m, n;
  int64_t tile_m, tile_n;    // tile sizes (the last tile of each axis may be shorter)
  int64_t tiles_m, tiles_n;  // tiles per axis
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Grid output_grid(int64_t m, int64_t n) {
  if (m == 0 || n == 0) return {m, n, 1, 1, 0, 0};
  int64_t tile_m = std::max<int64_t>(1, std::min(m, kMaxTile)), tile_n = std::max<int64_t>(1, std::min(n, kMaxTile));
  while (ceil_div(m, tile_m) * ceil_div(n, tile_n) < kMinBlocks) {
    if (tile_m >= tile_n && tile_m > kKeepRows) {
      tile_m = ceil_div(tile_m, 2);
    } else if (tile_n >= 2 * kMinTile) {
      tile_n = ceil_div(tile_n, 2);
    } else if (tile_m >= 2 * kMinTile) {
      tile_m = ceil_div(tile_m, 2);
    } else {
      break;
    }
  }
  // Even out the tiles: the same count per axis, sizes differing by at most one.
  const int64_t tiles_m = ceil_div(m, tile_m), tiles_n = ceil_div(n, tile_n);
  return {m, n, ceil_div(m, tiles_m), ceil_div(n, tiles_n), tiles_m, tiles_n};
}

// Calls body(n0, rows, buffer) for every row block, blocks spread over the threads; `buffer` is a
// float32 tensor of rows * cols elements private to the thread, allocated once per thread (and
// only when `with_buffer`: float32 frozen products need none).
template <typename Body>
void for_each_block(const Partition& p, bool with_buffer, Body body) {
  at::parallel_for(0, p.blocks, 1, [&](int64_t first, int64_t last) {
    const SequentialBlas sequential;
    at::Tensor buffer = with_buffer ? at::empty({p.rows * p.cols}, at::kFloat) : at::Tensor();
    for (int64_t block = first; block < last; ++block) {
      const int64_t n0 = block * p.rows;
      body(n0, std::min(p.rows, p.n - n0), buffer);
    }
  });
}

// Calls fn(k0, tile) for the K tiles of a block of `rows` weight rows; tile is a contiguous
// (rows, cols) view of the buffer.
template <typename Fn>
void for_each_k_tile(const Partition& p, int64_t rows, at::Tensor& buffer, Fn fn) {
  for (int64_t k0 = 0; k0 < p.k; k0 += p.cols) {
    const int64_t cols = std::min(p.cols, p.k - k0);
    at::Tensor tile = buffer.narrow(0, 0, rows * cols).view({rows, cols});
    fn(k0, tile);
  }
}

// tile = base + alpha * Z at weight position (n0, k0), Z keyed (seed, offset) on a (N, K) tensor
// (base null: alpha * Z; base may be the tile itself). Single-threaded inside a block task.
void fill_direction(at::Tensor& tile, uint64_t seed, uint64_t offset, int64_t k_total, int64_t n0, int64_t k0,
                    float alpha, const float* base, int64_t ld_base) {
  const DirectionTile key{seed, offset, k_total, n0, n0 + tile.size(0), k0, k0 + tile.size(1)};
  philox_randn_tile(tile.data_ptr<float>(), tile.size(1), key, alpha, base, ld_base);
}

// The weight tile at (n0, k0) as float32 into `tile`.
void load_weight_tile(at::Tensor& tile, const at::Tensor& weight, int64_t n0, int64_t k0) {
  tile.copy_(weight.narrow(0, n0, tile.size(0)).narrow(1, k0, tile.size(1)));
}

// y += alpha * x[:, k0:k0+cols] @ tile^T, y a column block of an output: BLAS writes the strided
// slice directly (its row stride N is a valid leading dimension).
void add_tile_product(at::Tensor& y, const at::Tensor& x, const at::Tensor& tile, int64_t k0, double alpha) {
  y.addmm_(x.narrow(1, k0, tile.size(1)), tile.t(), 1.0, alpha);
}

// float32 tensor of shape `sizes` whose flat element i is randn(seed, offset + i).
at::Tensor direction(uint64_t seed, uint64_t offset, at::IntArrayRef sizes) {
  at::Tensor out = at::empty(sizes, at::kFloat);
  philox_randn(out.data_ptr<float>(), ScalarKind::kFloat32, out.numel(), seed, offset);
  return out;
}

// base + alpha * Z over a whole (rows, cols) float32 tensor, Z keyed (seed, offset): one pass.
at::Tensor perturbed_copy(const at::Tensor& base, uint64_t seed, uint64_t offset, float alpha) {
  at::Tensor out = at::empty_like(base);
  const int64_t rows = base.size(0), cols = base.size(1);
  const DirectionTile key{seed, offset, cols, 0, rows, 0, cols};
  philox_randn_tile(out.data_ptr<float>(), cols, key, alpha, base.data_ptr<float>(), cols);
  return out;
}

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

std::optional<at::Tensor> as_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return as_float(*t);
}

// (0, N) outputs for an empty batch: nothing to generate or multiply.
std::tuple<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& x, const at::Tensor& weight) {
  return {x.new_empty({0, weight.size(0)}), x.new_empty({0, weight.size(0)})};
}

at::Tensor to_dtype(const at::Tensor& y, at::ScalarType dtype) { return y.scalar_type() == dtype ? y : y.to(dtype); }

// x (M, K) @ mat (K, r) -> float32 (M, r), in fixed blocks of rows (thread-count independent).
at::Tensor skinny_product(const at::Tensor& x, const at::Tensor& mat) {
  const int64_t m = x.size(0);
  at::Tensor out = at::empty({m, mat.size(1)}, at::kFloat);
  const int64_t tasks = (m + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    const SequentialBlas sequential;
    for (int64_t task = first; task < last; ++task) {
      const int64_t m0 = task * kRowsPerTask, rows = std::min(kRowsPerTask, m - m0);
      at::Tensor out_rows = out.narrow(0, m0, rows);
      at::mm_out(out_rows, x.narrow(0, m0, rows), mat);
    }
  });
  return out;
}

// An output piece whose columns are n0.. of the (M, N) output, set to `row` (N,) broadcast, or zeros.
void init_columns(at::Tensor& y_cols, const std::optional<at::Tensor>& row, int64_t n0) {
  if (row.has_value()) {
    y_cols.copy_(row->narrow(0, n0, y_cols.size(1)).unsqueeze(0).expand_as(y_cols));
  } else {
    y_cols.zero_();
  }
}

// One stream of a frozen product: y = x_f @ W^T + bias.
struct FrozenStream {
  const at::Tensor* x_f;                 // (M, K) float32
  at::Tensor* y;                         // (M, N) float32 output
  const std::optional<at::Tensor>* bias; // (N,) float32 or none
};

// The frozen products of one or two streams over the output grid:
// y_s[tile] = x_s[tile rows] @ W[tile cols]^T + bias_s[tile cols], then
// epilogue(m0, m_rows, n0, n_cols) on the same thread (the tile's rank-r terms). A float32 weight
// goes to the GEMM as it is; a low-precision one is converted in K tiles of the buffer's budget
// (once for both streams).
template <typename Epilogue>
void frozen_products(const at::Tensor& weight, const FrozenStream& first, const FrozenStream* second,
                     Epilogue epilogue) {
  const int64_t count = second == nullptr ? 1 : 2;
  const FrozenStream* streams[2] = {&first, second};
  const int64_t k = weight.size(1);
  const Grid g = output_grid(first.x_f->size(0), weight.size(0));
  const bool convert = weight.scalar_type() != at::kFloat;
  const Partition k_tiles{g.n, k, g.tile_n, std::max<int64_t>(1, std::min(k, tile_budget_floats() / g.tile_n)), 0};
  at::parallel_for(0, g.tiles_m * g.tiles_n, 1, [&](int64_t first_task, int64_t last_task) {
    const SequentialBlas sequential;
    at::Tensor buffer = convert ? at::empty({k_tiles.rows * k_tiles.cols}, at::kFloat) : at::Tensor();
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t m0 = (task / g.tiles_n) * g.tile_m, n0 = (task % g.tiles_n) * g.tile_n;
      const int64_t m_rows = std::min(g.tile_m, g.m - m0), n_cols = std::min(g.tile_n, g.n - n0);
      at::Tensor tiles[2], x_rows[2];
      for (int64_t s = 0; s < count; ++s) {
        tiles[s] = streams[s]->y->narrow(0, m0, m_rows).narrow(1, n0, n_cols);
        x_rows[s] = streams[s]->x_f->narrow(0, m0, m_rows);
        init_columns(tiles[s], *streams[s]->bias, n0);
      }
      if (convert) {
        for_each_k_tile(k_tiles, n_cols, buffer, [&](int64_t k0, at::Tensor& tile) {
          load_weight_tile(tile, weight, n0, k0);
          for (int64_t s = 0; s < count; ++s) add_tile_product(tiles[s], x_rows[s], tile, k0, 1.0);
        });
      } else {
        const at::Tensor w_block = weight.narrow(0, n0, n_cols);
        for (int64_t s = 0; s < count; ++s) tiles[s].addmm_(x_rows[s], w_block.t());
      }
      epilogue(m0, m_rows, n0, n_cols);
    }
  });
}

// Everything the full-direction block bodies read.
struct FullProblem {
  const at::Tensor& x_f;                      // (M, K) float32
  const std::optional<at::Tensor>& x_pert_f;  // (M, K) float32 or none
  const at::Tensor& weight;                   // (N, K), x's dtype
  const std::optional<at::Tensor>& bias_f;    // (N,) float32 or none
  const std::optional<at::Tensor>& z_b;       // (N,) float32 or none
  const std::optional<at::Tensor>& b_pert;    // bias_f + mu z_b or none
  const LinearKey& key;
  float mu;
};

// The perturbed stream's first term over the tile (m0.., n0..): with a shared input, the base
// tile plus mu z_b (the full and low-rank paths; the frozen product is computed once).
void copy_base_tile(const FullProblem& f, const at::Tensor& y_base, at::Tensor& y_pert, int64_t m0, int64_t m_rows,
                    int64_t n0, int64_t n_cols) {
  at::Tensor pert_tile = y_pert.narrow(0, m0, m_rows).narrow(1, n0, n_cols);
  pert_tile.copy_(y_base.narrow(0, m0, m_rows).narrow(1, n0, n_cols));
  if (f.z_b.has_value()) pert_tile.add_(f.z_b->narrow(0, n0, n_cols), f.mu);
}

// The K tile (n0.., k0..) of the perturbed stream's weight: Z with a shared input (its product
// is scaled by mu), W + mu Z with two inputs (float32 W read in place; a low-precision tile
// converted, then perturbed in place).
void fill_pert_tile(const FullProblem& f, at::Tensor& tile, int64_t n0, int64_t k0, bool shared) {
  const int64_t k = f.weight.size(1);
  if (shared) {
    fill_direction(tile, f.key.seed, f.key.weight_offset, k, n0, k0, 1.0f, nullptr, 0);
  } else if (f.weight.scalar_type() == at::kFloat) {
    fill_direction(tile, f.key.seed, f.key.weight_offset, k, n0, k0, f.mu, f.weight.data_ptr<float>() + n0 * k + k0,
                   k);
  } else {
    load_weight_tile(tile, f.weight, n0, k0);
    fill_direction(tile, f.key.seed, f.key.weight_offset, k, n0, k0, f.mu, tile.data_ptr<float>(), tile.size(1));
  }
}

// The perturbed stream's columns n0..n0+rows before the products: the copied base tile plus mu z_b
// with a shared input (done by the frozen products' epilogue), b + mu z_b with two inputs.
at::Tensor pert_columns(const FullProblem& f, at::Tensor& y_pert, int64_t n0, int64_t rows, bool shared) {
  at::Tensor pert_cols = y_pert.narrow(1, n0, rows);
  if (!shared) init_columns(pert_cols, f.b_pert, n0);
  return pert_cols;
}

// One row block of the perturbed product, one task: y_pert[:, block] += x @ (mu Z)^T (shared input)
// or x_pert @ (W + mu Z)^T, tile by tile.
void full_pert_block(const Partition& p, const FullProblem& f, at::Tensor& y_pert, int64_t n0, int64_t rows,
                     at::Tensor& buffer, bool shared) {
  at::Tensor pert_cols = pert_columns(f, y_pert, n0, rows, shared);
  const at::Tensor& x_rows = shared ? f.x_f : *f.x_pert_f;
  for_each_k_tile(p, rows, buffer, [&](int64_t k0, at::Tensor& tile) {
    fill_pert_tile(f, tile, n0, k0, shared);
    add_tile_product(pert_cols, x_rows, tile, k0, shared ? f.mu : 1.0);
  });
}

// The perturbed product of a full direction for tall inputs (at least kCoopMinRows rows) whose
// per-thread row blocks would be narrow (fewer than kCoopBelowRows weight rows, where MKL's
// single-threaded GEMM slows down; with more, the per-block tasks below overlap generation and
// GEMMs better): weight row blocks of up to kMaxBlockRows rows, one at a time; each K
// tile of W + mu Z (or Z) is generated by all threads together into one buffer (philox_randn_tile
// splits it; every element depends only on its index), then multiplied by all threads, each taking
// fixed chunks of kCoopChunkRows input rows. Z is still generated once per element, the GEMMs stay
// wide, and the partition depends only on the shapes.
constexpr int64_t kCoopChunkRows = 256;
constexpr int64_t kCoopMinRows = 4 * kCoopChunkRows;
constexpr int64_t kCoopBelowRows = 256;

void cooperative_pert_product(const FullProblem& f, at::Tensor& y_pert, bool shared) {
  const int64_t m = f.x_f.size(0), n = f.weight.size(0);
  const Partition p = partition(n, f.weight.size(1), /*min_blocks=*/1);
  at::Tensor buffer = at::empty({p.rows * p.cols}, at::kFloat);
  const at::Tensor& x_rows = shared ? f.x_f : *f.x_pert_f;
  const int64_t chunks = ceil_div(m, kCoopChunkRows);
  for (int64_t block = 0; block < p.blocks; ++block) {
    const int64_t n0 = block * p.rows, block_rows = std::min(p.rows, n - n0);
    at::Tensor pert_cols = pert_columns(f, y_pert, n0, block_rows, shared);
    for_each_k_tile(p, block_rows, buffer, [&](int64_t k0, at::Tensor& tile) {
      fill_pert_tile(f, tile, n0, k0, shared);  // all threads: not inside a parallel region
      at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
        const SequentialBlas sequential;
        for (int64_t chunk = first; chunk < last; ++chunk) {
          const int64_t m0 = chunk * kCoopChunkRows, chunk_rows = std::min(kCoopChunkRows, m - m0);
          at::Tensor y_rows = pert_cols.narrow(0, m0, chunk_rows);
          add_tile_product(y_rows, x_rows.narrow(0, m0, chunk_rows), tile, k0, shared ? f.mu : 1.0);
        }
      });
    });
  }
}

std::tuple<at::Tensor, at::Tensor> full_linear(const FullProblem& f) {
  const int64_t m = f.x_f.size(0), n = f.weight.size(0);
  at::Tensor y_base = at::empty({m, n}, at::kFloat), y_pert = at::empty({m, n}, at::kFloat);
  const bool shared = !f.x_pert_f.has_value();
  frozen_products(f.weight, FrozenStream{&f.x_f, &y_base, &f.bias_f}, nullptr,
                  [&](int64_t m0, int64_t m_rows, int64_t n0, int64_t n_cols) {
                    if (shared) copy_base_tile(f, y_base, y_pert, m0, m_rows, n0, n_cols);
                  });
  const Partition p = partition(n, f.weight.size(1));
  if (m >= kCoopMinRows && p.rows < kCoopBelowRows) {
    cooperative_pert_product(f, y_pert, shared);
    return {y_base, y_pert};
  }
  for_each_block(p, /*with_buffer=*/true, [&](int64_t n0, int64_t rows, at::Tensor& buffer) {
    full_pert_block(p, f, y_pert, n0, rows, buffer, shared);
  });
  return {y_base, y_pert};
}

// Low rank: y_pert = [y_base + mu z_b | x_pert W^T + b + mu z_b] + mu ((x_pert V) U^T) / sqrt(rank).
std::tuple<at::Tensor, at::Tensor> lowrank_linear(const FullProblem& f) {
  const int64_t m = f.x_f.size(0), n = f.weight.size(0), k = f.weight.size(1);
  const at::Tensor& x_pert_f = f.x_pert_f.has_value() ? *f.x_pert_f : f.x_f;
  const at::Tensor u = direction(f.key.u_seed, f.key.u_offset, {n, f.key.rank});  // (N, r)
  const at::Tensor v = direction(f.key.seed, f.key.v_offset, {k, f.key.rank});    // (K, r)
  const at::Tensor xv = skinny_product(x_pert_f, v);                              // (M, r)
  const double alpha = static_cast<double>(f.mu) / std::sqrt(static_cast<double>(f.key.rank));
  at::Tensor y_base = at::empty({m, n}, at::kFloat), y_pert = at::empty({m, n}, at::kFloat);
  const bool shared = !f.x_pert_f.has_value();
  const FrozenStream base{&f.x_f, &y_base, &f.bias_f}, pert{&x_pert_f, &y_pert, &f.b_pert};
  frozen_products(f.weight, base, shared ? nullptr : &pert, [&](int64_t m0, int64_t m_rows, int64_t n0, int64_t n_cols) {
    if (shared) copy_base_tile(f, y_base, y_pert, m0, m_rows, n0, n_cols);
    y_pert.narrow(0, m0, m_rows).narrow(1, n0, n_cols).addmm_(xv.narrow(0, m0, m_rows), u.narrow(0, n0, n_cols).t(),
                                                                1.0, alpha);
  });
  return {y_base, y_pert};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> perturbed_linear(const at::Tensor& x_base, const std::optional<at::Tensor>& x_pert,
                                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                    const LinearKey& key, double mu) {
  if (x_base.size(0) == 0) return empty_outputs(x_base, weight);
  const float mu_f = static_cast<float>(mu);
  const at::Tensor x_f = as_float(x_base);
  const std::optional<at::Tensor> x_pert_f = as_float(x_pert);
  const std::optional<at::Tensor> bias_f = as_float(bias);
  std::optional<at::Tensor> z_b, b_pert;
  if (bias_f.has_value()) {
    z_b = direction(key.seed, key.bias_offset, {weight.size(0)});
    b_pert = *bias_f + mu_f * *z_b;  // as the reference: mu z_b rounded, then added
  }
  const FullProblem problem{x_f, x_pert_f, weight, bias_f, z_b, b_pert, key, mu_f};
  auto [y_base, y_pert] = key.rank > 0 ? lowrank_linear(problem) : full_linear(problem);
  return {to_dtype(y_base, x_base.scalar_type()), to_dtype(y_pert, x_base.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> lora_perturbed_linear(const at::Tensor& x_base,
                                                         const std::optional<at::Tensor>& x_pert,
                                                         const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                         double scale, const LoraKey& key, double mu) {
  if (x_base.size(0) == 0) return empty_outputs(x_base, weight);
  const float mu_f = static_cast<float>(mu);
  const at::Tensor x_f = as_float(x_base);
  const std::optional<at::Tensor> x_pert_f = as_float(x_pert);
  const at::Tensor& x_pert_or_x = x_pert_f.has_value() ? *x_pert_f : x_f;
  const std::optional<at::Tensor> bias_f = as_float(bias);
  const at::Tensor a = as_float(lora_a), b = as_float(lora_b);  // (r, K), (N, r)
  const at::Tensor a_pert = perturbed_copy(a, key.seed, key.a_offset, mu_f);
  const at::Tensor b_pert = perturbed_copy(b, key.seed, key.b_offset, mu_f);
  const at::Tensor xa = skinny_product(x_f, a.t());                 // (M, r)
  const at::Tensor xa_pert = skinny_product(x_pert_or_x, a_pert.t());  // (M, r)
  const int64_t m = x_f.size(0), n = weight.size(0);
  at::Tensor y_base = at::empty({m, n}, at::kFloat), y_pert = at::empty({m, n}, at::kFloat);
  // The frozen x W^T + b is computed once when both streams share x.
  const bool shared = !x_pert_f.has_value();
  const FrozenStream base{&x_f, &y_base, &bias_f}, pert{&x_pert_or_x, &y_pert, &bias_f};
  frozen_products(weight, base, shared ? nullptr : &pert, [&](int64_t m0, int64_t m_rows, int64_t n0, int64_t n_cols) {
    at::Tensor base_tile = y_base.narrow(0, m0, m_rows).narrow(1, n0, n_cols);
    at::Tensor pert_tile = y_pert.narrow(0, m0, m_rows).narrow(1, n0, n_cols);
    if (shared) pert_tile.copy_(base_tile);
    base_tile.addmm_(xa.narrow(0, m0, m_rows), b.narrow(0, n0, n_cols).t(), 1.0, scale);
    pert_tile.addmm_(xa_pert.narrow(0, m0, m_rows), b_pert.narrow(0, n0, n_cols).t(), 1.0, scale);
  });
  return {to_dtype(y_base, x_base.scalar_type()), to_dtype(y_pert, x_base.scalar_type())};
}

int64_t linear_tile_bytes() { return g_tile_bytes.load(); }

int64_t set_linear_tile_bytes(int64_t bytes) { return g_tile_bytes.exchange(std::max<int64_t>(bytes, 4)); }

}  // namespace cpu
}  // namespace heron
