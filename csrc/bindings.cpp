// pybind11 module heron._C: thin, checked entry points onto the torch-free kernel cores.
// Every check names the argument and what it got; Python-side validation runs first, these are
// the last line of defence for direct callers of heron._C.
#include <torch/extension.h>

#include <cstdint>
#include <string>

#include "cpu/philox_cpu.h"

#ifdef HERON_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/philox_cuda.h"
#endif

namespace {

heron::cpu::ScalarKind scalar_kind(const torch::Tensor& out, const char* name) {
  switch (out.scalar_type()) {
    case torch::kFloat32:
      return heron::cpu::ScalarKind::kFloat32;
    case torch::kBFloat16:
      return heron::cpu::ScalarKind::kBFloat16;
    case torch::kFloat16:
      return heron::cpu::ScalarKind::kFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", out.scalar_type());
  }
}

void check_key(int64_t seed, int64_t offset, int64_t numel) {
  TORCH_CHECK(seed >= 0, "seed must be non-negative, got ", seed);
  TORCH_CHECK(offset >= 0, "offset must be non-negative, got ", offset);
  TORCH_CHECK(offset <= INT64_MAX - numel, "offset + numel overflows the 63-bit counter range: offset=",
              offset, ", numel=", numel);
}

void check_out(const torch::Tensor& out, const char* name, c10::DeviceType device) {
  TORCH_CHECK(out.device().type() == device, name, " must be on ", device, ", got ", out.device());
  TORCH_CHECK(out.is_contiguous(), name, " must be contiguous, got strides ", out.strides());
}

void philox_randn_cpu(torch::Tensor out, int64_t seed, int64_t offset) {
  check_out(out, "out", c10::DeviceType::CPU);
  check_key(seed, offset, out.numel());
  heron::cpu::philox_randn(out.data_ptr(), scalar_kind(out, "out"), out.numel(),
                           static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

void check_words_out(const torch::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == torch::kInt32, "out must be int32, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(1) == 4, "out must have shape (n, 4), got ", out.sizes());
}

void philox_words_cpu(torch::Tensor out, int64_t seed, int64_t offset) {
  check_out(out, "out", c10::DeviceType::CPU);
  check_words_out(out);
  check_key(seed, offset, out.size(0));
  heron::cpu::philox_words(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), out.size(0),
                           static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

#ifdef HERON_WITH_CUDA
void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

void philox_randn_cuda(torch::Tensor out, int64_t seed, int64_t offset) {
  check_out(out, "out", c10::DeviceType::CUDA);
  check_key(seed, offset, out.numel());
  const c10::cuda::CUDAGuard guard(out.device());
  const auto kind = static_cast<heron::cuda::ScalarKind>(static_cast<int>(scalar_kind(out, "out")));
  check_cuda(heron::cuda::launch_philox_randn(out.data_ptr(), kind, out.numel(),
                                              static_cast<uint64_t>(seed),
                                              static_cast<uint64_t>(offset),
                                              at::cuda::getCurrentCUDAStream()),
             "philox_randn CUDA launch");
}

void philox_words_cuda(torch::Tensor out, int64_t seed, int64_t offset) {
  check_out(out, "out", c10::DeviceType::CUDA);
  check_words_out(out);
  check_key(seed, offset, out.size(0));
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(heron::cuda::launch_philox_words(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()),
                                              out.size(0), static_cast<uint64_t>(seed),
                                              static_cast<uint64_t>(offset),
                                              at::cuda::getCurrentCUDAStream()),
             "philox_words CUDA launch");
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "heron compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("philox_randn_cpu", &philox_randn_cpu, "Fill a contiguous CPU tensor with randn(seed, offset + i)",
        py::arg("out"), py::arg("seed"), py::arg("offset"));
  m.def("philox_words_cpu", &philox_words_cpu, "Philox4x32-10 words into an int32 (n, 4) CPU tensor",
        py::arg("out"), py::arg("seed"), py::arg("offset"));
  m.def("num_threads", &heron::cpu::num_threads, "OpenMP threads used by the CPU kernels");
#ifdef HERON_WITH_CUDA
  m.def("philox_randn_cuda", &philox_randn_cuda, py::arg("out"), py::arg("seed"), py::arg("offset"));
  m.def("philox_words_cuda", &philox_words_cuda, py::arg("out"), py::arg("seed"), py::arg("offset"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
