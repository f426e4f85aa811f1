// Registration hooks: each backend folder binds its own functions into heron._C.
#pragma once

#include <torch/extension.h>

namespace heron {

// csrc/cpu/bindings_cpu.cpp: the C++ CPU kernels (always built).
void bind_cpu(pybind11::module_& m);

#ifdef HERON_WITH_CUDA
// csrc/cuda/bindings_cuda.cpp: the CUDA kernels (built with HERON_WITH_CUDA only).
void bind_cuda(pybind11::module_& m);
#endif

}  // namespace heron
