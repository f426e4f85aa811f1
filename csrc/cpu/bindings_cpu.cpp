// heron._C functions for CPU tensors.
#include "bindings.h"
#include "common.h"
#include "cpu/philox_cpu.h"

namespace heron {
namespace {

void philox_randn_cpu(torch::Tensor out, int64_t seed, int64_t offset) {
  check_tensor(out, "out", c10::DeviceType::CPU);
  check_key(seed, offset, out.numel());
  cpu::philox_randn(out.data_ptr(), static_cast<cpu::ScalarKind>(scalar_kind(out, "out")), out.numel(),
                    static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

void philox_words_cpu(torch::Tensor out, int64_t seed, int64_t offset) {
  check_tensor(out, "out", c10::DeviceType::CPU);
  check_words_out(out);
  check_key(seed, offset, out.size(0));
  cpu::philox_words(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), out.size(0),
                    static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

}  // namespace

void bind_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("philox_randn_cpu", &philox_randn_cpu, "Fill a contiguous CPU tensor with randn(seed, offset + i)",
        py::arg("out"), py::arg("seed"), py::arg("offset"));
  m.def("philox_words_cpu", &philox_words_cpu, "Philox4x32-10 words into an int32 (n, 4) CPU tensor",
        py::arg("out"), py::arg("seed"), py::arg("offset"));
  m.def("num_threads", &cpu::num_threads, "OpenMP threads used by the CPU kernels");
}

}  // namespace heron
