// A1111's "Model hash" (AutoV2: the first 10 hex digits of the checkpoint file's SHA-256),
// computed in the background after start, in /sdapi/v1/sd-models and in every PNG made after.
#include <thread>

#include "harness.h"
#include "pipeline/image.h"

namespace sdserve::itest {
namespace {

TEST(ModelHashTest, SingleFileHashReachesSdModelsAndPngs) {
  const std::string file = std::string(SDSERVE_BUILT_FIXTURES) + "/tiny-sd15.safetensors";
  // The reference digest from coreutils.
  const auto [code, out] = run_program({"/usr/bin/sha256sum", file}, {}, seconds(30));
  ASSERT_EQ(code, 0) << out;
  const std::string sha = out.substr(0, 64), autov2 = sha.substr(0, 10);

  // The tiny folder's configs, so that the native size is its 64 px (a bare SD 1.x file is
  // taken as 512 px, slow to warm up on a CPU).
  ServerProcess server(
      {"--model", file, "--single-file-config", std::string(SDSERVE_MODELS) + "/tiny-sd15"});
  json models;
  for (int i = 0; i < 1200; ++i) {  // hashing 9 MB takes well under a second
    models = get(server.port(), "/sdapi/v1/sd-models").body_json();
    if (models.is_array() && !models.empty() && !models[0]["hash"].is_null()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(models.is_array() && models.size() == 1u) << models.dump();
  EXPECT_EQ(models[0]["sha256"], sha);
  EXPECT_EQ(models[0]["hash"], autov2);
  EXPECT_EQ(models[0]["title"], "tiny-sd15 [" + autov2 + "]");

  const auto r = post(server.port(), "/v1/generate", {{"prompt", "a fox"}, {"steps", 1}});
  ASSERT_EQ(r.status, 200) << r.body;
  std::vector<std::pair<std::string, std::string>> text;
  pipeline::decode_png(std::vector<uint8_t>(r.body.begin(), r.body.end()), &text);
  ASSERT_EQ(text.size(), 1u);
  // A1111's order: ..., Size, Model hash, Model, ...
  EXPECT_NE(text[0].second.find("Size: 64x64, Model hash: " + autov2 + ", Model: tiny-sd15"),
            std::string::npos)
      << text[0].second;
}

TEST(ModelHashTest, AFolderHasNoHash) {
  ServerProcess server;
  const auto models = get(server.port(), "/sdapi/v1/sd-models").body_json();
  ASSERT_EQ(models.size(), 1u);
  EXPECT_TRUE(models[0]["hash"].is_null());
  EXPECT_EQ(models[0]["title"], "tiny-sd15");
}

}  // namespace
}  // namespace sdserve::itest
