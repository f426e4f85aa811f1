// A minimal check harness for the C++ tests (no framework to install): CHECK records a failure
// with its location; each test binary returns non-zero if any check failed.
#pragma once

#include <cstdio>

namespace heron_test {
inline int& failures() {
  static int count = 0;
  return count;
}
}  // namespace heron_test

#define CHECK(condition)                                                          \
  do {                                                                            \
    if (!(condition)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #condition); \
      ++heron_test::failures();                                                   \
    }                                                                             \
  } while (0)

#define TEST_MAIN_RESULT()                                                         \
  (std::printf("%s\n", heron_test::failures() == 0 ? "OK" : "FAILED"), heron_test::failures() == 0 ? 0 : 1)
