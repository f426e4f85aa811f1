// Argument checks for the CUDA bindings (host C++, uses torch). Every message names the argument
// and what it got; the general helpers live in common.h.
#pragma once

#include <torch/extension.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.h"

namespace heron {

inline void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

// A contiguous CUDA tensor with `dims` dimensions.
inline void check_cuda_tensor(const torch::Tensor& t, const char* name, int64_t dims) {
  check_tensor(t, name, c10::DeviceType::CUDA);
  TORCH_CHECK(t.dim() == dims, name, " must be ", dims, "-D, got shape ", t.sizes());
}

inline void check_same_device(const torch::Tensor& t, const char* name, const torch::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device ", ref.device(), ", got ",
              t.device());
}

inline void check_same_dtype(const torch::Tensor& t, const char* name, const torch::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
}

inline void check_dtype(const torch::Tensor& t, const char* name, c10::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// `shape_text` spells the expected shape in the caller's terms, e.g. "(N, K)".
inline void check_shape(const torch::Tensor& t, const char* name, c10::IntArrayRef shape, const char* shape_text) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape_text, " = ", shape, ", got ", t.sizes());
}

// Tensors the kernel writes must not share memory with each other.
inline void check_distinct(const torch::Tensor& a, const char* a_name, const torch::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.numel() == 0 || a.data_ptr() != b.data_ptr(), a_name, " and ", b_name,
              " must be different tensors, got the same memory at ", a.data_ptr());
}

inline void check_nonnegative(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0, name, " must be non-negative, got ", value);
}

// Counters offset .. offset + numel - 1 stay inside [0, 2**63).
inline void check_counter(int64_t offset, int64_t numel, const char* name) {
  check_nonnegative(offset, name);
  TORCH_CHECK(static_cast<uint64_t>(offset) + static_cast<uint64_t>(numel) <= (uint64_t{1} << 63), name,
              " + numel overflows the 63-bit counter range: ", name, "=", offset, ", numel=", numel);
}

inline void check_finite(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value), name, " must be finite, got ", value);
}

}  // namespace heron
