// Philox4x32-10 known-answer tests (Random123's published vectors), the scalar/block generator
// agreement, and independence from the number of OpenMP threads.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "check.h"
#include "cpu/philox_cpu.h"
#include "philox.h"

using heron::philox::Words;

static bool words_equal(const Words& w, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return w.w0 == a && w.w1 == b && w.w2 == c && w.w3 == d;
}

static void known_answers() {
  namespace p = heron::philox;
  CHECK(words_equal(p::philox4x32(0, 0, 0, 0, 0, 0), 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u));
  CHECK(words_equal(p::philox4x32(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu),
                    0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu));
  CHECK(words_equal(p::philox4x32(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u),
                    0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u));
}

static void counter_and_key_split() {
  namespace p = heron::philox;
  const uint64_t seed = (uint64_t{0xa4093822u} << 32) | 0x12345678u;
  const uint64_t counter = (uint64_t{7} << 32) | 0xfffffffeu;
  const Words a = p::words_at(seed, counter);
  const Words b = p::philox4x32(0xfffffffeu, 7u, 0u, 0u, 0x12345678u, 0xa4093822u);
  CHECK(words_equal(a, b.w0, b.w1, b.w2, b.w3));
}

static void uniform_mapping() {
  namespace p = heron::philox;
  CHECK(p::uniform_from_word(0u) == 0.0f);
  CHECK(p::uniform_from_word(0xffffffffu) == 0.0f);  // int32 -1 -> ~(-1) = 0
  CHECK(p::uniform_from_word(0x7fffffffu) < 1.0f);
  CHECK(p::uniform_from_word(0x80000000u) < 1.0f);
}

static void block_generator_matches_scalar(int threads) {
  omp_set_num_threads(threads);
  const int64_t n = 100003;
  const uint64_t seed = (uint64_t{1} << 40) + 3, offset = (uint64_t{1} << 33) - 17;
  std::vector<float> out(n);
  heron::cpu::philox_randn(out.data(), heron::cpu::ScalarKind::kFloat32, n, seed, offset);
  double worst = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double diff = std::fabs(out[i] - heron::philox::randn_at(seed, offset + i));
    worst = diff > worst ? diff : worst;
  }
  std::printf("threads=%d max |block - scalar| = %.3g\n", threads, worst);
  CHECK(worst <= 1e-5);

  std::vector<uint32_t> words(4 * n);
  heron::cpu::philox_words(words.data(), n, seed, offset);
  bool same = true;
  for (int64_t i = 0; i < n; ++i) {
    const Words w = heron::philox::words_at(seed, offset + i);
    same = same && words_equal(w, words[4 * i], words[4 * i + 1], words[4 * i + 2], words[4 * i + 3]);
  }
  CHECK(same);
}

static void thread_count_independent() {
  const int64_t n = 1 << 20;
  std::vector<float> one(n), two(n);
  omp_set_num_threads(1);
  heron::cpu::philox_randn(one.data(), heron::cpu::ScalarKind::kFloat32, n, 5, 1);
  omp_set_num_threads(2);
  heron::cpu::philox_randn(two.data(), heron::cpu::ScalarKind::kFloat32, n, 5, 1);
  CHECK(one == two);
}

static void half_conversions() {
  using namespace heron::cpu;
  CHECK(float_to_bf16_bits(1.0f) == 0x3f80u);
  CHECK(float_to_fp16_bits(1.0f) == 0x3c00u);
  CHECK(float_to_fp16_bits(65520.0f) == 0x7c00u);  // rounds to +inf
  CHECK(float_to_fp16_bits(5.9604644775390625e-8f) == 0x0001u);  // smallest subnormal
  CHECK(fp16_bits_to_float(float_to_fp16_bits(-2.5f)) == -2.5f);
  CHECK(bf16_bits_to_float(float_to_bf16_bits(-3.0f)) == -3.0f);
}

int main() {
  known_answers();
  counter_and_key_split();
  uniform_mapping();
  block_generator_matches_scalar(1);
  block_generator_matches_scalar(2);
  thread_count_independent();
  half_conversions();
  return TEST_MAIN_RESULT();
}
