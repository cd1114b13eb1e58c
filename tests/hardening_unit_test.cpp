// Unit-level regressions of the hardening work: bounded JSON, bounded tokenization, preview
// shrinking of extreme aspect ratios, and user-facing error text.
#include <gtest/gtest.h>

#include <random>
#include <string>

#include "config/safe_json.h"
#include "engine/engine.h"
#include "pipeline/image.h"
#include "pipeline/io/tokenizer.h"
#include "tests/random_text.h"

namespace sdserve {
namespace {

TEST(SafeJson, RefusesDeepNestingBeforeParsing) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_THROW(safe_json::parse(deep), safe_json::Error);
  EXPECT_THROW(safe_json::parse("{\"a\": " + deep + "}"), safe_json::Error);
  // Brackets inside strings are text, not nesting.
  const auto ok = safe_json::parse("{\"a\": \"" + std::string(1000, '[') + "\\\"[\"}");
  EXPECT_EQ(ok["a"].get<std::string>().size(), 1002u);
  EXPECT_EQ(safe_json::parse(std::string(64, '[') + std::string(64, ']')).size(), 1u);
  EXPECT_THROW(safe_json::parse(std::string(65, '[') + std::string(65, ']')), safe_json::Error);
}

TEST(SafeJson, ErrorsAreValidUtf8AndOutOfRangeNumbersAreParseErrors) {
  try {
    safe_json::parse("{\"a\": \"caf\xc3\x28\"}");
    FAIL() << "invalid UTF-8 parsed";
  } catch (const safe_json::Error& e) {
    EXPECT_NO_THROW(safe_json::dump(nlohmann::json(e.what())));
    EXPECT_NO_THROW(nlohmann::json(std::string(e.what())).dump());
  }
  EXPECT_THROW(safe_json::parse("{\"g\": 1e400}"), safe_json::Error);
}

TEST(SafeJson, BoundsMembersPerObjectBeforeBuildingIt) {
  // Colons inside strings are text; each object counts its own members.
  const auto s = safe_json::shape(R"({"a": 1, "b": {"c": 1, "d": 2, "e": ":"}, "f": [{"g": 1}]})");
  EXPECT_EQ(s.depth, 3);
  EXPECT_EQ(s.max_keys, 3u);
  std::string wide = "{";
  for (int i = 0; i < 257; ++i) wide += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":0";
  wide += "}";
  EXPECT_THROW(safe_json::parse(wide, safe_json::Limits{64, 256}), safe_json::Error);
  EXPECT_EQ(safe_json::parse(wide, safe_json::Limits{64, 257}).size(), 257u);
  EXPECT_EQ(safe_json::parse(wide).size(), 257u);  // no bound unless asked (checkpoint headers)
}

TEST(SafeJson, NamesTheMemberOfAnOutOfRangeNumber) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"steps": 1e400})", "steps"},
      {R"({"a": {"b": 1}, "steps": -1e999})", "steps"},
      {R"({"preview": {"every": 1e400}})", "preview.every"},
      {R"({"a": [{"b": 1}, 1e400]})", "a"},
      {R"([1e400])", ""}};
  for (const auto& [text, field] : cases) {
    try {
      safe_json::parse(text);
      ADD_FAILURE() << text << " parsed";
    } catch (const safe_json::Error& e) {
      EXPECT_EQ(e.field(), field) << text;
    }
  }
}

TEST(SafeJson, DescribeIsShortAndNeverThrows) {
  EXPECT_EQ(safe_json::describe(nlohmann::json(5)), "5");
  EXPECT_EQ(safe_json::describe(nlohmann::json("x")), "\"x\"");
  EXPECT_LE(safe_json::describe(nlohmann::json(std::string(100000, 'x'))).size(), 60u);
  nlohmann::json big = nlohmann::json::array();
  for (int i = 0; i < 1000; ++i) big.push_back(i);
  EXPECT_EQ(safe_json::describe(big), "an array of 1000 items");
  EXPECT_NO_THROW(safe_json::describe(nlohmann::json(std::string("\xff\xfe"))));
}

TEST(PublicError, DropsBacktracesAndBoundsLength) {
  const std::string torch_like =
      "CUDA out of memory. Tried to allocate 2.00 GiB\nException raised from malloc at "
      "/pytorch/c10/cuda/CUDACachingAllocator.cpp:1 (most recent call first):\nframe #0: "
      "c10::Error::Error(...) + 0x7f12";
  EXPECT_EQ(engine::public_error(torch_like), "CUDA out of memory. Tried to allocate 2.00 GiB");
  EXPECT_EQ(engine::public_error("bad thing Exception raised from f at x.cpp:3"), "bad thing");
  EXPECT_LE(engine::public_error(std::string(10000, 'e')).size(), 503u);
  EXPECT_EQ(engine::public_error(""), "internal error");
}

TEST(Image, ShrinkClipsBoxesOfVeryWideImages) {
  // 2048x64 to at most 16 px: factor 128 is taller than the image, so the single row's boxes
  // cover the 64 rows that exist (reading more ran past the buffer).
  pipeline::RgbImage img{2048, 64, {}};
  img.pixels.resize(2048 * 64 * 3);
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 2048; ++x)
      for (int c = 0; c < 3; ++c)
        img.pixels[(static_cast<size_t>(y) * 2048 + x) * 3 + c] =
            static_cast<uint8_t>((x / 128) * 15 + (y % 2) * (c + 1));
  const auto small = pipeline::shrink_to(img, 16);
  ASSERT_EQ(small.width, 16);
  ASSERT_EQ(small.height, 1);
  ASSERT_EQ(small.pixels.size(), 16u * 3);
  for (int x = 0; x < 16; ++x)
    for (int c = 0; c < 3; ++c) {
      // Mean over the box: half the rows add c + 1; rounded half up, as the implementation does.
      const int count = 128 * 64;
      const int sum = count * (x * 15) + (count / 2) * (c + 1);
      EXPECT_EQ(small.pixels[x * 3 + c], (sum + count / 2) / count) << x << " " << c;
    }
  // And the transposed case.
  pipeline::RgbImage tall{64, 2048, std::vector<uint8_t>(64 * 2048 * 3, 200)};
  const auto t = pipeline::shrink_to(tall, 16);
  EXPECT_EQ(t.width, 1);
  EXPECT_EQ(t.height, 16);
  for (uint8_t v : t.pixels) EXPECT_EQ(v, 200);
}

const pipeline::ClipTokenizer& tokenizer() {
  // Torch-free on purpose (no test_util.h): tools/sanitize.sh runs this file too.
  static const std::string dir = std::string(SDSERVE_MODELS) + "/tiny-sd15/tokenizer";
  static const auto tok = pipeline::ClipTokenizer::load(dir + "/vocab.json", dir + "/merges.txt");
  return tok;
}

TEST(TokenizerBounds, BoundedCallIsThePrefixOfTheWholeTokenization) {
  const auto& tok = tokenizer();
  for (uint32_t seed = 1; seed <= 5; ++seed) {
    const std::string text = test::random_words(3000, seed);  // ~20 KB: several chunks
    const auto all = tok.tokenize(text);
    ASSERT_GT(all.size(), 200u);
    for (size_t limit : {0u, 1u, 2u, 75u, 150u}) {
      const auto some = tok.tokenize(text, limit);
      ASSERT_EQ(some.size(), limit);
      EXPECT_TRUE(std::equal(some.begin(), some.end(), all.begin())) << seed << " " << limit;
    }
    // Chunked cleaning matches the whole text: the full tokenization of the concatenation of
    // two halves cut after a space equals the halves' tokenizations joined.
    const size_t cut = text.find(' ', text.size() / 2) + 1;
    auto joined = tok.tokenize(text.substr(0, cut));
    const auto second = tok.tokenize(text.substr(cut));
    joined.insert(joined.end(), second.begin(), second.end());
    EXPECT_EQ(joined, all);
  }
}

TEST(TokenizerBounds, HugeWordsCostLittle) {
  const auto& tok = tokenizer();
  std::mt19937 rng(3);
  std::string word(1 << 20, 'a');
  for (auto& c : word) c = static_cast<char>('a' + rng() % 26);
  const auto ids = tok.encode(word);  // was minutes: quadratic BPE over the whole word
  EXPECT_EQ(ids.size(), 77u);
  // The unbounded call is O(n log n) now: a 128 KB word in well under a second.
  const auto all = tok.tokenize(word.substr(0, 128 << 10));
  EXPECT_GT(all.size(), 1000u);
  // Its first tokens agree with the bounded call's.
  const auto head = tok.tokenize(word.substr(0, 128 << 10), 75);
  ASSERT_EQ(head.size(), 75u);
  EXPECT_TRUE(std::equal(head.begin(), head.end(), all.begin()));
  // The same through a 64 KB prefix, multibyte words, and a word of one repeated letter.
  const auto all64 = tok.tokenize(word.substr(0, 64 << 10));
  EXPECT_GT(all64.size(), 1000u);
  const auto head64 = tok.tokenize(word.substr(0, 64 << 10), 75);
  ASSERT_EQ(head64.size(), 75u);
  EXPECT_TRUE(std::equal(head64.begin(), head64.end(), all64.begin()));
  std::string multibyte;  // one 300 KB "word" of 3-byte characters
  for (int i = 0; i < 100000; ++i) multibyte += "\xe2\x82\xac";
  EXPECT_EQ(tok.encode(multibyte).size(), 77u);
  EXPECT_EQ(tok.encode(std::string(1 << 20, 'a')).size(), 77u);
}

}  // namespace
}  // namespace sdserve
