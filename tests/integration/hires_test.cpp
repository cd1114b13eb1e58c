// The hires fix over the real service: A1111's enable_hr and /v1's "hires" give the same pixels
// at the second pass's size, progress counts both passes' evaluations from the start, previews
// and cancel work in either pass, and bad hires fields are 400s naming the field.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <set>

#include "harness.h"
#include "pipeline/image.h"

namespace sdserve::itest {
namespace {

std::vector<uint8_t> unbase64(const std::string& in) {
  static const char* kDigits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::vector<uint8_t> out;
  uint32_t acc = 0;
  int bits = 0;
  for (const char c : in) {
    const char* at = std::strchr(kDigits, c);
    if (c == '=' || at == nullptr) continue;
    acc = (acc << 6) | static_cast<uint32_t>(at - kDigits);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<uint8_t>((acc >> bits) & 0xFF));
    }
  }
  return out;
}

std::vector<uint8_t> bytes_of(const HttpResult& r) {
  return {r.body.begin(), r.body.end()};
}

std::string field_of(const HttpResult& r) {
  return r.body_json()["error"].value("field", "");
}

// 6 first-pass steps at 64x64, then 1.5x: 96x96, int(4 x 0.5) = 2 second-pass steps.
const json kA1111 = {{"prompt", "a photo of a cat"},
                     {"negative_prompt", "blurry"},
                     {"steps", 6},
                     {"seed", 5},
                     {"cfg_scale", 7.5},
                     {"sampler_name", "Euler a"},
                     {"width", 64},
                     {"height", 64},
                     {"enable_hr", true},
                     {"hr_scale", 1.5},
                     {"hr_upscaler", "Latent (bicubic)"},
                     {"hr_second_pass_steps", 4},
                     {"denoising_strength", 0.5},
                     {"hr_sampler_name", "Use same sampler"},
                     {"hr_prompt", ""},
                     {"hr_negative_prompt", "blurry"}};
const json kNative = {
    {"prompt", "a photo of a cat"},
    {"negative_prompt", "blurry"},
    {"steps", 6},
    {"seed", 5},
    {"guidance_scale", 7.5},
    {"sampler", "euler_ancestral"},
    {"width", 64},
    {"height", 64},
    {"hires", {{"scale", 1.5}, {"upscaler", "Latent (bicubic)"}, {"steps", 4}, {"strength", 0.5}}}};
constexpr int kEvals = 6 + 2;  // both passes; one evaluation per step with Euler a

TEST(HiresTest, A1111EnableHrGivesTheV1ImageAtTheSecondPassSize) {
  ServerProcess server;
  const int port = server.port();
  const auto a = post(port, "/sdapi/v1/txt2img", kA1111);
  ASSERT_EQ(a.status, 200) << a.body;
  const json answer = a.body_json();
  ASSERT_EQ(answer["images"].size(), 1u);
  const auto png = unbase64(answer["images"][0]);
  const auto image = pipeline::decode_png(png);
  EXPECT_EQ(image.width, 96);
  EXPECT_EQ(image.height, 96);
  const std::string text = pipeline::read_png_text(png, "parameters");
  EXPECT_NE(text.find("Size: 64x64"), std::string::npos) << "A1111's Size is the first pass's";
  EXPECT_NE(text.find("Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 4, Hires "
                      "upscaler: Latent (bicubic)"),
            std::string::npos)
      << text;
  const json info = json::parse(answer["info"].get<std::string>());
  EXPECT_EQ(info["denoising_strength"], 0.5);
  EXPECT_EQ(answer["parameters"]["enable_hr"], true);

  const auto v1 = post(port, "/v1/generate", kNative);
  ASSERT_EQ(v1.status, 200) << v1.body;
  const auto v1_png = bytes_of(v1);
  EXPECT_EQ(pipeline::decode_png(v1_png).pixels, image.pixels);
  EXPECT_EQ(pipeline::read_png_text(v1_png, "parameters"), text);
  const json job = get(port, "/v1/jobs/" + v1.header("x-job-id")).body_json();
  EXPECT_EQ(job["request"]["hires"]["final_size"], (json{{"width", 96}, {"height", 96}}));
  EXPECT_EQ(job["request"]["hires"]["sampler"], "euler_ancestral");

  // png-info reads A1111's hires keys back.
  const json back = post(port, "/sdapi/v1/png-info", {{"image", answer["images"][0]}}).body_json();
  EXPECT_EQ(back["parameters"]["Hires upscale"], "1.5");
  EXPECT_EQ(back["parameters"]["Hires upscaler"], "Latent (bicubic)");

  // The second pass changes the picture: the same first pass alone is another image (smaller).
  json one_pass = kA1111;
  one_pass["enable_hr"] = false;
  const auto plain = post(port, "/sdapi/v1/txt2img", one_pass);
  ASSERT_EQ(plain.status, 200) << plain.body;
  EXPECT_EQ(pipeline::decode_png(unbase64(plain.body_json()["images"][0])).width, 64);
}

TEST(HiresTest, ProgressCountsBothPassesAndPreviewsComeFromBoth) {
  ServerProcess server;
  const int port = server.port();
  json job = kNative;
  job["preview"] = {{"every", 1}, {"format", "png"}};
  const json submitted = submit(port, job);
  const std::string id = submitted["id"];
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/jobs/" + id + "/events"));
  std::vector<json> progress;
  std::set<int> preview_widths;
  const auto done = ws.next_json([&](const json& e) {
    if (e.value("type", "") == "progress") progress.push_back(e);
    if (e.value("type", "") == "preview") preview_widths.insert(e["width"].get<int>());
    return is_final_type(e.value("type", ""));
  });
  ASSERT_TRUE(done);
  ASSERT_EQ((*done)["type"], "succeeded");
  ASSERT_FALSE(progress.empty());
  for (const auto& p : progress) {
    EXPECT_EQ(p["evaluations_total"], kEvals) << "known from the first event: " << p;
    EXPECT_EQ(p["steps"], kEvals) << p;
  }
  EXPECT_EQ(progress.back()["evaluations"], kEvals);
  EXPECT_EQ(progress.back()["step"], kEvals);
  // latent2rgb previews are latent-sized: 8 px in the first pass, 12 in the second.
  EXPECT_TRUE(preview_widths.count(8)) << "no first-pass preview";
  EXPECT_TRUE(preview_widths.count(12)) << "no second-pass preview";
  const json view = get(port, "/v1/jobs/" + id).body_json();
  EXPECT_EQ(view["evaluations_total"], kEvals);
  EXPECT_EQ(view["steps"], kEvals);
}

// The second pass steps in the UNet calls of its size beside other jobs' rows (the first pass,
// at 64x64, has none beside it here), and its pixels stay those it has alone.
TEST(HiresTest, SecondPassSharesUnetCallsOfItsSize) {
  ServerProcess server;
  const int port = server.port();
  const auto alone = post(port, "/v1/generate", kNative);
  ASSERT_EQ(alone.status, 200) << alone.body;
  const auto ref = pipeline::decode_png(bytes_of(alone));
  EXPECT_EQ(metric(port, "sdserve_unet_batch_images_sum"),
            metric(port, "sdserve_unet_batch_images_count"))
      << "alone, every call held one image";

  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/events"));
  json long_job = small_job("a different prompt", 150, 11);
  long_job["width"] = long_job["height"] = 96;
  const std::string other = submit(port, long_job)["id"];
  ws.send_text(json{{"subscribe", other}}.dump());
  ASSERT_TRUE(ws.next_json(
      [&](const json& ev) { return ev.value("job_id", "") == other && shows_running(ev); }));
  const auto batched = post(port, "/v1/generate", kNative);
  ASSERT_EQ(batched.status, 200) << batched.body;
  EXPECT_GT(metric(port, "sdserve_unet_batch_images_sum"),
            metric(port, "sdserve_unet_batch_images_count"))
      << "no UNet call held the second pass beside the 96x96 job";
  EXPECT_EQ(http(port, verb::delete_, "/v1/jobs/" + other).status, 200);

  const auto img = pipeline::decode_png(bytes_of(batched));
  ASSERT_EQ(img.pixels.size(), ref.pixels.size());
  int max_diff = 0;
  size_t differing = 0;
  for (size_t i = 0; i < img.pixels.size(); ++i) {
    differing += img.pixels[i] != ref.pixels[i];
    max_diff = std::max(max_diff, std::abs(img.pixels[i] - ref.pixels[i]));
  }
  // As img2img_test.cpp's: OpenBLAS picks kernels by shape, so a batched call may move a few
  // 8-bit values by 1; anything more is a real difference.
  EXPECT_LE(max_diff, 1);
  EXPECT_LE(differing, img.pixels.size() / 100) << differing << " bytes differ";
}

// Cancelled in the second pass: the job ends cancelled there, without an image.
TEST(HiresTest, CancelStopsTheSecondPass) {
  ServerProcess server;
  const int port = server.port();
  json job = kNative;
  job["hires"]["steps"] = 150;
  job["hires"]["strength"] = 1.0;  // 150 second-pass steps at 96x96
  const std::string id = submit(port, job)["id"];
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/jobs/" + id + "/events"));
  ASSERT_TRUE(ws.next_json([&](const json& e) {
    return e.value("type", "") == "progress" && e["evaluations"].get<int>() > 6 + 1;
  })) << "never reached the second pass";
  EXPECT_EQ(http(port, verb::delete_, "/v1/jobs/" + id).status, 200);
  const auto end = ws.next_json([](const json& e) { return is_final_type(e.value("type", "")); });
  ASSERT_TRUE(end);
  EXPECT_EQ((*end)["type"], "cancelled");
  const json view = get(port, "/v1/jobs/" + id).body_json();
  EXPECT_LT(view["evaluations"].get<int>(), 6 + 150);
  EXPECT_EQ(get(port, "/v1/jobs/" + id + "/images/0").status, 409);
}

TEST(HiresTest, BadHiresFieldsAre400NamingTheField) {
  ServerProcess server({"--max-memory-mb", "100"});
  const int port = server.port();
  const auto refused = [&](const std::string& route, const json& body, const std::string& field) {
    const auto r = post(port, route, body);
    EXPECT_EQ(r.status, 400) << body.dump() << " -> " << r.body;
    EXPECT_EQ(field_of(r), field) << body.dump() << " -> " << r.body;
    // The message names the field the caller sent, and what it may be.
    EXPECT_NE(r.body_json()["error"].value("message", "").find(field), std::string::npos) << r.body;
  };
  const std::vector<std::pair<json, std::string>> a1111 = {
      {{{"hr_upscaler", "R-ESRGAN 4x+"}}, "hr_upscaler"},
      {{{"hr_upscaler", "Lanczos"}}, "hr_upscaler"},
      {{{"hr_scale", 8}}, "hr_scale"},
      {{{"hr_scale", "2"}}, "hr_scale"},
      {{{"hr_resize_x", 4000}}, "hr_resize_x"},
      {{{"hr_second_pass_steps", 200}}, "hr_second_pass_steps"},
      {{{"denoising_strength", 0.01}}, "denoising_strength"},
      {{{"hr_sampler_name", "Eulr"}}, "hr_sampler_name"},
      {{{"hr_scheduler", "Exponential"}}, "hr_scheduler"},
      {{{"hr_prompt", "a dog"}}, "hr_prompt"},
      {{{"hr_negative_prompt", "sharp"}}, "hr_negative_prompt"},
      {{{"hr_checkpoint_name", "other.safetensors"}}, "hr_checkpoint_name"},
      {{{"hr_cfg", 3}}, "hr_cfg"},
      {{{"enable_hr", "yes"}}, "enable_hr"},
      // Past max_memory_mb at the second pass's size only (128x128 fits, 512x512 does not).
      {{{"width", 128}, {"height", 128}, {"hr_scale", 4}}, "hr_scale"}};
  for (const auto& [change, field] : a1111) {
    json body = kA1111;
    body.update(change);
    refused("/sdapi/v1/txt2img", body, field);
  }
  const std::vector<std::pair<json, std::string>> native = {
      {{{"upscaler", "ESRGAN_4x"}}, "hires.upscaler"},
      {{{"scale", 0.5}}, "hires.scale"},
      {{{"strength", 0.01}}, "hires.strength"},
      {{{"sampler", "ddim"}, {"scheduler", "karras"}}, "hires.scheduler"},
      {{{"sharpness", 1}}, "hires.sharpness"}};
  for (const auto& [change, field] : native) {
    json body = kNative;
    body["hires"].update(change);
    refused("/v1/jobs", body, field);
  }
  json big = kNative;
  big["width"] = big["height"] = 96;
  big["hires"]["scale"] = 4;
  refused("/v1/jobs", big, "hires.scale");
  big["hires"]["scale"] = 1.5;  // 144x144 fits (up to 160x160, the log says)
  EXPECT_EQ(post(port, "/v1/jobs", big).status, 202);
  // Hires fields without enable_hr are ignored, as A1111 does.
  json off = kA1111;
  off["enable_hr"] = false;
  off["hr_upscaler"] = "R-ESRGAN 4x+";
  EXPECT_EQ(post(port, "/sdapi/v1/txt2img", off).status, 200);
}

}  // namespace
}  // namespace sdserve::itest
