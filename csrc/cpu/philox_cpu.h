// CPU (OpenMP, vectorised) generators for the perturbation stream. Torch-free: raw pointers only,
// so the same core builds in the extension and in the standalone CMake tests.
#pragma once

#include <cstdint>

namespace heron {
namespace cpu {

// Output element types a generator can write.
enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// out[i] = randn(seed, offset + i) for i in [0, n), written as `kind` (round to nearest even).
// `out` points to n elements of that type. Results do not depend on the number of threads.
void philox_randn(void* out, ScalarKind kind, int64_t n, uint64_t seed, uint64_t offset);

// out[4*i + j] = word j of Philox4x32-10 at counter offset + i, for i in [0, n).
void philox_words(uint32_t* out, int64_t n, uint64_t seed, uint64_t offset);

// Element-type conversions used by every CPU kernel (round to nearest even, NaN kept).
uint16_t float_to_bf16_bits(float value);
uint16_t float_to_fp16_bits(float value);
float bf16_bits_to_float(uint16_t bits);
float fp16_bits_to_float(uint16_t bits);

// Number of OpenMP threads the kernels use (1 when built without OpenMP).
int num_threads();

}  // namespace cpu
}  // namespace heron
