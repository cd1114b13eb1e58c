// LoRAs over the real service: /v1's `loras` and A1111's <lora:...> tags give diffusers' image
// (the reference tiny-sd15-lora-reference.safetensors: load_lora_weights + fuse_lora on the UNet;
// its prompts went in as diffusers' embeddings without LoRA, so these requests give the text
// encoders weight 0), the PNG carries A1111's "Lora hashes", a text-encoder LoRA is part of the
// prompt embedding's cache key, and unknown or broken LoRAs are 400s naming the field.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "harness.h"
#include "pipeline/image.h"
#include "pipeline/io/safetensors.h"

namespace fs = std::filesystem;

namespace sdserve::itest {
namespace {

class LoraTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("sdserve-lora-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "Stable-diffusion");
    fs::create_directories(dir_ / "Lora");
    fs::copy(std::string(SDSERVE_MODELS) + "/tiny-sd15", dir_ / "Stable-diffusion" / "tiny-sd15",
             fs::copy_options::recursive);
    for (const char* name : {"tiny-sd15-kohya", "tiny-sd15-peft"})
      fs::copy_file(std::string(SDSERVE_FIXTURES) + "/lora/" + name + ".safetensors",
                    dir_ / "Lora" / (std::string(name) + ".safetensors"));
    std::ofstream(dir_ / "Lora" / "broken.safetensors", std::ios::binary)
        << std::string("\x02\0\0\0\0\0\0\0{}", 10);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

// diffusers' "two" run: euler a, 8 steps, CFG 7.5, seed 7, 64x64, kohya at 0.7 and PEFT at 0.5.
json two_loras_job() {
  return {{"prompt", "a photo of a cat"},
          {"sampler", "euler_ancestral"},
          {"steps", 8},
          {"guidance_scale", 7.5},
          {"seed", 7},
          {"width", 64},
          {"height", 64}};
}

// The reference image (1, 3, 64, 64) in [0, 1].
std::vector<float> reference_image() {
  const auto file = pipeline::SafetensorsFile::open(std::string(SDSERVE_FIXTURES) +
                                                    "/tiny-sd15-lora-reference.safetensors");
  const auto& view = file->at("lora_two_image");
  std::vector<float> out(view.nbytes / sizeof(float));
  std::memcpy(out.data(), view.data, view.nbytes);
  return out;
}

// Largest difference between the PNG (8-bit RGB) and the reference, in levels of 255.
double worst_levels(const HttpResult& r, const std::vector<float>& ref) {
  EXPECT_EQ(r.status, 200) << r.body;
  if (r.status != 200) return 1e9;
  const auto img = pipeline::decode_png({r.body.begin(), r.body.end()});
  EXPECT_EQ(img.width * img.height * 3, static_cast<int>(ref.size()));
  double worst = 0;
  const int plane = img.width * img.height;
  for (int c = 0; c < 3; ++c)
    for (int i = 0; i < plane; ++i)
      worst = std::max(worst, std::fabs(img.pixels[3 * i + c] - ref[c * plane + i] * 255.0));
  return worst;
}

TEST_F(LoraTest, LorasByFieldAndByTagGiveDiffusersImage) {
  ServerProcess server({"--models-dir", dir_.string()});
  const int port = server.port();
  const auto ref = reference_image();
  // Rounding to 8 bits is half a level; the CPU parity bound (5e-5 of the range) adds little.
  constexpr double kLevels = 1.0;
  json by_field = two_loras_job();
  by_field["loras"] = {{{"name", "tiny-sd15-kohya"}, {"te_weight", 0}, {"unet_weight", 0.7}},
                       {{"name", "tiny-sd15-peft"}, {"te_weight", 0}, {"unet_weight", 0.5}}};
  const auto a = post(port, "/v1/generate", by_field);
  EXPECT_LE(worst_levels(a, ref), kLevels);
  json by_tag = two_loras_job();
  by_tag["prompt"] =
      "a photo of a cat<lora:tiny-sd15-kohya:0:0.7><lora:tiny-sd15-peft:te=0:unet=0.5>";
  const auto b = post(port, "/v1/generate", by_tag);
  EXPECT_LE(worst_levels(b, ref), kLevels);
  // Without the LoRAs the image is far from it: the comparison above can fail.
  EXPECT_GT(worst_levels(post(port, "/v1/generate", two_loras_job()), ref), 10 * kLevels);
  // The PNG says which LoRAs, as A1111 does (12 digits of the addnet hash), and keeps the tags in
  // the prompt.
  std::vector<std::pair<std::string, std::string>> text;
  pipeline::decode_png({b.body.begin(), b.body.end()}, &text);
  ASSERT_FALSE(text.empty());
  const std::string& params = text[0].second;
  EXPECT_NE(params.find("<lora:tiny-sd15-kohya:0:0.7>"), std::string::npos) << params;
  EXPECT_NE(params.find("Lora hashes: \"tiny-sd15-kohya: "), std::string::npos) << params;
  // A1111's txt2img with the tags: the same image.
  const json a1111 = {{"prompt", by_tag["prompt"]},
                      {"sampler_name", "Euler a"},
                      {"steps", 8},
                      {"cfg_scale", 7.5},
                      {"seed", 7},
                      {"width", 64},
                      {"height", 64}};
  const auto c = post(port, "/sdapi/v1/txt2img", a1111);
  ASSERT_EQ(c.status, 200) << c.body;
  const auto png = unbase64_of(c.body_json()["images"][0].get<std::string>());
  HttpResult as_png;
  as_png.status = 200;
  as_png.body.assign(png.begin(), png.end());
  EXPECT_LE(worst_levels(as_png, ref), kLevels);
}

TEST_F(LoraTest, ATextEncoderLoraIsPartOfTheEmbeddingsCacheKey) {
  ServerProcess server({"--models-dir", dir_.string()});
  const int port = server.port();
  json plain = two_loras_job();
  const auto without = post(port, "/v1/generate", plain);  // fills the embedding cache
  ASSERT_EQ(without.status, 200);
  // The same prompt with a LoRA on the text encoders only: a cache keyed on the tokens alone
  // would hand back the embedding above, and the image would not change.
  json te_only = plain;
  te_only["loras"] = {{{"name", "tiny-sd15-kohya"}, {"te_weight", 1.0}, {"unet_weight", 0}}};
  const auto with = post(port, "/v1/generate", te_only);
  ASSERT_EQ(with.status, 200);
  EXPECT_NE(pipeline::decode_png({with.body.begin(), with.body.end()}).pixels,
            pipeline::decode_png({without.body.begin(), without.body.end()}).pixels);
  // And the plain prompt again: the cached embedding without the LoRA, the first image.
  const auto again = post(port, "/v1/generate", plain);
  EXPECT_EQ(pipeline::decode_png({again.body.begin(), again.body.end()}).pixels,
            pipeline::decode_png({without.body.begin(), without.body.end()}).pixels);
}

TEST_F(LoraTest, UnknownAndBrokenLorasAre400sNamingTheField) {
  ServerProcess server({"--models-dir", dir_.string()});
  const int port = server.port();
  const auto field_of = [](const HttpResult& r) {
    return r.body_json()["error"].value("field", std::string());
  };
  json j = two_loras_job();
  j["prompt"] = "a cat <lora:nope:1>";
  auto r = post(port, "/v1/jobs", j);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(field_of(r), "prompt");
  j["prompt"] = "a cat <hypernet:x:1>";
  r = post(port, "/v1/jobs", j);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(field_of(r), "prompt");
  j = two_loras_job();
  for (const json& loras :
       {json{{{"name", "broken"}}}, json{{{"name", "nope"}}}, json{{{"weight", 1}}},
        json{{{"name", "tiny-sd15-kohya"}, {"weight", 1000}}}, json("x")}) {
    j["loras"] = loras;
    r = post(port, "/v1/jobs", j);
    EXPECT_EQ(r.status, 400) << loras.dump() << r.body;
    EXPECT_EQ(field_of(r), "loras") << loras.dump() << r.body;
  }
  EXPECT_EQ(post(port, "/v1/generate", two_loras_job()).status, 200);  // it goes on
}

// Textual inversion: an embedding in MODELS/embeddings (or --embeddings-dir) is called by its
// name in a prompt, A1111's /sdapi/v1/embeddings lists it, and one added later is found by a
// refresh.
TEST_F(LoraTest, EmbeddingsAreCalledByNameAndListed) {
  fs::create_directories(dir_ / "embeddings");
  fs::copy_file(std::string(SDSERVE_FIXTURES) + "/embeddings/tiny-sd15/tiemb.safetensors",
                dir_ / "embeddings" / "tiemb.safetensors");
  const fs::path extra = dir_ / "extra-embeddings";
  fs::create_directories(extra);
  ServerProcess server({"--models-dir", dir_.string(), "--embeddings-dir", extra.string()});
  const int port = server.port();
  const json listed = get(port, "/sdapi/v1/embeddings").body_json();
  ASSERT_TRUE(listed["loaded"].contains("tiemb")) << listed.dump();
  EXPECT_EQ(listed["loaded"]["tiemb"]["vectors"], 3);
  json j = {{"prompt", "a photo of tiemb on a table"},
            {"steps", 3},
            {"seed", 1},
            {"width", 64},
            {"height", 64}};
  const auto with = post(port, "/v1/generate", j);
  // "tistp" is not an embedding yet: its word is text.
  j["prompt"] = "a photo of tistp on a table";
  const auto before = post(port, "/v1/generate", j);
  ASSERT_EQ(with.status, 200);
  ASSERT_EQ(before.status, 200);
  fs::copy_file(std::string(SDSERVE_FIXTURES) + "/embeddings/tiny-sd15/tistp.safetensors",
                extra / "tistp.safetensors");
  ASSERT_EQ(http(port, verb::post, "/v1/models/refresh").status, 200);
  EXPECT_TRUE(get(port, "/sdapi/v1/embeddings").body_json()["loaded"].contains("tistp"));
  const auto after = post(port, "/v1/generate", j);
  ASSERT_EQ(after.status, 200);
  // The embedding changed the prompt's embedding (and the cache did not hand back the old one).
  EXPECT_NE(pipeline::decode_png({after.body.begin(), after.body.end()}).pixels,
            pipeline::decode_png({before.body.begin(), before.body.end()}).pixels);
}

}  // namespace
}  // namespace sdserve::itest
