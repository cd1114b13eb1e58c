// A models folder over the real service (--models-dir): requests pick checkpoints through /v1
// and A1111's routes and get the image a service started with just that model gives; models
// beyond model_memory_mb are evicted; a hostile file is listed with its reason and never stops
// the service; a file added while it runs is found by a refresh; A1111's options keep one
// checkpoint per API key.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "harness.h"
#include "pipeline/image.h"

namespace fs = std::filesystem;

namespace sdserve::itest {
namespace {

std::string sd15_file() {
  return std::string(SDSERVE_BUILT_FIXTURES) + "/tiny-sd15.safetensors";
}
std::string sdxl_folder() {
  return std::string(SDSERVE_FIXTURES) + "/tiny-sdxl";
}

// MODELS/Stable-diffusion: tiny-sd15.safetensors, tiny-sdxl/ (diffusers), a truncated
// .safetensors whose header claims 2^60 bytes, and a pickle; MODELS/Lora: one file.
class ModelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("sdserve-models-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    const fs::path sd = dir_ / "Stable-diffusion";
    fs::create_directories(sd);
    fs::copy_file(sd15_file(), sd / "tiny-sd15.safetensors");
    fs::copy(sdxl_folder(), sd / "tiny-sdxl", fs::copy_options::recursive);
    std::string hostile(8, '\0');
    hostile[7] = 0x10;  // a header length of 2^60 bytes
    std::ofstream(sd / "evil.safetensors", std::ios::binary) << hostile << "{";
    std::ofstream(sd / "old.ckpt", std::ios::binary) << "PK\x03\x04 pickle";
    fs::create_directories(dir_ / "Lora");
    std::ofstream(dir_ / "Lora" / "style.safetensors", std::ios::binary)
        << std::string("\x02\0\0\0\0\0\0\0{}", 10);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<std::string> args(std::vector<std::string> more = {}) const {
    std::vector<std::string> a = {"--models-dir", dir_.string()};
    a.insert(a.end(), more.begin(), more.end());
    return a;
  }

  fs::path dir_;
};

json job(const std::string& model, uint64_t seed) {
  json j = {{"prompt", "a lighthouse at dusk"},
            {"steps", 3},
            {"seed", seed},
            {"width", 64},
            {"height", 64}};
  if (!model.empty()) j["model"] = model;
  return j;
}

std::vector<uint8_t> pixels_of(const HttpResult& r) {
  EXPECT_EQ(r.status, 200) << r.body;
  if (r.status != 200) return {};
  return pipeline::decode_png({r.body.begin(), r.body.end()}).pixels;
}

std::vector<uint8_t> a1111_pixels(const HttpResult& r, json* info = nullptr) {
  EXPECT_EQ(r.status, 200) << r.body;
  if (r.status != 200) return {};
  const json body = r.body_json();
  if (info) *info = json::parse(body["info"].get<std::string>());
  return pipeline::decode_png(unbase64_of(body["images"][0].get<std::string>())).pixels;
}

TEST_F(ModelsTest, RequestsPickTheirCheckpointAndGetTheImageOfAServiceRunningJustIt) {
  // The reference: a service started with one model.
  std::map<std::string, std::vector<uint8_t>> alone;
  for (const auto& [name, path] : std::map<std::string, std::string>{
           {"tiny-sd15", sd15_file()}, {"tiny-sdxl", sdxl_folder()}}) {
    ServerProcess one({"--model", path});
    alone[name] = pixels_of(post(one.port(), "/v1/generate", job("", 3)));
  }
  ASSERT_NE(alone["tiny-sd15"], alone["tiny-sdxl"]);

  ServerProcess server(args());
  const int port = server.port();
  // Alternating through /v1 and A1111, by name, file name, title and hash.
  const json models = get(port, "/v1/models").body_json();
  EXPECT_EQ(models["default"], "tiny-sd15");
  std::string sdxl_hash;
  for (const auto& m : models["models"])
    if (m["name"] == "tiny-sdxl")
      sdxl_hash = m.value("hash", json()).is_string() ? m["hash"] : json("");
  for (int round = 0; round < 2; ++round) {
    EXPECT_EQ(pixels_of(post(port, "/v1/generate", job("tiny-sdxl", 3))), alone["tiny-sdxl"]);
    EXPECT_EQ(pixels_of(post(port, "/v1/generate", job("", 3))), alone["tiny-sd15"]);
    EXPECT_EQ(pixels_of(post(port, "/v1/generate", job("tiny-sd15.safetensors", 3))),
              alone["tiny-sd15"]);
    json a = {{"prompt", "a lighthouse at dusk"},
              {"steps", 3},
              {"seed", 3},
              {"width", 64},
              {"height", 64},
              {"sampler_name", "Euler"},
              {"cfg_scale", 7.5}};
    json info;
    EXPECT_EQ(a1111_pixels(post(port, "/sdapi/v1/txt2img", a), &info), alone["tiny-sd15"]);
    EXPECT_EQ(info["sd_model_name"], "tiny-sd15");
    a["override_settings"] = {{"sd_model_checkpoint", "tiny-sdxl"}};
    EXPECT_EQ(a1111_pixels(post(port, "/sdapi/v1/txt2img", a), &info), alone["tiny-sdxl"]);
    EXPECT_EQ(info["sd_model_name"], "tiny-sdxl");
  }
  // The hash is computed in the background: once known, it names the model too (A1111's
  // "name [hash]" titles, and the PNG's Model hash).
  for (int i = 0; i < 100 && sdxl_hash.empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const json listed = get(port, "/v1/models").body_json();  // alive through the loop
    for (const auto& m : listed["models"])
      if (m["name"] == "tiny-sdxl" && m["hash"].is_string()) sdxl_hash = m["hash"];
  }
  ASSERT_EQ(sdxl_hash.size(), 10u);
  EXPECT_EQ(pixels_of(post(port, "/v1/generate", job(sdxl_hash, 3))), alone["tiny-sdxl"]);
  const auto r = post(port, "/v1/generate", job("whatever [" + sdxl_hash + "]", 3));
  EXPECT_EQ(pixels_of(r), alone["tiny-sdxl"]);
  std::vector<std::pair<std::string, std::string>> text;
  pipeline::decode_png({r.body.begin(), r.body.end()}, &text);
  ASSERT_FALSE(text.empty());
  EXPECT_NE(text[0].second.find("Model hash: " + sdxl_hash), std::string::npos) << text[0].second;
  // Where each model is loaded, and A1111's list.
  const json listed = get(port, "/v1/models").body_json();
  for (const auto& m : listed["models"]) {
    if (m["name"] == "tiny-sdxl" || m["name"] == "tiny-sd15") {
      EXPECT_EQ(m["loaded_on"].size(), 1u) << m.dump();
    }
  }
  const json sd_models = get(port, "/sdapi/v1/sd-models").body_json();
  ASSERT_EQ(sd_models.size(), 2u) << sd_models.dump();  // the usable ones
  EXPECT_EQ(sd_models[1]["title"], "tiny-sdxl [" + sdxl_hash + "]");
}

TEST_F(ModelsTest, HostileAndPickledFilesAreListedWithTheirReasonsAndRefusedByName) {
  ServerProcess server(args());
  const int port = server.port();
  const json models = get(port, "/v1/models").body_json();
  std::map<std::string, json> by_name;
  for (const auto& m : models["models"]) by_name[m["name"]] = m;
  ASSERT_TRUE(by_name.count("evil"));
  EXPECT_FALSE(by_name["evil"]["usable"].get<bool>());
  EXPECT_NE(by_name["evil"]["error"].get<std::string>().find("safetensors"), std::string::npos);
  EXPECT_NE(by_name["old"]["error"].get<std::string>().find("pickle"), std::string::npos);
  for (const std::string name : {"evil", "old", "missing"}) {
    const auto r = post(port, "/v1/jobs", job(name, 1));
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_EQ(r.body_json()["error"]["field"], "model");
  }
  json a = {{"prompt", "x"}, {"override_settings", {{"sd_model_checkpoint", "evil"}}}};
  const auto r = post(port, "/sdapi/v1/txt2img", a);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.body_json()["error"]["field"], "override_settings.sd_model_checkpoint");
  EXPECT_EQ(get(port, "/sdapi/v1/loras").body_json().size(), 1u);
  // ... and the service goes on.
  EXPECT_EQ(post(port, "/v1/generate", job("", 1)).status, 200);
}

TEST_F(ModelsTest, ModelsBeyondModelMemoryAreEvictedLeastRecentlyUsedFirst) {
  fs::copy_file(sd15_file(), dir_ / "Stable-diffusion" / "tiny-sd15-copy.safetensors");
  // Weights as loaded in fp32: 19.2 MB per SD 1.x file, 17.3 MB for the SDXL folder. 37 MiB
  // hold the default and one more.
  ServerProcess server(args({"--model-memory-mb", "37"}));
  const int port = server.port();
  for (const std::string name : {"tiny-sdxl", "tiny-sd15-copy", "tiny-sdxl", ""}) {
    const auto r = post(port, "/v1/generate", job(name, 2));
    ASSERT_EQ(r.status, 200) << r.body;
    int loaded = 0;
    const json listed = get(port, "/v1/models").body_json();
    for (const auto& m : listed["models"]) loaded += static_cast<int>(m["loaded_on"].size());
    EXPECT_EQ(loaded, 2) << name;  // the default and the last one
  }
  const std::string metrics = get(port, "/metrics").body;
  EXPECT_NE(metrics.find("sdserve_model_evictions_total 2"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("sdserve_model_loads_total{result=\"ok\"} 3"), std::string::npos);
  EXPECT_NE(metrics.find("sdserve_models_loaded 2"), std::string::npos);
}

TEST_F(ModelsTest, AModelAddedWhileRunningIsFoundByARefresh) {
  ServerProcess server(args());
  const int port = server.port();
  EXPECT_EQ(post(port, "/v1/jobs", job("later", 1)).status, 400);
  fs::copy_file(sd15_file(), dir_ / "Stable-diffusion" / "later.safetensors");
  EXPECT_EQ(post(port, "/v1/jobs", job("later", 1)).status, 400);  // not yet refreshed
  EXPECT_EQ(http(port, verb::post, "/sdapi/v1/refresh-checkpoints").status, 200);
  EXPECT_EQ(post(port, "/v1/generate", job("later", 1)).status, 200);
  fs::copy_file(sd15_file(), dir_ / "Stable-diffusion" / "later2.safetensors");
  const auto refreshed = http(port, verb::post, "/v1/models/refresh");
  EXPECT_EQ(refreshed.status, 200);
  EXPECT_NE(refreshed.body.find("later2"), std::string::npos);
}

TEST_F(ModelsTest, A1111OptionsSetTheCheckpointPerApiKey) {
  ServerProcess server(args({"--api-keys", "k1,k2"}));
  const int port = server.port();
  const Headers k1 = {{"Authorization", "Bearer k1"}}, k2 = {{"Authorization", "Bearer k2"}};
  const auto set = http(port, verb::post, "/sdapi/v1/options",
                        json{{"sd_model_checkpoint", "tiny-sdxl"}}.dump(), k1);
  ASSERT_EQ(set.status, 200) << set.body;
  EXPECT_EQ(set.body, "null");
  const auto title = [&](const Headers& h) {
    return get(port, "/sdapi/v1/options", h).body_json()["sd_model_checkpoint"].get<std::string>();
  };
  EXPECT_EQ(title(k1).rfind("tiny-sdxl", 0), 0u) << title(k1);
  EXPECT_EQ(title(k2).rfind("tiny-sd15.safetensors", 0), 0u) << title(k2);
  const json a = {{"prompt", "x"}, {"steps", 2}, {"width", 64}, {"height", 64}};
  json info;
  a1111_pixels(post(port, "/sdapi/v1/txt2img", a, k1), &info);
  EXPECT_EQ(info["sd_model_name"], "tiny-sdxl");
  a1111_pixels(post(port, "/sdapi/v1/txt2img", a, k2), &info);
  EXPECT_EQ(info["sd_model_name"], "tiny-sd15");
  // A checkpoint it does not have, and a setting it cannot change, are refused by name.
  const auto bad =
      http(port, verb::post, "/sdapi/v1/options", json{{"sd_model_checkpoint", "nope"}}.dump(), k1);
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(bad.body_json()["error"]["field"], "sd_model_checkpoint");
  const auto fixed =
      http(port, verb::post, "/sdapi/v1/options", json{{"samples_format", "jpg"}}.dump(), k1);
  EXPECT_EQ(fixed.status, 400);
  EXPECT_EQ(fixed.body_json()["error"]["field"], "samples_format");
}

}  // namespace
}  // namespace sdserve::itest
