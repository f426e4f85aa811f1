// heron._C functions for CUDA tensors (compiled only when HERON_WITH_CUDA is defined).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "bindings.h"
#include "common.h"
#include "cuda/philox_cuda.h"

namespace heron {
namespace {

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

void philox_randn_cuda(torch::Tensor out, int64_t seed, int64_t offset) {
  check_tensor(out, "out", c10::DeviceType::CUDA);
  check_key(seed, offset, out.numel());
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(cuda::launch_philox_randn(out.data_ptr(), static_cast<cuda::ScalarKind>(scalar_kind(out, "out")),
                                       out.numel(), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                       at::cuda::getCurrentCUDAStream()),
             "philox_randn CUDA launch");
}

void philox_words_cuda(torch::Tensor out, int64_t seed, int64_t offset) {
  check_tensor(out, "out", c10::DeviceType::CUDA);
  check_words_out(out);
  check_key(seed, offset, out.size(0));
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(cuda::launch_philox_words(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), out.size(0),
                                       static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                       at::cuda::getCurrentCUDAStream()),
             "philox_words CUDA launch");
}

}  // namespace

void bind_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("philox_randn_cuda", &philox_randn_cuda, py::arg("out"), py::arg("seed"), py::arg("offset"));
  m.def("philox_words_cuda", &philox_words_cuda, py::arg("out"), py::arg("seed"), py::arg("offset"));
}

}  // namespace heron
