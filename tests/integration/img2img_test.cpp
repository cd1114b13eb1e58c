// Image to image over the real service: init images in requests (base64, data: URLs), their
// checks, and img2img jobs sharing UNet batches with txt2img ones without changing their pixels.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "harness.h"
#include "pipeline/image.h"

namespace sdserve::itest {
namespace {

json img2img_job(uint64_t seed) {
  json j = small_job("a photo of a cat", 8, seed);
  j.erase("width");
  j.erase("height");  // from the init image: 96x64
  j["init_image"] = "data:image/png;base64," + base64_of(fixture_bytes("img2img-init-96x64.png"));
  j["strength"] = 0.5;
  return j;
}

pipeline::RgbImage fetch_image(int port, const std::string& id) {
  const auto r = get(port, "/v1/jobs/" + id + "/images/0");
  EXPECT_EQ(r.status, 200) << r.body;
  return pipeline::decode_png(std::vector<uint8_t>(r.body.begin(), r.body.end()));
}

std::string field_of(const HttpResult& r) {
  return r.body_json()["error"].value("field", "");
}

TEST(Img2ImgTest, InitImageTakesItsSizeRunsTheStepsThatRunAndRecordsTheStrength) {
  ServerProcess server;
  const int port = server.port();
  const auto r = post(port, "/v1/generate", img2img_job(5));
  ASSERT_EQ(r.status, 200) << r.body;
  const std::vector<uint8_t> png(r.body.begin(), r.body.end());
  const auto image = pipeline::decode_png(png);
  EXPECT_EQ(image.width, 96);
  EXPECT_EQ(image.height, 64);
  EXPECT_NE(pipeline::read_png_text(png, "parameters").find("Denoising strength: 0.5"),
            std::string::npos);
  const json job = get(port, "/v1/jobs/" + r.header("x-job-id")).body_json();
  EXPECT_EQ(job["request"]["init_image"], (json{{"width", 96}, {"height", 64}}));
  EXPECT_EQ(job["request"]["strength"], 0.5);
  EXPECT_EQ(job["steps"], 4) << "int(8 x 0.5) steps run";

  // Plain base64 and a data: URL give the same image; so does an explicit size equal to the
  // image's. The init image changes the result: the same request without it differs.
  json plain = img2img_job(5);
  plain["init_image"] = base64_of(fixture_bytes("img2img-init-96x64.png"));
  plain["width"] = 96;
  plain["height"] = 64;
  const auto again = post(port, "/v1/generate", plain);
  ASSERT_EQ(again.status, 200) << again.body;
  EXPECT_EQ(pipeline::decode_png(std::vector<uint8_t>(again.body.begin(), again.body.end())).pixels,
            image.pixels);
  json txt = small_job("a photo of a cat", 8, 5);
  txt["width"] = 96;
  txt["height"] = 64;
  const auto t2i = post(port, "/v1/generate", txt);
  ASSERT_EQ(t2i.status, 200);
  EXPECT_NE(pipeline::decode_png(std::vector<uint8_t>(t2i.body.begin(), t2i.body.end())).pixels,
            image.pixels);
}

TEST(Img2ImgTest, BadInitImagesAndStrengthsAre400NamingTheField) {
  ServerProcess server;
  const int port = server.port();
  const auto refused = [&](json body, const std::string& field, const std::string& words) {
    const auto r = post(port, "/v1/jobs", body);
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_EQ(field_of(r), field) << r.body;
    EXPECT_NE(r.body.find(words), std::string::npos) << r.body;
  };
  json j = img2img_job(1);
  j["init_image"] = "not an image!";
  refused(j, "init_image", "base64");
  j["init_image"] = base64_of({'G', 'I', 'F', '8', '9', 'a', 0, 0});
  refused(j, "init_image", "not a PNG");
  // A bomb: a valid PNG header declaring 60000x60000, no pixels.
  std::vector<uint8_t> bomb = {0x89, 'P', 'N',  'G',  '\r', '\n', 0x1A, '\n', 0,    0,
                               0,    13,  'I',  'H',  'D',  'R',  0,    0,    0xEA, 0x60,
                               0,    0,   0xEA, 0x60, 8,    2,    0,    0,    0};
  const std::vector<uint8_t> crc = {0x5C, 0x2A, 0x6A, 0x3C};  // not checked before the size
  bomb.insert(bomb.end(), crc.begin(), crc.end());
  j["init_image"] = base64_of(bomb);
  const auto r = post(port, "/v1/jobs", j);
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_EQ(field_of(r), "init_image");
  auto truncated = fixture_bytes("img2img-init-64x64.png");
  truncated.resize(truncated.size() / 2);
  j["init_image"] = base64_of(truncated);
  refused(j, "init_image", "corrupt");
  j = img2img_job(1);
  j["strength"] = 0.1;  // int(8 x 0.1) = 0 steps
  refused(j, "strength", "at least 1");
  j["strength"] = 1.5;
  refused(j, "strength", "between 0 and 1");
  json t = small_job("x", 4, 1);
  t["strength"] = 0.5;
  refused(t, "strength", "needs an init_image");
  EXPECT_EQ(get(port, "/healthz").status, 200);
}

TEST(Img2ImgTest, A1111Img2ImgGivesTheV1ImageAndRefusesWhatItLacksByName) {
  ServerProcess server;
  const int port = server.port();
  const std::string b64 = base64_of(fixture_bytes("img2img-init-96x64.png"));
  const json a1111 = {{"prompt", "a photo of a cat"},
                      {"init_images", {b64}},
                      {"denoising_strength", 0.5},
                      {"steps", 8},
                      {"seed", 5},
                      {"cfg_scale", 7.5},
                      {"sampler_name", "Euler"},
                      {"width", 96},
                      {"height", 64},
                      {"mask_blur", 4},
                      {"inpainting_fill", 1},
                      {"inpaint_full_res", true}};
  const auto r = post(port, "/sdapi/v1/img2img", a1111);
  ASSERT_EQ(r.status, 200) << r.body;
  const json answer = r.body_json();
  ASSERT_EQ(answer["images"].size(), 1u);
  const json info = json::parse(answer["info"].get<std::string>());
  EXPECT_EQ(info["denoising_strength"], 0.5);
  EXPECT_NE(info["infotexts"][0].get<std::string>().find("Denoising strength: 0.5"),
            std::string::npos);
  EXPECT_TRUE(answer["parameters"]["init_images"].is_null()) << "include_init_images is false";
  const std::string png_b64 = answer["images"][0];
  // The same request on /v1 gives the same pixels.
  json native = {{"prompt", "a photo of a cat"},
                 {"init_image", b64},
                 {"strength", 0.5},
                 {"steps", 8},
                 {"seed", 5},
                 {"guidance_scale", 7.5},
                 {"sampler", "euler"},
                 {"width", 96},
                 {"height", 64}};
  const auto v1 = post(port, "/v1/generate", native);
  ASSERT_EQ(v1.status, 200) << v1.body;
  const auto v1_png = pipeline::decode_png(std::vector<uint8_t>(v1.body.begin(), v1.body.end()));
  const json back = post(port, "/sdapi/v1/png-info", {{"image", png_b64}}).body_json();
  EXPECT_EQ(back["parameters"]["Denoising strength"], "0.5");
  EXPECT_EQ(v1_png.width, 96);
  EXPECT_EQ(pipeline::decode_png(unbase64_of(png_b64)).pixels, v1_png.pixels);

  const auto refused = [&](json body, const std::string& field) {
    const auto x = post(port, "/sdapi/v1/img2img", body);
    EXPECT_EQ(x.status, 400) << x.body;
    EXPECT_EQ(field_of(x), field) << x.body;
  };
  json j = a1111;
  j["mask"] = b64;
  j["mask_round"] = false;
  refused(j, "mask_round");
  j = a1111;
  j["resize_mode"] = 3;  // latent upscale
  refused(j, "resize_mode");
  j = a1111;
  j["denoising_strength"] = 1.5;
  refused(j, "denoising_strength");
  j = a1111;
  j.erase("init_images");
  refused(j, "init_images");
  j = a1111;
  j["init_images"] = {"bm90IGFuIGltYWdl"};  // "not an image"
  refused(j, "init_images");
  EXPECT_EQ(get(port, "/healthz").status, 200);
}

TEST(Img2ImgTest, SharesUnetBatchesWithTxt2ImgAndKeepsItsPixels) {
  ServerProcess server;
  const int port = server.port();
  // Alone.
  json x = img2img_job(4242);
  x["steps"] = 12;  // 6 run
  const std::string alone = submit(port, x)["id"];
  ASSERT_EQ(wait_final(port, alone), "succeeded");
  const auto ref = fetch_image(port, alone);

  // Joining a txt2img job of the same size that is already running: if they shared no batch,
  // the long one would finish first.
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/events"));
  json long_job = small_job("a different prompt", 150, 11);
  long_job["width"] = 96;
  long_job["height"] = 64;
  const std::string other = submit(port, long_job)["id"];
  ws.send_text(json{{"subscribe", other}}.dump());
  ASSERT_TRUE(ws.next_json(
      [&](const json& ev) { return ev.value("job_id", "") == other && shows_running(ev); }));
  const std::string batched = submit(port, x)["id"];
  ws.send_text(json{{"subscribe", batched}}.dump());
  bool other_ended = false;
  const auto done = ws.next_json([&](const json& j) {
    other_ended |= j.value("job_id", "") == other && is_final_type(j.value("type", ""));
    return j.value("job_id", "") == batched && is_final_type(j.value("type", ""));
  });
  ASSERT_TRUE(done);
  ASSERT_EQ((*done)["type"], "succeeded");
  EXPECT_FALSE(other_ended) << "the two jobs did not share batches";
  EXPECT_EQ(http(port, verb::delete_, "/v1/jobs/" + other).status, 200);

  const auto img = fetch_image(port, batched);
  ASSERT_EQ(img.pixels.size(), ref.pixels.size());
  size_t differing = 0;
  int max_diff = 0;
  for (size_t i = 0; i < img.pixels.size(); ++i) {
    differing += img.pixels[i] != ref.pixels[i];
    max_diff = std::max(max_diff, std::abs(img.pixels[i] - ref.pixels[i]));
  }
  // As scheduling_test.cpp's PixelsDoNotDependOnTheBatch: OpenBLAS picks kernels by shape, so a
  // batched UNet call may move a few 8-bit values by 1; anything else is a real difference.
  EXPECT_LE(max_diff, 1);
  EXPECT_LE(differing, img.pixels.size() / 100) << differing << " bytes differ";
}

}  // namespace
}  // namespace sdserve::itest
