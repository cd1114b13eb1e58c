// Inpainting over the real service: masks on /v1 (diffusers' defaults) and on A1111's img2img
// (A1111's: blur, "only masked", fill, paste back), their checks, and an inpainting model
// (9-channel UNet, built from the tiny one) serving both text to image and inpainting.
#include <gtest/gtest.h>

#include <functional>

#include "harness.h"
#include "pipeline/image.h"

namespace sdserve::itest {
namespace inpaint_itest {

pipeline::RgbImage png_of(const std::string& body) {
  return pipeline::decode_png(std::vector<uint8_t>(body.begin(), body.end()));
}

std::string field_of(const HttpResult& r) {
  return r.body_json()["error"].value("field", "");
}

json inpaint_job(uint64_t seed) {
  json j = small_job("a photo of a cat", 6, seed);
  j.erase("width");
  j.erase("height");  // the picture's: 96x64
  j["init_image"] = base64_of(fixture_bytes("img2img-init-96x64.png"));
  j["mask"] = base64_of(fixture_bytes("inpaint-mask-96x64.png"));
  return j;
}

// The mask fixture's pixels (an "L" PNG: decoded to grey RGB).
std::vector<uint8_t> mask_values() {
  const auto rgb = pipeline::decode_png(fixture_bytes("inpaint-mask-96x64.png"));
  std::vector<uint8_t> out;
  for (size_t i = 0; i < rgb.pixels.size(); i += 3) out.push_back(rgb.pixels[i]);
  return out;
}

// Pixels (of 3 channels) where `pick(mask value)`, and how many of them equal `b`'s.
std::pair<size_t, size_t> equal_where(const pipeline::RgbImage& a, const pipeline::RgbImage& b,
                                      const std::function<bool(uint8_t)>& pick) {
  const auto mask = mask_values();
  size_t picked = 0, equal = 0;
  for (size_t i = 0; i < mask.size(); ++i) {
    if (!pick(mask[i])) continue;
    ++picked;
    equal += std::equal(&a.pixels[i * 3], &a.pixels[i * 3 + 3], &b.pixels[i * 3]);
  }
  return {picked, equal};
}

TEST(InpaintTest, V1RepaintsTheMaskPastesBackOnRequestAndRecordsIt) {
  ServerProcess server;
  const int port = server.port();
  const auto picture = pipeline::decode_png(fixture_bytes("img2img-init-96x64.png"));
  const auto r = post(port, "/v1/generate", inpaint_job(3));
  ASSERT_EQ(r.status, 200) << r.body;
  const auto image = png_of(r.body);
  ASSERT_EQ(image.width, 96);
  ASSERT_EQ(image.height, 64);
  const std::vector<uint8_t> png(r.body.begin(), r.body.end());
  const std::string parameters = pipeline::read_png_text(png, "parameters");
  EXPECT_NE(parameters.find("Denoising strength: 1, Mask blur: 0"), std::string::npos)
      << parameters;
  const json job = get(port, "/v1/jobs/" + r.header("x-job-id")).body_json();
  EXPECT_EQ(job["request"]["mask"], (json{{"width", 96}, {"height", 64}}));
  EXPECT_EQ(job["request"]["strength"], 1.0) << "diffusers' inpainting default";
  EXPECT_EQ(job["request"]["inpainting_fill"], 1);
  EXPECT_EQ(job["steps"], 6);

  // Without paste back (diffusers) the whole picture went through the VAE: next to nothing is
  // byte-equal to the original. With it, everything the mask leaves black is the original's,
  // and the hole is repainted.
  const auto outside = [](uint8_t m) { return m == 0; };
  const auto inside = [](uint8_t m) { return m == 255; };
  const auto [out_n, out_eq] = equal_where(image, picture, outside);
  EXPECT_LT(out_eq, out_n / 2);
  json pasted = inpaint_job(3);
  pasted["inpaint_paste_back"] = true;
  const auto p = post(port, "/v1/generate", pasted);
  ASSERT_EQ(p.status, 200) << p.body;
  const auto back = png_of(p.body);
  const auto [kept_n, kept_eq] = equal_where(back, picture, outside);
  EXPECT_EQ(kept_eq, kept_n) << "outside the mask: the original";
  const auto [hole_n, hole_eq] = equal_where(back, image, inside);
  EXPECT_EQ(hole_eq, hole_n) << "inside: the generated picture";
  const auto [hole2_n, hole2_eq] = equal_where(back, picture, inside);
  EXPECT_LT(hole2_eq, hole2_n / 2) << "inside: repainted";

  // The mask changes the result: the same request as plain img2img at strength 1 differs.
  json plain = inpaint_job(3);
  plain.erase("mask");
  plain["strength"] = 1.0;
  const auto i2i = post(port, "/v1/generate", plain);
  ASSERT_EQ(i2i.status, 200);
  EXPECT_NE(png_of(i2i.body).pixels, image.pixels);
}

TEST(InpaintTest, BadMasksAndInpaintingFieldsAre400NamingTheField) {
  ServerProcess server;
  const int port = server.port();
  const auto refused = [&](json body, const std::string& field, const std::string& says) {
    const auto x = post(port, "/v1/jobs", body);
    EXPECT_EQ(x.status, 400) << x.body;
    EXPECT_EQ(field_of(x), field) << x.body;
    EXPECT_NE(x.body.find(says), std::string::npos) << x.body;
  };
  json j = inpaint_job(1);
  j.erase("init_image");
  refused(j, "mask", "needs an init_image");
  j = inpaint_job(1);
  j["mask"] = base64_of(fixture_bytes("inpaint-mask-64x64.png"));
  refused(j, "mask", "64x64 but init_image is 96x64");
  j["resize_mask"] = true;  // A1111's behaviour, on request
  EXPECT_EQ(post(port, "/v1/jobs", j).status, 202);
  j = inpaint_job(1);
  j["mask"] = "bm90IGFuIGltYWdl";
  refused(j, "mask", "mask");
  j = inpaint_job(1);
  j["inpainting_fill"] = 4;
  refused(j, "inpainting_fill", "3 (latent nothing)");
  j = inpaint_job(1);
  j["mask_blur"] = 65;
  refused(j, "mask_blur", "between 0 and 64");
  j = inpaint_job(1);
  j["inpaint_full_res"] = "yes";
  refused(j, "inpaint_full_res", "true or false");
  j = inpaint_job(1);
  j["inpaint_full_res_padding"] = -1;
  refused(j, "inpaint_full_res_padding", "between 0 and 2048");
  EXPECT_EQ(get(port, "/healthz").status, 200);
}

// A1111's defaults (mask blur 4, only masked, fill, paste back) are /v1's fields set so: the
// same pixels both ways; and what the blurred mask leaves at 0 is the original picture.
TEST(InpaintTest, A1111InpaintingIsV1WithA1111sDefaults) {
  ServerProcess server;
  const int port = server.port();
  const std::string init = base64_of(fixture_bytes("img2img-init-96x64.png"));
  const std::string mask = base64_of(fixture_bytes("inpaint-mask-96x64.png"));
  const json a1111 = {{"prompt", "a photo of a cat"},
                      {"init_images", {init}},
                      {"mask", mask},
                      {"steps", 8},
                      {"seed", 9},
                      {"cfg_scale", 7.5},
                      {"sampler_name", "Euler a"},
                      {"width", 64},
                      {"height", 64}};
  const auto r = post(port, "/sdapi/v1/img2img", a1111);
  ASSERT_EQ(r.status, 200) << r.body;
  const json answer = r.body_json();
  const auto image = pipeline::decode_png(unbase64_of(answer["images"][0]));
  EXPECT_EQ(image.width, 96) << "only masked: pasted back into the whole picture";
  EXPECT_EQ(image.height, 64);
  const json info = json::parse(answer["info"].get<std::string>());
  EXPECT_NE(info["infotexts"][0].get<std::string>().find("Denoising strength: 0.75, Mask blur: 4"),
            std::string::npos)
      << info["infotexts"][0];
  EXPECT_EQ(answer["parameters"]["inpaint_full_res"], true);
  EXPECT_EQ(answer["parameters"]["mask_blur"], 4);

  const json native = {{"prompt", "a photo of a cat"},
                       {"init_image", init},
                       {"mask", mask},
                       {"strength", 0.75},
                       {"steps", 8},
                       {"seed", 9},
                       {"guidance_scale", 7.5},
                       {"sampler", "euler_ancestral"},
                       {"width", 64},
                       {"height", 64},
                       {"mask_blur", 4},
                       {"inpainting_fill", 0},
                       {"inpaint_full_res", true},
                       {"inpaint_full_res_padding", 0},
                       {"inpaint_paste_back", true}};
  const auto v1 = post(port, "/v1/generate", native);
  ASSERT_EQ(v1.status, 200) << v1.body;
  EXPECT_EQ(png_of(v1.body).pixels, image.pixels);
  // Far from the mask (the blur reaches 2.5 sigma = 10 px) the picture is the original's.
  const auto picture = pipeline::decode_png(fixture_bytes("img2img-init-96x64.png"));
  const auto m = mask_values();
  size_t far = 0, kept = 0;
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 96; ++x) {
      bool near = false;
      for (int dy = -11; dy <= 11 && !near; ++dy)
        for (int dx = -11; dx <= 11 && !near; ++dx) {
          const int yy = y + dy, xx = x + dx;
          near = yy >= 0 && yy < 64 && xx >= 0 && xx < 96 && m[yy * 96 + xx] > 0;
        }
      if (near) continue;
      ++far;
      const size_t i = (static_cast<size_t>(y) * 96 + x) * 3;
      kept += std::equal(&image.pixels[i], &image.pixels[i + 3], &picture.pixels[i]);
    }
  ASSERT_GT(far, 100u);
  EXPECT_EQ(kept, far);
  json bad = a1111;
  bad["inpainting_fill"] = 7;
  const auto x = post(port, "/sdapi/v1/img2img", bad);
  EXPECT_EQ(x.status, 400);
  EXPECT_EQ(field_of(x), "inpainting_fill") << x.body;
}

// A1111's resize modes 1 (crop) and 2 (fill) are /v1's resize_mode: the same pixels, and each
// differs from plain stretching.
TEST(InpaintTest, ResizeModesCropAndFillAsOnA1111) {
  ServerProcess server;
  const int port = server.port();
  const std::string init = base64_of(fixture_bytes("img2img-init-96x64.png"));
  std::vector<std::vector<uint8_t>> results;
  for (int mode : {0, 1, 2}) {
    const json a1111 = {{"prompt", "a photo of a cat"},
                        {"init_images", {init}},
                        {"steps", 4},
                        {"seed", 4},
                        {"denoising_strength", 0.5},
                        {"width", 64},
                        {"height", 64},
                        {"resize_mode", mode},
                        {"cfg_scale", 7.5},
                        {"sampler_name", "Euler"}};
    const auto r = post(port, "/sdapi/v1/img2img", a1111);
    ASSERT_EQ(r.status, 200) << r.body;
    const auto image = pipeline::decode_png(unbase64_of(r.body_json()["images"][0]));
    const json native = {{"prompt", "a photo of a cat"},
                         {"init_image", init},
                         {"steps", 4},
                         {"seed", 4},
                         {"strength", 0.5},
                         {"width", 64},
                         {"height", 64},
                         {"resize_mode", mode}};
    const auto v1 = post(port, "/v1/generate", native);
    ASSERT_EQ(v1.status, 200) << v1.body;
    EXPECT_EQ(png_of(v1.body).pixels, image.pixels) << "resize_mode " << mode;
    results.push_back(image.pixels);
  }
  EXPECT_NE(results[1], results[0]);
  EXPECT_NE(results[2], results[0]);
  EXPECT_NE(results[2], results[1]);
}

// A 9-channel inpainting model loads and serves text to image (a full mask, as A1111) and
// inpainting; the masked job's repainted area differs from the picture.
TEST(InpaintTest, AnInpaintingModelServesTxt2ImgAndInpainting) {
  ServerProcess server(
      {"--model", std::string(SDSERVE_BUILT_FIXTURES) + "/tiny-sd15-inpaint.safetensors"});
  const int port = server.port();
  const auto t = post(port, "/v1/generate", small_job("a photo of a cat", 4, 2));
  ASSERT_EQ(t.status, 200) << t.body;
  EXPECT_EQ(png_of(t.body).width, 64);
  json j = inpaint_job(2);
  j["strength"] = 0.75;
  const auto r = post(port, "/v1/generate", j);
  ASSERT_EQ(r.status, 200) << r.body;
  const json models = get(port, "/v1/models").body_json();
  EXPECT_EQ(models["models"][0]["inpainting"], true) << models.dump();
}

}  // namespace inpaint_itest
}  // namespace sdserve::itest
