// Inpainting against diffusers' StableDiffusion[XL]InpaintPipeline: every run in
// tests/fixtures/tiny-*-inpaint-cases.json (made by tests/fixtures/make/make_inpaint_refs.py),
// each step's latents and the final image, through the step-level API the engine uses. A
// 4-channel UNet (SD 1.x, 2.x, XL: the masked latent blend) and the tiny 9-channel inpainting UNet
// the build derives from the SD 1.x fixture (its folder and its single file). Also the pixel
// preparation (mask blur, crop region, paste back) on hand-made cases.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "pipeline/errors.h"
#include "pipeline/inpaint.h"
#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

namespace sdserve::pipeline {
// Named, not anonymous: the unity build joins test files, and these helpers' names are common.
namespace inpaint_parity {

// img2img_parity_test.cpp's bound and reasons: float32 reordering over at most 19 evaluations
// and up to two VAE encodes.
constexpr double kTolerance = 5e-5;

using test::fixture_png;

std::string model_path(const std::string& family, int unet) {
  if (unet == 9) return test::fixture("tiny-" + family + "-inpaint");
  return test::run_model_path(family);
}

const std::shared_ptr<Model>& model(const std::string& family, int unet) {
  return test::cpu_model(model_path(family, unet));
}

using InpaintRun = test::DiffusersRun;

std::vector<InpaintRun> runs() {
  return test::diffusers_runs("inpaint", {"sd15", "sd2", "sdxl"}, "inpaint_image", "_image");
}

// The run's request as the server hands it over: picture and mask at the request's size
// (Lanczos, as diffusers' processors), the mask as Pillow's "L". A "full" mask is no mask: the
// inpainting UNet then repaints everything, and without an init image it is text to image.
ImageSpec spec_of(const nlohmann::json& c) {
  ImageSpec spec = test::run_spec(c);
  spec.strength = c["strength"];
  if (!c["init"].is_null()) {
    auto init = fixture_png(c["init"]);
    if (init.width != spec.width || init.height != spec.height)
      init = resize_lanczos(init, spec.width, spec.height);
    spec.init_image = std::make_shared<const RgbImage>(std::move(init));
  }
  if (c["mask"] != "full") {
    auto mask = to_gray(fixture_png(c["mask"]));
    if (mask.width != spec.width || mask.height != spec.height)
      mask = resize_lanczos(mask, spec.width, spec.height);
    spec.mask = std::make_shared<const GrayImage>(std::move(mask));
  }
  return spec;
}

void check_run(const Model& m, const InpaintRun& run, double tolerance, const std::string& label) {
  const auto& c = run.info;
  ImageSpec spec = spec_of(c);
  auto cond = m.encode_text(c["prompt"], 1, TextRole::kPrompt, PromptSyntax::kNone);
  EmbeddingPtr uncond;
  if (spec.guidance_scale > 1)
    uncond = m.encode_text(c["negative"], 1, TextRole::kNegative, PromptSyntax::kNone);
  std::vector<std::unique_ptr<Trajectory>> owned;
  std::vector<Trajectory*> batch;
  for (uint64_t seed : c["per_image_seeds"]) {
    spec.seed = seed;
    owned.push_back(m.begin(spec, cond, uncond));
    batch.push_back(owned.back().get());
  }
  const torch::Tensor want =
      test::family_ref("tiny-" + run.family + "-inpaint", run.name + "_latents");
  ASSERT_EQ(batch[0]->evals_total(), m.evals_total(spec));
  ASSERT_EQ(batch[0]->evals_total(), want.size(0)) << "evaluations that run";
  double worst = 0;
  for (int i = 0; i < batch[0]->evals_total(); ++i) {
    m.step(batch);
    std::vector<torch::Tensor> got;
    for (auto* t : batch) got.push_back(t->state().latent.cpu());
    const double err = test::rel_diff(torch::cat(got), want[i]);
    worst = std::max(worst, err);
    ASSERT_LE(err, tolerance) << run.name << " evaluation " << i;
  }
  EXPECT_TRUE(batch[0]->done());
  const double image_err =
      test::rel_diff(m.impl().decode_float(batch),
                     test::family_ref("tiny-" + run.family + "-inpaint", run.name + "_image"));
  EXPECT_LE(image_err, tolerance) << run.name;
  std::cout << "[ " << label << " ] " << run.family << " " << run.name << ": latents " << worst
            << ", image " << image_err << "\n";
}

class InpaintParity : public ::testing::TestWithParam<InpaintRun> {};

TEST_P(InpaintParity, StepLatentsAndImageMatchDiffusers) {
  const auto& run = GetParam();
  check_run(*model(run.family, run.info["unet"]), run, kTolerance, "parity");
}

// The same runs on a GPU in float32 (the CPU generator's draws moved to the device, as the
// service does); img2img_parity_test.cpp's CUDA bound.
TEST(InpaintCuda, RunsMatchInFloat32) {
  SKIP_WITHOUT_CUDA();
  std::map<std::string, std::shared_ptr<Model>> cuda;
  for (const auto& run : runs()) {
    const int unet = run.info["unet"];
    auto& m = cuda[run.family + std::to_string(unet)];
    if (!m) {
      LoadOptions o;
      o.device = "cuda";
      o.precision = "fp32";
      m = Model::load(model_path(run.family, unet), o);
    }
    check_run(*m, run, 1e-3, "parity cuda fp32");
  }
}

INSTANTIATE_TEST_SUITE_P(AllRuns, InpaintParity, ::testing::ValuesIn(runs()), [](const auto& info) {
  return info.param.family + "_" + info.param.name;
});

TEST(InpaintParityRuns, EveryCaseIsInstantiated) {
  // SD 1.x: 12 runs on the 4-channel UNet, 7 on the inpainting one; SD 2.x 2; SDXL 3 and 2.
  EXPECT_EQ(runs().size(), 26u);
}

// The inpainting model as a single file (its folder converted by the SD 1.x layout) is read as
// the same model: a 9-channel conv_in marks it.
TEST(InpaintModel, SingleFileIsTheFolder) {
  const auto file = test::load_cpu(test::fixture("tiny-sd15-inpaint.safetensors"));
  EXPECT_TRUE(file->info().inpainting);
  EXPECT_EQ(file->info().latent_channels, 4);
  EXPECT_FALSE(model("sd15", 4)->info().inpainting);
  for (const auto& run : runs())
    if (run.info["unet"] == 9 && run.info["n"] == 1) {
      check_run(*file, run, kTolerance, "single file");
      break;
    }
}

TEST(InpaintRequests, MaskNeedsAnInitImageOfItsSize) {
  const auto& m = model("sd15", 4);
  auto cond = m->encode_text("x");
  ImageSpec spec;
  spec.width = spec.height = 64;
  spec.steps = 4;
  spec.mask = std::make_shared<const GrayImage>(GrayImage{64, 64, std::vector<uint8_t>(64 * 64)});
  try {
    m->begin(spec, cond, cond);
    FAIL() << "a mask without a picture";
  } catch (const RequestError& e) {
    EXPECT_EQ(e.field(), "mask");
  }
  spec.init_image = std::make_shared<const RgbImage>(fixture_png("img2img-init-64x64.png"));
  spec.mask = std::make_shared<const GrayImage>(GrayImage{32, 64, std::vector<uint8_t>(32 * 64)});
  try {
    m->begin(spec, cond, cond);
    FAIL() << "a mask of another size";
  } catch (const RequestError& e) {
    EXPECT_EQ(e.field(), "mask");
    EXPECT_NE(std::string(e.what()).find("32x64"), std::string::npos) << e.what();
  }
}

// An all-black mask repaints nothing: after the last step the blend leaves the init image's
// latents, so the picture comes back as its VAE round trip, whatever the prompt.
TEST(InpaintRequests, AnEmptyMaskKeepsThePicture) {
  const auto& m = model("sd15", 4);
  ImageSpec spec;
  spec.width = spec.height = 64;
  spec.steps = 6;
  spec.strength = 1.0;
  spec.init_image = std::make_shared<const RgbImage>(fixture_png("img2img-init-64x64.png"));
  spec.mask =
      std::make_shared<const GrayImage>(GrayImage{64, 64, std::vector<uint8_t>(64 * 64, 0)});
  std::vector<torch::Tensor> finals;
  for (const char* prompt : {"a photo of a cat", "two  dogs\tplaying"}) {
    auto t = m->begin(spec, m->encode_text(prompt), m->encode_text(""));
    while (!t->done()) m->step({t.get()});
    finals.push_back(t->state().latent.clone());
    EXPECT_TRUE(torch::equal(t->state().latent, t->state().blend_latents));
  }
  EXPECT_TRUE(torch::equal(finals[0], finals[1]));
}

TEST(InpaintPixels, CropRegionGrowsToTheRequestsAspectWithinThePicture) {
  GrayImage mask{100, 80, std::vector<uint8_t>(100 * 80, 0)};
  for (int y = 30; y < 40; ++y)
    for (int x = 40; x < 60; ++x) mask.pixels[y * 100 + x] = 255;
  CropRegion r;
  ASSERT_TRUE(masked_crop_region(mask, 4, 64, 64, &r));
  // Box [40, 60) x [30, 40), padded by 4: [36, 64) x [26, 44), 28 x 18; grown to square: 28 x 28.
  EXPECT_EQ(r.x1, 36);
  EXPECT_EQ(r.x2, 64);
  EXPECT_EQ(r.y2 - r.y1, 28);
  EXPECT_EQ(r.y1, 21);
  // Against an edge: the region slides inside the picture.
  std::fill(mask.pixels.begin(), mask.pixels.end(), 0);
  mask.pixels[0] = 255;
  ASSERT_TRUE(masked_crop_region(mask, 0, 64, 32, &r));
  EXPECT_EQ(r.x1, 0);
  EXPECT_EQ(r.y1, 0);
  EXPECT_EQ(r.x2, 2);
  EXPECT_EQ(r.y2, 1);
  std::fill(mask.pixels.begin(), mask.pixels.end(), 0);
  EXPECT_FALSE(masked_crop_region(mask, 32, 64, 64, &r)) << "an empty mask has no region";
}

TEST(InpaintPixels, BlurIsGaussianAndSymmetric) {
  GrayImage line{21, 1, std::vector<uint8_t>(21, 0)};
  line.pixels[10] = 255;
  const auto blurred = gaussian_blur(line, 2, 0);
  // OpenCV's kernel for sigma 2 is 2*int(5.5)+1 = 11 taps: weights exp(-k^2/8) normalised.
  double sum = 0;
  for (int k = -5; k <= 5; ++k) sum += std::exp(-k * k / 8.0);
  EXPECT_EQ(blurred.pixels[10], static_cast<int>(std::floor(255 / sum + 0.5)));
  for (int k = 1; k <= 10; ++k) EXPECT_EQ(blurred.pixels[10 - k], blurred.pixels[10 + k]) << k;
  EXPECT_EQ(blurred.pixels[4], 0) << "past the kernel";
  EXPECT_GT(blurred.pixels[5], 0);
}

TEST(InpaintPixels, OnlyMaskedCropsResizesAndPastesBack) {
  RgbImage picture{96, 64, std::vector<uint8_t>(96 * 64 * 3)};
  for (size_t i = 0; i < picture.pixels.size(); ++i)
    picture.pixels[i] = static_cast<uint8_t>(i % 251);
  GrayImage mask{96, 64, std::vector<uint8_t>(96 * 64, 0)};
  for (int y = 20; y < 30; ++y)
    for (int x = 50; x < 70; ++x) mask.pixels[y * 96 + x] = 255;
  InpaintOptions o;
  o.only_masked = true;
  o.padding = 6;
  const auto prepared = prepare_inpaint(picture, mask, 64, 64, o);
  ASSERT_TRUE(prepared.overlay);
  EXPECT_EQ(prepared.image->width, 64);
  EXPECT_EQ(prepared.mask->height, 64);
  const auto& ov = *prepared.overlay;
  EXPECT_EQ(ov.w, ov.h) << "grown to the request's square";
  // A generated picture of one colour comes back inside the mask only.
  RgbImage generated{64, 64, std::vector<uint8_t>(64 * 64 * 3, 7)};
  const auto out = apply_overlay(generated, ov);
  ASSERT_EQ(out.width, 96);
  ASSERT_EQ(out.height, 64);
  EXPECT_EQ(out.pixels[(25 * 96 + 60) * 3], 7) << "inside the mask";
  EXPECT_EQ(out.pixels[(5 * 96 + 5) * 3], picture.pixels[(5 * 96 + 5) * 3]) << "outside";
  EXPECT_EQ(out.pixels[(21 * 96 + 45) * 3], picture.pixels[(21 * 96 + 45) * 3])
      << "in the crop's padding but outside the mask";
  // Inverted, the hole is everything else: the crop is the whole picture.
  o.invert = true;
  const auto inverted = prepare_inpaint(picture, mask, 64, 64, o);
  EXPECT_EQ(inverted.overlay->w, 96);
  EXPECT_EQ(inverted.mask->pixels[0], 255);
}

// A1111's resize modes on a 40x20 picture into 32x32: crop keeps the middle at full height,
// fill keeps all of it at full width between bars copied from its edge rows.
TEST(InpaintPixels, ResizeModesCropOrFillAsA1111) {
  RgbImage picture{40, 20, std::vector<uint8_t>(40 * 20 * 3)};
  for (int y = 0; y < 20; ++y)
    for (int x = 0; x < 40; ++x) {
      uint8_t* p = &picture.pixels[(y * 40 + x) * 3];
      p[0] = static_cast<uint8_t>(x * 6), p[1] = static_cast<uint8_t>(y * 12), p[2] = 100;
    }
  const auto stretched = resize_picture(picture, 32, 32, ResizeMode::kJustResize);
  EXPECT_EQ(stretched.pixels, resize_lanczos(picture, 32, 32).pixels);
  // Crop: scaled to 64x32 (covering), centred at x = -16: column 16 of the scaled picture first.
  const auto cropped = resize_picture(picture, 32, 32, ResizeMode::kCropAndResize);
  const auto scaled = resize_lanczos(picture, 64, 32);
  for (int y : {0, 13, 31})
    for (int x : {0, 17, 31})
      for (int c = 0; c < 3; ++c)
        EXPECT_EQ(cropped.pixels[(y * 32 + x) * 3 + c], scaled.pixels[(y * 64 + x + 16) * 3 + c]);
  // Fill: scaled to 32x16 (fitting), rows 8..23; rows 0..7 repeat its first row, 24..31 its last.
  const auto filled = resize_picture(picture, 32, 32, ResizeMode::kResizeAndFill);
  const auto fitted = resize_lanczos(picture, 32, 16);
  const auto row = [](const RgbImage& im, int y) {
    return std::vector<uint8_t>(&im.pixels[y * im.width * 3], &im.pixels[(y + 1) * im.width * 3]);
  };
  for (int y = 0; y < 8; ++y) EXPECT_EQ(row(filled, y), row(fitted, 0)) << y;
  for (int y = 8; y < 24; ++y) EXPECT_EQ(row(filled, y), row(fitted, y - 8)) << y;
  for (int y = 24; y < 32; ++y) EXPECT_EQ(row(filled, y), row(fitted, 15)) << y;
}

TEST(InpaintPixels, FillTakesTheColoursAroundTheHole) {
  RgbImage picture{64, 64, std::vector<uint8_t>(64 * 64 * 3)};
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 64; ++x) {
      uint8_t* p = &picture.pixels[(y * 64 + x) * 3];
      p[0] = 200, p[1] = 40, p[2] = 90;                                    // one colour...
      if (x >= 16 && x < 48 && y >= 16 && y < 48) p[0] = p[1] = p[2] = 0;  // ...and a black hole
    }
  GrayImage mask{64, 64, std::vector<uint8_t>(64 * 64, 0)};
  for (int y = 16; y < 48; ++y)
    for (int x = 16; x < 48; ++x) mask.pixels[y * 64 + x] = 255;
  InpaintOptions o;
  o.fill = MaskedContent::kFill;
  const auto prepared = prepare_inpaint(picture, mask, 64, 64, o);
  const uint8_t* centre = &prepared.image->pixels[(32 * 64 + 32) * 3];
  EXPECT_NEAR(centre[0], 200, 2);
  EXPECT_NEAR(centre[1], 40, 2);
  EXPECT_NEAR(centre[2], 90, 2);
  EXPECT_EQ(prepared.image->pixels[0], 200) << "outside the hole: unchanged";
  EXPECT_FALSE(prepared.overlay) << "no paste back unless asked";
}

}  // namespace inpaint_parity
}  // namespace sdserve::pipeline
