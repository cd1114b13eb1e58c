// SHA-256 against digests computed by Python's hashlib (never typed from memory), and the
// incremental API against the one-shot one.
#include "cache/sha256.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace sdserve::cache {
namespace {

// Bytes (i * 7 + 3) mod 256: every byte value appears, and no block repeats the previous one.
std::vector<uint8_t> pattern(size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>((i * 7 + 3) % 256);
  return v;
}

std::string hex_of(const std::vector<uint8_t>& data) {
  Sha256 h;
  h.update(data.data(), data.size());
  const auto digest = h.finish();
  return to_hex(digest.data(), digest.size());
}

// The expected digests below were computed with
//   python3 -c 'import hashlib; print(hashlib.sha256(MESSAGE).hexdigest())'
// (Python 3.11.7).

TEST(Sha256, EmptyString) {
  // hashlib.sha256(b"").hexdigest()
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  Sha256 h;
  h.update(nullptr, 0);  // allowed: an empty buffer's data() may be null
  const auto digest = h.finish();
  EXPECT_EQ(to_hex(digest.data(), digest.size()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(Sha256, Abc) {
  // hashlib.sha256(b"abc").hexdigest()
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Sha256, Nist448BitMessage) {
  // hashlib.sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq").hexdigest()
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(Sha256, Nist896BitMessage) {
  // hashlib.sha256(b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
  //                b"ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu").hexdigest()
  EXPECT_EQ(sha256_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
                       "ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"),
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

TEST(Sha256, OneMillionA) {
  // hashlib.sha256(b"a" * 1000000).hexdigest()
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, OneMillionAInOddChunks) {
  // Same digest as above, fed in 997-byte pieces so the buffer is partly full at every call.
  const std::string a(997, 'a');
  Sha256 h;
  size_t left = 1000000;
  for (; left >= a.size(); left -= a.size()) h.update(a);
  h.update(std::string_view(a).substr(0, left));
  const auto digest = h.finish();
  EXPECT_EQ(to_hex(digest.data(), digest.size()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, PatternAtBlockAndPaddingBoundaries) {
  // pattern(n) = bytes((i * 7 + 3) % 256 for i in range(n));
  // hashlib.sha256(pattern(n)).hexdigest(). 55 is the longest message padded within one block,
  // 56 the shortest that needs a second; 64 and 128 end exactly on a block.
  const struct {
    size_t length;
    const char* hex;
  } cases[] = {
      {55, "e7313d333c272e639f790978283f9eb392e843d0f29b7016828bb1daa4aac70b"},
      {56, "4324d65f3c103567f5589c710bc08f8523f929a9272e3af36fc968e52abc6c27"},
      {63, "81c80242132f230c3bd41b3e63bbcff16107339549214a99614ff26664625055"},
      {64, "39e3d7b6b5d075d37d053ad89b24b41bef4f3c29760c84447cab3f3be1882241"},
      {65, "aacca6ff74fdbb296d165a45cecfa04e5127bc008770fbbdd48006f2d2fae95e"},
      {119, "9ce7368e4daf32341631b492e80359dc9f594b48453cd0dd5bf0b19279cc177e"},
      {120, "7836b787757e95e58b3ca5aec90b1b004e8deba1e50e9675af9cabf1a13a04b5"},
      {127, "a8d23e75d936f303d248888d9b165ee543f4cbafcad3c9dd2a79bd84faa11d07"},
      {128, "d2742f1f4ac6bb7ca2b239ee18402ba8b3f9f8e652d2a72973c2b9ba11c08cf6"},
  };
  for (const auto& c : cases) EXPECT_EQ(hex_of(pattern(c.length)), c.hex) << "length " << c.length;
}

TEST(Sha256, PatternEveryLengthUpTo130) {
  // All 131 digests at once: the digest of their concatenation (raw 32-byte digests, lengths
  // 0..130 in order), computed with
  //   acc = hashlib.sha256()
  //   for n in range(131): acc.update(hashlib.sha256(pattern(n)).digest())
  //   acc.hexdigest()
  Sha256 acc;
  for (size_t n = 0; n <= 130; ++n) {
    const std::vector<uint8_t> data = pattern(n);
    Sha256 h;
    h.update(data.data(), data.size());
    const auto digest = h.finish();
    acc.update(digest.data(), digest.size());
  }
  const auto digest = acc.finish();
  EXPECT_EQ(to_hex(digest.data(), digest.size()),
            "b3d31aa6b4f0810cff11dc15fd1017d7ba047ad10e757b0e36ed68897e6d1851");
}

TEST(Sha256, ByteAtATimeMatchesOneCallForEveryLengthUpTo130) {
  for (size_t n = 0; n <= 130; ++n) {
    const std::vector<uint8_t> data = pattern(n);
    Sha256 h;
    for (const uint8_t b : data) h.update(&b, 1);
    const auto digest = h.finish();
    EXPECT_EQ(to_hex(digest.data(), digest.size()), hex_of(data)) << "length " << n;
  }
}

TEST(Sha256, AnySplitGivesTheSameDigest) {
  // hashlib.sha256(pattern(1000)).hexdigest()
  const std::string expected = "1e9bc38cbf860b9ec31918b065f9b52476c549a782e0e7990bed8ce3868d2371";
  const std::vector<uint8_t> data = pattern(1000);
  ASSERT_EQ(hex_of(data), expected);
  for (size_t split = 0; split <= data.size(); ++split) {
    Sha256 h;
    h.update(data.data(), split);
    h.update(data.data() + split, data.size() - split);
    const auto digest = h.finish();
    ASSERT_EQ(to_hex(digest.data(), digest.size()), expected) << "split at " << split;
  }
  // Three pieces, with the middle one spanning 0..130 bytes, and empty updates in between.
  for (size_t first = 0; first < 70; ++first) {
    for (size_t middle = 0; middle <= 130; ++middle) {
      Sha256 h;
      h.update(data.data(), first);
      h.update(data.data(), 0);
      h.update(data.data() + first, middle);
      h.update(std::string_view());
      h.update(data.data() + first + middle, data.size() - first - middle);
      const auto digest = h.finish();
      ASSERT_EQ(to_hex(digest.data(), digest.size()), expected)
          << "pieces " << first << ", " << middle;
    }
  }
}

TEST(Sha256, ToHexIsLowerCaseAndTwoDigitsPerByte) {
  const uint8_t bytes[] = {0x00, 0x0f, 0xa0, 0xff, 0x5c};
  EXPECT_EQ(to_hex(bytes, sizeof bytes), "000fa0ff5c");
  EXPECT_EQ(to_hex(bytes, 0), "");
}

TEST(Sha256, HexDigestHas64LowerCaseDigits) {
  const std::string hex = sha256_hex("sdserve");
  ASSERT_EQ(hex.size(), 64u);
  for (const char c : hex) EXPECT_TRUE((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) << c;
}

}  // namespace
}  // namespace sdserve::cache
