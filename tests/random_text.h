// Seeded random prose for tokenizer tests (torch-free: also built by tests/sanitize): `words`
// words of 1-12 lowercase letters, a comma after about one in seven.
#pragma once

#include <cstdint>
#include <random>
#include <string>

namespace sdserve::test {

inline std::string random_words(size_t words, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s;
  for (size_t w = 0; w < words; ++w) {
    const size_t len = 1 + rng() % 12;
    for (size_t i = 0; i < len; ++i) s += static_cast<char>('a' + rng() % 26);
    s += rng() % 7 == 0 ? ", " : " ";
  }
  return s;
}

}  // namespace sdserve::test
