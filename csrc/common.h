// Argument checks shared by the binding files: every message names the argument and what it got.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace heron {

// Kernel element type for a float32/bfloat16/float16 tensor (0, 1, 2: same numbering as
// heron::cpu::ScalarKind and heron::cuda::ScalarKind).
inline int scalar_kind(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return 0;
    case torch::kBFloat16:
      return 1;
    case torch::kFloat16:
      return 2;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline void check_key(int64_t seed, int64_t offset, int64_t numel, const char* offset_name = "offset") {
  TORCH_CHECK(seed >= 0, "seed must be non-negative, got ", seed);
  TORCH_CHECK(offset >= 0, offset_name, " must be non-negative, got ", offset);
  // Counters offset .. offset + numel - 1 must lie below 2**63 (heron.kernels.stream.check_key).
  TORCH_CHECK(static_cast<uint64_t>(offset) + static_cast<uint64_t>(numel) <= (uint64_t{1} << 63), offset_name,
              " + numel overflows the 63-bit counter range: ", offset_name, "=", offset, ", numel=", numel);
}

inline void check_tensor(const torch::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got shape ", t.sizes(), " strides ",
              t.strides());
}

inline void check_words_out(const torch::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == torch::kInt32, "out must be int32, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(1) == 4, "out must have shape (n, 4), got ", out.sizes());
}

}  // namespace heron
