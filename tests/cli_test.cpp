// `sdserve generate` as a user runs it: the real binary, real files.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "pipeline/image.h"
#include "test_util.h"

namespace sdserve {
namespace {

struct Result {
  int code;
  std::string output;  // stdout and stderr together
};

Result run(const std::string& args) {
  const std::string cmd = std::string(SDSERVE_BINARY) + " " + args + " 2>&1";
  FILE* pipe = ::popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) out.append(buf.data(), n);
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

class CliGenerate : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("sdserve-cli-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::filesystem::path dir_;
};

std::vector<uint8_t> read_file(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

TEST_F(CliGenerate, WritesPngsWithParameters) {
  const auto r =
      run("generate --prompt 'a red cube' --negative blurry --seed 3 -n 2 --steps 4 --width 64 "
          "--height 64 --sampler 'DPM++ 2M Karras' --clip-skip 2 -q -o " +
          path("out.png"));
  ASSERT_EQ(r.code, 0) << r.output;
  ASSERT_TRUE(std::filesystem::exists(path("out.png")));
  ASSERT_TRUE(std::filesystem::exists(path("out-1.png")));
  std::vector<std::pair<std::string, std::string>> text;
  const auto img = pipeline::decode_png(read_file(path("out-1.png")), &text);
  EXPECT_EQ(img.width, 64);
  ASSERT_EQ(text.size(), 1u);
  EXPECT_EQ(text[0].first, "parameters");
  const std::string& p = text[0].second;
  EXPECT_EQ(
      p.rfind(
          "a red cube\nNegative prompt: blurry\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras",
          0),
      0u)
      << p;
  EXPECT_NE(p.find("Seed: 4"), std::string::npos) << p;  // image 1 uses seed + 1
  EXPECT_NE(p.find("Clip skip: 2"), std::string::npos) << p;
}

TEST_F(CliGenerate, InitImageTakesItsSizeAndRecordsTheStrength) {
  const std::string init = test::fixture("img2img-init-96x64.png");
  const auto r = run("generate --prompt 'a cat' --seed 5 --steps 6 --init-image " + init +
                     " --strength 0.5 -q -o " + path("i2i.png"));
  ASSERT_EQ(r.code, 0) << r.output;
  std::vector<std::pair<std::string, std::string>> text;
  const auto img = pipeline::decode_png(read_file(path("i2i.png")), &text);
  EXPECT_EQ(img.width, 96);
  EXPECT_EQ(img.height, 64);
  ASSERT_EQ(text.size(), 1u);
  EXPECT_NE(text[0].second.find("Denoising strength: 0.5"), std::string::npos) << text[0].second;
  // No step would run; a strength without a picture; a file that is not one.
  EXPECT_EQ(run("generate --prompt x --steps 6 --init-image " + init + " --strength 0.05 -q -o " +
                path("no.png"))
                .code,
            2);
  EXPECT_EQ(run("generate --prompt x --strength 0.5 -q -o " + path("no.png")).code, 2);
  const auto bad = run("generate --prompt x --init-image " + test::fixture("README.md") +
                       " -q -o " + path("no.png"));
  EXPECT_EQ(bad.code, 2) << bad.output;
  EXPECT_NE(bad.output.find("not a PNG"), std::string::npos) << bad.output;
}

TEST_F(CliGenerate, JpegOutputKeepsParametersInExif) {
  const auto r =
      run("generate --prompt 'caf\xc3\xa9 au lait' --seed 5 --steps 2 --width 64 --height 64 "
          "-q -o " +
          path("out.JPG"));
  ASSERT_EQ(r.code, 0) << r.output;
  const auto jpeg = read_file(path("out.JPG"));
  ASSERT_GT(jpeg.size(), 2u);
  EXPECT_EQ(jpeg[0], 0xFF);
  EXPECT_EQ(jpeg[1], 0xD8);
  // UserComment = "UNICODE\0" + UTF-16BE: the prompt's "café" as 00 63 00 61 00 66 00 E9.
  const std::string raw(jpeg.begin(), jpeg.end());
  EXPECT_NE(raw.find(std::string("UNICODE\0", 8)), std::string::npos);
  EXPECT_NE(raw.find(std::string("\0c\0a\0f\0\xe9", 8)), std::string::npos);
  EXPECT_NE(raw.find(std::string("\0S\0e\0e\0d\0:\0 \0005", 14)), std::string::npos);
}

TEST_F(CliGenerate, SameSeedSameBytesFromSingleFile) {
  const std::string common = " --prompt cat --seed 9 --steps 3 --width 64 --height 64 -q -o ";
  ASSERT_EQ(run("generate" + common + path("a.png")).code, 0);
  ASSERT_EQ(run("generate --model " + test::single_file() + common + path("b.png")).code, 0);
  EXPECT_EQ(pipeline::decode_png(read_file(path("a.png"))).pixels,
            pipeline::decode_png(read_file(path("b.png"))).pixels);
}

TEST_F(CliGenerate, BadArgumentsExitNonZeroWithMessage) {
  const std::string o = " -o " + path("x.png");
  struct Case {
    std::string args, message;
  } cases[] = {
      {"generate" + o, "--prompt is required"},
      {"generate --prompt x", "-o/--output is required"},
      {"generate --prompt x --steps 0" + o, "--steps must be between 1 and 150"},
      {"generate --prompt x --steps many" + o, "--steps must be an integer"},
      {"generate --prompt x --cfg 31" + o, "--cfg must be between"},
      {"generate --prompt x --width 65" + o, "--width must be a multiple of 8"},
      {"generate --prompt x --sampler eulr" + o, "sampler 'eulr' is unknown"},
      {"generate --prompt x --sampler ddim --scheduler karras" + o, "has no sigma schedule"},
      {"generate --prompt x --seed -5" + o, "--seed must be a non-negative integer"},
      {"generate --prompt x --bogus 1" + o, "unknown option '--bogus'"},
      {"generate --prompt x --clip-skip 9 --width 64 --height 64" + o,
       "clip_skip must be an integer between 1 and 3"},
      {"generate --prompt x --model /nonexistent" + o, "does not exist"},
      {"generate --prompt x --model " + test::fixture("README.md") + o, "safetensors"},
      {"generate --prompt x -o /nonexistent-dir/x.png", "does not exist"},
      {"generate --prompt x -o " + path("x.webp"), "writes .png or .jpg/.jpeg"},
      {"frobnicate", "unknown command 'frobnicate'"},
  };
  for (const auto& c : cases) {
    const auto r = run(c.args);
    EXPECT_NE(r.code, 0) << c.args;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.args << "\n" << r.output;
  }
}

TEST_F(CliGenerate, RefusesPickleCheckpoint) {
  std::ofstream(path("model.ckpt")) << "not really a pickle";
  const auto r = run("generate --prompt x -o " + path("x.png") + " --model " + path("model.ckpt"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("pickle"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace sdserve
