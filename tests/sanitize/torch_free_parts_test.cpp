// Torch-free pipeline and engine parts under ASan + UBSan (tests/sanitize), where the main suite's
// tests cannot be compiled without torch (tests/test_util.h): the safetensors reader, model-file
// reading, CLIP's tokenizer, image shrinking and decoding, safe_json, the job queue and the result
// store. Hostile and odd inputs mostly: the sanitizers judge what happens to the memory.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "config/safe_json.h"
#include "engine/job_queue.h"
#include "engine/result_store.h"
#include "pipeline/errors.h"
#include "pipeline/image.h"
#include "pipeline/io/file_io.h"
#include "pipeline/io/safetensors.h"
#include "pipeline/io/tokenizer.h"
#include "tests/random_text.h"

namespace sdserve {
namespace {

using pipeline::ModelError;

std::string fixture(const std::string& rel) {
  return std::string(SDSERVE_FIXTURES) + "/" + rel;
}
std::string tokenizer_dir() {
  return std::string(SDSERVE_MODELS) + "/tiny-sd15/tokenizer";
}

// A file under /tmp, removed at scope exit.
class TempPath {
 public:
  explicit TempPath(const std::string& tag)
      : path_("/tmp/sdserve-sanitize-" + std::to_string(::getpid()) + "-" + tag) {}
  ~TempPath() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }
  const TempPath& write(const std::string& bytes) const {
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << bytes;
    return *this;
  }

 private:
  std::string path_;
};

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// ---- safetensors --------------------------------------------------------------------------

std::string with_header(const std::string& json) {
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + json;
}

// Opening `bytes` either succeeds or throws ModelError; anything else fails the test.
bool opens(const std::string& bytes, const std::string& tag = "st") {
  TempPath f(tag);
  f.write(bytes);
  try {
    auto file = pipeline::SafetensorsFile::open(f.path());
    // Touch every byte of every view: all of them must lie inside the mapping.
    unsigned sum = 0;
    for (const auto& [name, t] : file->tensors())
      for (size_t i = 0; i < t.nbytes; ++i) sum += static_cast<unsigned>(t.data[i]);
    (void)sum;
    return true;
  } catch (const ModelError&) {
    return false;
  }
}

TEST(SanitizeSafetensors, ReadsTheFixtureAndViewsFitTheirShapes) {
  auto file = pipeline::SafetensorsFile::open(fixture("tiny-sd15-reference.safetensors"));
  EXPECT_EQ(file->tensors().size(), 118u);
  for (const auto& [name, t] : file->tensors()) {
    size_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<size_t>(d);
    EXPECT_EQ(t.nbytes, numel * pipeline::dtype_size(t.dtype)) << name;
    if (t.nbytes > 0) {
      volatile std::byte first = t.data[0], last = t.data[t.nbytes - 1];
      (void)first;
      (void)last;
    }
  }
  EXPECT_THROW(file->at("nope"), ModelError);
}

TEST(SanitizeSafetensors, RoundTripsEveryDtype) {
  TempPath f("roundtrip");
  std::map<std::string, pipeline::TensorData> tensors;
  const pipeline::DType all[] = {
      pipeline::DType::kF32, pipeline::DType::kF16, pipeline::DType::kBF16, pipeline::DType::kF64,
      pipeline::DType::kI64, pipeline::DType::kI32, pipeline::DType::kI16,  pipeline::DType::kI8,
      pipeline::DType::kU8,  pipeline::DType::kBool};
  int k = 0;
  for (auto dt : all) {
    pipeline::TensorData t{dt, {2, 3}, {}};
    t.bytes.resize(6 * pipeline::dtype_size(dt));
    for (size_t i = 0; i < t.bytes.size(); ++i) t.bytes[i] = static_cast<std::byte>(i * 7 + k);
    tensors["t" + std::to_string(k++)] = t;
  }
  tensors["empty"] = {pipeline::DType::kF32, {0, 4}, {}};
  tensors["scalar"] = {pipeline::DType::kU8, {}, {std::byte{42}}};
  pipeline::write_safetensors(f.path(), tensors);
  auto file = pipeline::SafetensorsFile::open(f.path());
  ASSERT_EQ(file->tensors().size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    const auto& v = file->at(name);
    EXPECT_EQ(v.dtype, t.dtype) << name;
    EXPECT_EQ(v.shape, t.shape) << name;
    ASSERT_EQ(v.nbytes, t.bytes.size()) << name;
    EXPECT_TRUE(std::equal(t.bytes.begin(), t.bytes.end(), v.data)) << name;
  }
}

TEST(SanitizeSafetensors, RefusesHostileHeaders) {
  const std::string u8 = R"("dtype":"U8","shape":[4])";
  const std::vector<std::string> files = {
      "",
      "abc",
      std::string(8, '\0'),                     // empty header
      std::string(8, '\xff'),                   // 2^64-1 header bytes
      with_header("{}").substr(0, 9),           // header cut
      std::string("\x10\0\0\0\0\0\0\0{}", 10),  // header past the end
      with_header("{not json"),
      with_header("[1, 2]"),
      with_header("\"text\""),
      with_header(std::string(100000, '[') + std::string(100000, ']')),
      with_header("{\"w\": " + std::string(70, '{') + std::string(70, '}') + "}"),
      with_header(R"({"w": 5})"),
      with_header(R"({"w": {}})"),
      with_header(R"({"w": {"dtype": "U8", "shape": [4]}})") + "abcd",
      with_header(R"({"w": {"dtype": 5, "shape": [4], "data_offsets": [0, 4]}})") + "abcd",
      with_header(R"({"w": {"dtype": "F8", "shape": [4], "data_offsets": [0, 4]}})") + "abcd",
      with_header(R"({"w": {"dtype": "U8", "shape": 4, "data_offsets": [0, 4]}})") + "abcd",
      with_header(R"({"w": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 4]}})") + "abcd",
      with_header(R"({"w": {"dtype": "U8", "shape": [4.0], "data_offsets": [0, 4]}})") + "abcd",
      with_header(
          R"({"w": {"dtype": "U8", "shape": [1,1,1,1,1,1,1,1,4], "data_offsets": [0, 4]}})") +
          "abcd",
      with_header(R"({"w": {"dtype": "F64", "shape": [18446744073709551615, 2],)"
                  R"( "data_offsets": [0, 4]}})") +
          "abcd",
      with_header(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 16],)"
                  R"( "data_offsets": [0, 0]}})"),
      with_header(R"({"w": {)" + u8 + R"(, "data_offsets": [0, 5]}})") + "abcd",
      with_header(R"({"w": {)" + u8 + R"(, "data_offsets": [4, 0]}})") + "abcd",
      with_header(R"({"w": {)" + u8 + R"(, "data_offsets": [0, 18446744073709551615]}})") + "abcd",
      with_header(R"({"w": {)" + u8 + R"(, "data_offsets": [18446744073709551612, 0]}})") + "abcd",
      with_header(R"({"w": {)" + u8 + R"(, "data_offsets": [-1, 3]}})") + "abcd",
      with_header(R"({"w": {)" + u8 + R"(, "data_offsets": [0]}})") + "abcd",
      with_header(R"({"w": {)" + u8 + R"(, "data_offsets": [0, 4, 8]}})") + "abcd",
      with_header(R"({"w": {)" + u8 + R"(, "data_offsets": "0-4"}})") + "abcd",
      with_header("{\"w\": {" + u8 + ", \"data_offsets\": [0, 4]}, \"" + std::string(100000, 'n') +
                  "\": 1}") +
          "abcd",
  };
  for (size_t i = 0; i < files.size(); ++i)
    EXPECT_FALSE(opens(files[i])) << "case " << i << ": " << files[i].substr(0, 80);
  // Metadata of any shape is tolerated; only string values are kept.
  EXPECT_TRUE(opens(with_header(R"({"__metadata__": {"a": "b", "n": 1, "o": {}}})")));
  EXPECT_TRUE(opens(with_header(R"({"__metadata__": [1, 2]})")));
}

TEST(SanitizeSafetensors, EveryTruncationIsRefused) {
  TempPath src("src");
  std::map<std::string, pipeline::TensorData> tensors;
  tensors["a"] = {pipeline::DType::kF32, {3, 5}, std::vector<std::byte>(60, std::byte{1})};
  tensors["b"] = {pipeline::DType::kF16, {7}, std::vector<std::byte>(14, std::byte{2})};
  pipeline::write_safetensors(src.path(), tensors);
  const std::string whole = read_all(src.path());
  ASSERT_TRUE(opens(whole));
  for (size_t n = 0; n < whole.size(); ++n) EXPECT_FALSE(opens(whole.substr(0, n))) << n;
}

TEST(SanitizeSafetensors, RandomHeaderMutationsOpenOrThrowModelError) {
  TempPath src("mutsrc");
  std::map<std::string, pipeline::TensorData> tensors;
  tensors["weight"] = {pipeline::DType::kBF16, {4, 4}, std::vector<std::byte>(32, std::byte{3})};
  tensors["bias"] = {pipeline::DType::kI64, {4}, std::vector<std::byte>(32, std::byte{4})};
  pipeline::write_safetensors(src.path(), tensors);
  const std::string whole = read_all(src.path());
  const char alphabet[] = "0123456789[]{}\",:- eE.\\\xff\x00";
  std::mt19937 rng(7);
  for (int i = 0; i < 400; ++i) {
    std::string m = whole;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % m.size();
      m[at] = rng() % 2 ? alphabet[rng() % (sizeof alphabet - 1)] : static_cast<char>(rng());
    }
    opens(m, "mut");  // either way is fine; only a crash or a sanitizer report is not
  }
}

// ---- model-file reading -----------------------------------------------------------------------

TEST(SanitizeFileIo, RefusesWhatIsNotARegularFile) {
  const std::string dir = "/tmp";
  EXPECT_THROW(pipeline::read_regular_file(dir, 1 << 20), ModelError);
  EXPECT_THROW(pipeline::read_regular_file("/nonexistent/sdserve/x", 1 << 20), ModelError);
  TempPath fifo("fifo");
  ASSERT_EQ(::mkfifo(fifo.path().c_str(), 0600), 0);
  EXPECT_THROW(pipeline::read_regular_file(fifo.path(), 1 << 20), ModelError);  // must not block
  EXPECT_THROW(pipeline::SafetensorsFile::open(fifo.path()), ModelError);
  EXPECT_THROW(pipeline::SafetensorsFile::open(dir), ModelError);

  TempPath small("small");
  small.write(std::string(100000, 'z'));
  EXPECT_EQ(pipeline::read_regular_file(small.path(), 100000).size(), 100000u);
  EXPECT_THROW(pipeline::read_regular_file(small.path(), 99999), ModelError);
  TempPath empty("empty");
  empty.write("");
  EXPECT_EQ(pipeline::read_regular_file(empty.path(), 0), "");
}

// ---- CLIP tokenizer ------------------------------------------------------------------------

const pipeline::ClipTokenizer& tokenizer() {
  static const auto tok = pipeline::ClipTokenizer::load(tokenizer_dir() + "/vocab.json",
                                                        tokenizer_dir() + "/merges.txt");
  return tok;
}

TEST(SanitizeTokenizer, EncodeIsAlwaysMaxLength) {
  const auto& tok = tokenizer();
  const std::vector<std::string> texts = {
      "",
      "a photo of a cat",
      "  A PHOTO\tof\n\na CAT!!  ",
      "caf\xc3\xa9 na\xc3\xafve \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80 emoji",  // é, ï, CJK, 😀
      "e\xcc\x81 combining, \xef\xbc\xa1 fullwidth, \xc2\xa0nbsp",
      std::string("nul\0inside", 10),
      "\x01\x02\x7f control \xc2\x85 chars",
      "'s 't 're 've 'm 'll 'd it's <|startoftext|> <|endoftext|>",
      "1234567890 3.14 1,000,000",
      std::string(5000, ' '),
      std::string(5000, ','),
      test::random_words(4000, 1),
  };
  for (const auto& t : texts) {
    const auto ids = tok.encode(t);
    ASSERT_EQ(ids.size(), 77u) << t.substr(0, 40);
    EXPECT_EQ(ids.front(), tok.bos_id());
    for (int32_t id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(static_cast<size_t>(id), tok.vocab_size());
    }
  }
}

TEST(SanitizeTokenizer, InvalidUtf8AndRandomBytesDoNotCrash) {
  const auto& tok = tokenizer();
  std::mt19937 rng(11);
  for (int i = 0; i < 200; ++i) {
    std::string s(1 + rng() % 300, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    try {
      const auto ids = tok.encode(s);
      EXPECT_EQ(ids.size(), 77u);
      (void)tok.tokenize(s);
      (void)tok.tokenize(s, 3);
    } catch (const std::exception&) {
      // Refusing invalid UTF-8 is fine; reading out of bounds is not.
    }
  }
  for (const std::string s : {"\xc3", "\xe2\x82", "\xf0\x9f\x98", "\xed\xa0\x80", "\xf8\x88",
                              "a\xc3", "\xc0\xaf", "\xff\xfe\xfd"}) {
    try {
      (void)tok.encode(s);
    } catch (const std::exception&) {
    }
  }
}

// Bounded calls and huge words: tests/hardening_unit_test.cpp (built here too).

TEST(SanitizeTokenizer, ConcurrentCallsAgree) {
  const auto& tok = tokenizer();
  const std::string text = test::random_words(300, 9);
  const auto want = tok.encode(text);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i)
        ok[t] += tok.encode(test::random_words(50, 100 + t * 10 + i)).size() == 77u;
      ok[t] += tok.encode(text) == want;
    });
  for (auto& th : threads) th.join();
  for (int v : ok) EXPECT_EQ(v, 11);
}

TEST(SanitizeTokenizer, RefusesMalformedFiles) {
  const std::string merges = tokenizer_dir() + "/merges.txt";
  const std::string vocab = tokenizer_dir() + "/vocab.json";
  TempPath v("vocab"), m("merges");
  auto refused = [](const std::string& vocab_path, const std::string& merges_path) {
    try {
      pipeline::ClipTokenizer::load(vocab_path, merges_path);
      return false;
    } catch (const ModelError&) {
      return true;
    }
  };
  for (const std::string& bad : std::vector<std::string>{
           "", "{", "[1, 2]", "{\"a\": \"b\"}", "{\"a\": -1}", "{\"a\": 1e400}", "{\"a\": 1.5}",
           "{\"a\": 4294967296}", "{\"<|startoftext|>\": 0}",
           "{\"<|startoftext|>\": 0, \"<|endoftext|>\": 1, \"x\": " + std::string(100, '[') +
               std::string(100, ']') + "}",
           std::string(100000, '[') + std::string(100000, ']'), std::string("\xff\xfe{}")}) {
    v.write(bad);
    EXPECT_TRUE(refused(v.path(), merges)) << bad.substr(0, 60);
  }
  EXPECT_TRUE(refused("/nonexistent/vocab.json", merges));
  EXPECT_TRUE(refused(vocab, "/nonexistent/merges.txt"));
  EXPECT_TRUE(refused("/tmp", merges));
  for (const std::string& bad : std::vector<std::string>{
           "", "#version: 0.2\n", "#version: 0.2\na\n", "#version: 0.2\na b c\n",
           "#version: 0.2\n \n", std::string(1 << 16, '\n')}) {
    m.write(bad);
    EXPECT_TRUE(refused(vocab, m.path())) << bad.substr(0, 60);
  }
  EXPECT_THROW(pipeline::ClipTokenizer::load(vocab, merges, 1), ModelError);
}

// ---- images ------------------------------------------------------------------------------------

pipeline::RgbImage pattern(int w, int h, uint32_t seed) {
  pipeline::RgbImage img{w, h, std::vector<uint8_t>(static_cast<size_t>(w) * h * 3)};
  std::mt19937 rng(seed);
  for (auto& p : img.pixels) p = static_cast<uint8_t>(rng());
  return img;
}

TEST(SanitizeImage, ShrinkKeepsSidesWithinTheLimit) {
  // Very wide and very tall images: a side shorter than the box factor.
  const std::vector<std::array<int, 3>> cases = {
      {2048, 64, 16}, {64, 2048, 16}, {4096, 1, 16}, {1, 4096, 16}, {2047, 3, 7},
      {3, 2047, 7},   {1000, 999, 1}, {17, 17, 16},  {16, 16, 16},  {5, 3, 4},
      {8, 8, 0},      {8, 8, -1},     {255, 1, 254}, {1, 1, 1}};
  for (const auto& [w, h, max_side] : cases) {
    const auto img = pattern(w, h, static_cast<uint32_t>(w * 31 + h));
    const auto small = pipeline::shrink_to(img, max_side);
    ASSERT_EQ(small.pixels.size(), static_cast<size_t>(small.width) * small.height * 3)
        << w << "x" << h << " -> " << max_side;
    EXPECT_GE(small.width, 1);
    EXPECT_GE(small.height, 1);
    if (max_side > 0) {
      EXPECT_LE(small.width, std::max(max_side, 1)) << w << "x" << h << " -> " << max_side;
      EXPECT_LE(small.height, std::max(max_side, 1)) << w << "x" << h << " -> " << max_side;
    }
  }
  // A uniform image stays uniform at every size.
  std::mt19937 rng(5);
  for (int i = 0; i < 300; ++i) {
    const int w = 1 + static_cast<int>(rng() % 400), h = 1 + static_cast<int>(rng() % 400);
    const int max_side = 1 + static_cast<int>(rng() % 64);
    pipeline::RgbImage img{w, h, std::vector<uint8_t>(static_cast<size_t>(w) * h * 3, 77)};
    const auto small = pipeline::shrink_to(img, max_side);
    ASSERT_EQ(small.pixels.size(), static_cast<size_t>(small.width) * small.height * 3);
    EXPECT_LE(std::max(small.width, small.height), max_side) << w << "x" << h << " " << max_side;
    for (uint8_t v : small.pixels) ASSERT_EQ(v, 77) << w << "x" << h << " " << max_side;
  }
}

TEST(SanitizeImage, EncodersTakeOddSizes) {
  for (const auto& [w, h] : std::vector<std::pair<int, int>>{{1, 1}, {1, 97}, {97, 1}, {33, 17}}) {
    const auto img = pattern(w, h, 3);
    const auto png = pipeline::encode_png(img, {{"parameters", std::string(10000, 'p')}});
    EXPECT_EQ(pipeline::decode_png(png).pixels, img.pixels);
    for (int q : {0, 1, 50, 100, 1000}) EXPECT_GT(pipeline::encode_jpeg(img, q).size(), 100u);
  }
  pipeline::RgbImage bad{4, 4, std::vector<uint8_t>(10)};
  EXPECT_THROW(pipeline::encode_jpeg(bad), std::invalid_argument);
  EXPECT_THROW(pipeline::encode_png(bad), std::invalid_argument);
}

TEST(SanitizeImage, CorruptPngsThrow) {
  const auto png = pipeline::encode_png(pattern(23, 19, 1), {{"k", "v"}});
  for (const std::vector<uint8_t>& bytes :
       {std::vector<uint8_t>{}, std::vector<uint8_t>(7, 0x89), std::vector<uint8_t>(100, 0),
        std::vector<uint8_t>(png.begin(), png.begin() + 8),
        std::vector<uint8_t>(png.begin(), png.begin() + 40)})
    EXPECT_THROW(pipeline::decode_png(bytes), std::runtime_error);
  for (size_t n = 0; n < png.size(); n += 7)
    EXPECT_THROW(pipeline::decode_png(std::vector<uint8_t>(png.begin(), png.begin() + n)),
                 std::runtime_error)
        << n;
  // Flipped bytes after the signature and IHDR (so that no mutant claims a giant size).
  std::mt19937 rng(2);
  for (int i = 0; i < 300; ++i) {
    auto m = png;
    m[33 + rng() % (m.size() - 33)] ^= static_cast<uint8_t>(1 + rng() % 255);
    try {
      std::vector<std::pair<std::string, std::string>> text;
      const auto img = pipeline::decode_png(m, &text);
      EXPECT_EQ(img.pixels.size(), static_cast<size_t>(img.width) * img.height * 3);
    } catch (const std::runtime_error&) {
    }
  }
}

// ---- safe_json ---------------------------------------------------------------------------------

TEST(SanitizeSafeJson, DepthIsBoundedAndMessagesArePrintable) {
  EXPECT_THROW(safe_json::parse(std::string(1 << 20, '[')), safe_json::Error);
  EXPECT_THROW(safe_json::parse(std::string(65, '[') + std::string(65, ']')), safe_json::Error);
  EXPECT_EQ(safe_json::parse(std::string(64, '[') + std::string(64, ']')).size(), 1u);
  EXPECT_EQ(safe_json::nesting_depth("\"[[[\\\"[[\" [1]"), 1);
  EXPECT_EQ(safe_json::nesting_depth("]]]]}}"), 0);
  for (const std::string bad : {"\"caf\xc3\x28\"", "\"\xff\"", "1e400", "-1e400", "[1,]",
                                "{\"a\":}", "\"\\ud800\"", "\"\\u12\""}) {
    try {
      safe_json::parse(bad);
      ADD_FAILURE() << "parsed: " << bad;
    } catch (const safe_json::Error& e) {
      for (unsigned char c : std::string(e.what())) EXPECT_TRUE(c >= 0x20 && c < 0x80) << e.what();
    }
  }
  // describe() stays short and valid for anything, including strings of invalid UTF-8.
  std::string cut;  // 2-byte characters: cuts must fall between them
  for (int i = 0; i < 1000; ++i) cut += "\xc3\xa9";
  for (const nlohmann::json& v : {nlohmann::json(cut), nlohmann::json(std::string(1000, '\xff')),
                                  nlohmann::json(std::string(100000, 'x')), nlohmann::json::array(),
                                  nlohmann::json(std::vector<int>(1000, 1)),
                                  nlohmann::json(nullptr), nlohmann::json(1e300)}) {
    for (size_t max : {4u, 5u, 10u, 60u}) {
      const std::string d = safe_json::describe(v, max);
      EXPECT_LE(d.size(), std::max<size_t>(max, 30));
      EXPECT_NO_THROW((void)nlohmann::json(d).dump());
    }
  }
  EXPECT_NO_THROW((void)safe_json::dump(nlohmann::ordered_json(std::string("\xc3\x28"))));
}

// ---- job queue and result store ----------------------------------------------------------------

TEST(SanitizeJobQueue, PriorityOrderCapacityAndRemoval) {
  engine::BoundedPriorityQueue q(4);
  EXPECT_FALSE(q.front().has_value());
  EXPECT_TRUE(q.push("a", engine::Priority::kLow));
  EXPECT_TRUE(q.push("b", engine::Priority::kNormal));
  EXPECT_TRUE(q.push("c", engine::Priority::kHigh));
  EXPECT_TRUE(q.push("d", engine::Priority::kNormal));
  EXPECT_FALSE(q.push("e", engine::Priority::kHigh));
  EXPECT_EQ(*q.front(), "c");
  EXPECT_EQ(q.position("a"), 3);
  EXPECT_EQ(q.position("zzz"), -1);
  EXPECT_TRUE(q.remove("c"));
  EXPECT_FALSE(q.remove("c"));
  EXPECT_EQ(*q.front(), "b");
  while (q.front()) EXPECT_TRUE(q.remove(*q.front()));
  EXPECT_EQ(q.size(), 0u);
  engine::BoundedPriorityQueue none(0);
  EXPECT_FALSE(none.push("x", engine::Priority::kHigh));
}

TEST(SanitizeResultStore, EvictionExpiryAndErase) {
  using namespace std::chrono_literals;
  engine::ResultStore store(10s, 100);
  const auto t0 = std::chrono::steady_clock::now();
  auto png = [](size_t n) { return std::make_shared<const std::vector<uint8_t>>(n, 1); };
  EXPECT_TRUE(store.add("a", 0, png(30), t0).empty());
  EXPECT_TRUE(store.add("a", 1, png(30), t0).empty());
  const auto evicted = store.add("b", 0, png(60), t0 + 1s);
  ASSERT_EQ(evicted, std::vector<std::string>{"a"});
  EXPECT_EQ(store.get("a", 1), nullptr);
  EXPECT_FALSE(store.has_job("a"));
  // Bigger than the cap on its own: the others go, the job being added stays (its client is
  // about to ask for it).
  EXPECT_EQ(store.add("huge", 0, png(1000), t0 + 2s), std::vector<std::string>{"b"});
  EXPECT_NE(store.get("huge", 0), nullptr);
  EXPECT_EQ(store.get("b", 0), nullptr);
  EXPECT_EQ(store.bytes(), 1000u);
  store.erase("nope");
  store.erase("huge");
  EXPECT_EQ(store.get("huge", 0), nullptr);
  EXPECT_EQ(store.bytes(), 0u);
  EXPECT_TRUE(store.add("c", 3, png(10), t0 + 3s).empty());
  EXPECT_TRUE(store.expire(t0 + 5s).empty());
  EXPECT_EQ(store.expire(t0 + 14s), std::vector<std::string>{"c"});
  EXPECT_EQ(store.bytes(), 0u);
}

// ---- the sanitizers themselves -----------------------------------------------------------------

// Deliberate errors, to check that the sanitizers are live and that a report fails the run; each
// of these must make tools/sanitize.sh exit non-zero:
//   tools/sanitize.sh --gtest_also_run_disabled_tests --gtest_filter='*SelfCheck.HeapOverflow'
volatile int* g_leaked = nullptr;

TEST(DISABLED_SanitizerSelfCheck, HeapOverflow) {
  std::vector<int> v(4);
  volatile int* p = v.data();
  EXPECT_EQ(p[4], 0);  // one past the end: AddressSanitizer
}

TEST(DISABLED_SanitizerSelfCheck, SignedOverflow) {
  volatile int x = std::numeric_limits<int>::max();
  EXPECT_NE(x + 1, 0);  // UndefinedBehaviorSanitizer
}

TEST(DISABLED_SanitizerSelfCheck, Leak) {
  g_leaked = new int[10];  // LeakSanitizer, at exit
  g_leaked = nullptr;
}

}  // namespace
}  // namespace sdserve
