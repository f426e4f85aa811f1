// The pybind11 module heron._C. Each backend folder registers its own functions; Python-side
// validation runs first, the checks in the binding files are the last line of defence for
// direct callers of heron._C.
#include "bindings.h"
#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "heron compiled kernels (C++ CPU, and CUDA when built with it)";
  heron::bind_cpu(m);
  m.attr("COUNTER_LIMIT") = pybind11::int_(heron::kCounterLimit);
#ifdef HERON_WITH_CUDA
  heron::bind_cuda(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
