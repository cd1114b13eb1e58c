// SHA-256 (FIPS 180-4) for cache keys: a prompt's embedding is stored under the digest of the
// model and the prompt, so keys have a fixed size and reveal nothing in Redis. Our own
// implementation because the project keeps to a fixed set of Debian packages (no OpenSSL).
//
// Thread safety: a Sha256 object is not; the free functions are.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace sdserve::cache {

// Incremental hashing: any split of the input into update() calls gives the same digest.
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  void update(std::string_view s) { update(s.data(), s.size()); }
  // The digest of everything updated so far. Call once; the object is spent afterwards.
  std::array<uint8_t, 32> finish();

 private:
  void compress(const uint8_t* block);

  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_;  // a partial block, buffered_ bytes long
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

// The digest of `data` as 64 lower-case hex digits.
std::string sha256_hex(std::string_view data);

// `n` bytes at `p` as 2n lower-case hex digits.
std::string to_hex(const uint8_t* p, size_t n);

}  // namespace sdserve::cache
