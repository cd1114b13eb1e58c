#include "pipeline/io/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "pipeline/errors.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

class TempFile {
 public:
  explicit TempFile(const std::string& tag) {
    path_ = "/tmp/sdserve-test-" + std::to_string(::getpid()) + "-" + tag;
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }
  void write_raw(const std::string& bytes) const {
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << bytes;
  }

 private:
  std::string path_;
};

std::string header_bytes(const std::string& json) {
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + json;
}

void expect_refused(const std::string& bytes, const std::string& fragment) {
  TempFile f("bad");
  f.write_raw(bytes);
  try {
    SafetensorsFile::open(f.path());
    FAIL() << "expected a ModelError containing: " << fragment;
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(Safetensors, ReadsFixtureReference) {
  auto file = SafetensorsFile::open(test::fixture("tiny-sd15-reference.safetensors"));
  EXPECT_EQ(file->tensors().size(), 118u);
  const auto& v = file->at("tokens_0");
  EXPECT_EQ(v.dtype, DType::kF32);
  EXPECT_EQ(v.shape, (std::vector<int64_t>{1, 77}));
  EXPECT_EQ(v.nbytes, 77u * 4);
}

TEST(Safetensors, RoundTripsWrittenTensors) {
  TempFile f("rt");
  TensorData t{DType::kF16, {2, 3}, std::vector<std::byte>(12, std::byte{0x3c})};
  write_safetensors(f.path(), {{"w", t}});
  auto file = SafetensorsFile::open(f.path());
  auto tensor = to_tensor(file->at("w"));
  EXPECT_EQ(tensor.sizes(), (std::vector<int64_t>{2, 3}));
  EXPECT_FLOAT_EQ(tensor[1][2].item<float>(), 1.0585938f);  // 0x3c3c as fp16: 1 + 60/1024
}

TEST(Safetensors, RefusesTooShortFile) {
  expect_refused("abc", "shorter than the 8-byte header");
}

TEST(Safetensors, RefusesHeaderPastEnd) {
  std::string b = header_bytes("{}");
  b[0] = 100;  // claims a 100-byte header
  expect_refused(b, "truncated or not safetensors");
}

TEST(Safetensors, RefusesBadJson) {
  expect_refused(header_bytes("{not json"), "does not parse");
}

TEST(Safetensors, RefusesDataPastEnd) {
  expect_refused(header_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})") +
                     std::string(8, '\0'),
                 "truncated file?");
}

TEST(Safetensors, RefusesSizeMismatch) {
  expect_refused(header_bytes(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})") +
                     std::string(16, '\0'),
                 "shape and dtype need 12");
}

TEST(Safetensors, RefusesUnknownDtype) {
  expect_refused(header_bytes(R"({"w":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})") + "x",
                 "unsupported dtype");
}

TEST(Safetensors, RefusesNegativeDimension) {
  expect_refused(header_bytes(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})") + "x",
                 "negative");
}

TEST(Safetensors, RefusesHugeShape) {
  expect_refused(
      header_bytes(
          R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,1]}})") +
          "x",
      "impossibly large");
}

TEST(Safetensors, MissingTensorIsNamed) {
  auto file = SafetensorsFile::open(test::fixture("tiny-sd15-reference.safetensors"));
  try {
    file->at("nope");
    FAIL();
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("'nope' is missing"), std::string::npos);
  }
}

}  // namespace
}  // namespace sdserve::pipeline
