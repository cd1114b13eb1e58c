// The hires fix's rules, torch-free (also under the sanitizers): A1111's second-pass geometry,
// the second pass's settings and step counts, the checks (each error names its field), and the
// PNG parameters' hires keys.
#include <gtest/gtest.h>

#include <string>

#include "pipeline/errors.h"
#include "pipeline/pipeline.h"
#include "pipeline/validate.h"

namespace sdserve::pipeline {
// Named, not anonymous: the unity build joins test files.
namespace hires_spec {

ImageSpec hires_spec(int width, int height, HiresSpec h = {}) {
  ImageSpec spec;
  spec.width = width;
  spec.height = height;
  spec.steps = 20;
  spec.hires = h;
  return spec;
}

HiresSpec resize(int width, int height) {
  HiresSpec h;
  h.width = width;
  h.height = height;
  return h;
}

std::string field_of(const ImageSpec& spec) {
  try {
    validate(spec);
  } catch (const RequestError& e) {
    EXPECT_FALSE(std::string(e.what()).empty());
    return e.field();
  }
  return "(accepted)";
}

TEST(HiresSize, ScaleFloorsToWholeLatents) {
  auto s = hires_size(hires_spec(512, 512));
  EXPECT_EQ(s.width, 1024);
  EXPECT_EQ(s.height, 1024);
  EXPECT_EQ(s.crop_left + s.crop_top, 0);
  HiresSpec h;
  h.scale = 1.3;  // 665.6 px: int() makes 665, whole latents 83, so 664
  s = hires_size(hires_spec(512, 512, h));
  EXPECT_EQ(s.upscaled_width, 664);
  EXPECT_EQ(s.width, 664);
  EXPECT_EQ(final_size(hires_spec(512, 512, h)), std::make_pair(664, 664));
}

TEST(HiresSize, ResizeAsA1111) {
  // One side set: the other keeps the first pass's aspect ratio (integer division).
  auto s = hires_size(hires_spec(512, 768, resize(1000, 0)));
  EXPECT_EQ(s.width, 1000);
  EXPECT_EQ(s.height, 1496);  // 1500 px, 187 latents
  s = hires_size(hires_spec(512, 768, resize(0, 1024)));
  EXPECT_EQ(s.width, 680);  // 1024 x 512 / 768 = 682 px, 85 latents
  EXPECT_EQ(s.height, 1024);
  // Both set, another aspect ratio: cover, then A1111's centred crop (in whole latents).
  s = hires_size(hires_spec(512, 768, resize(1024, 1024)));
  EXPECT_EQ(s.upscaled_width, 1024);
  EXPECT_EQ(s.upscaled_height, 1536);
  EXPECT_EQ(s.crop_left, 0);
  EXPECT_EQ(s.crop_top, 256);  // 64 latents cut, 32 of them at the top
  EXPECT_EQ(s.width, 1024);
  EXPECT_EQ(s.height, 1024);
  s = hires_size(hires_spec(768, 512, resize(1000, 1000)));
  EXPECT_EQ(s.upscaled_width, 1496);  // 1500 px
  EXPECT_EQ(s.crop_left, 31 * 8);     // (1500 - 1000) // 8 = 62 latents cut, 31 left
  EXPECT_EQ(s.width, 1496 - 62 * 8);
  EXPECT_EQ(s.height, 1000);
  // A smaller second pass (a latent downscale) is A1111's too.
  s = hires_size(hires_spec(128, 96, resize(96, 0)));
  EXPECT_EQ(s.width, 96);
  EXPECT_EQ(s.height, 72);
}

TEST(HiresSpec, SecondPassSettingsAndSteps) {
  ImageSpec spec = hires_spec(512, 512);
  spec.sampler = "euler_ancestral";
  spec.seed = 42;
  spec.hires->strength = 0.7;
  auto second = second_pass_spec(spec);
  EXPECT_EQ(second.width, 1024);
  EXPECT_EQ(second.steps, 20) << "hires.steps 0: the first pass's";
  EXPECT_EQ(second.sampler, "euler_ancestral");
  EXPECT_EQ(second.seed, 42u) << "the image's own seed again";
  EXPECT_FALSE(second.hires.has_value());
  EXPECT_EQ(steps_in_all_passes(spec), 20 + 14);
  spec.hires->steps = 10;
  spec.hires->sampler = "dpmpp_2m";
  spec.hires->scheduler = "karras";
  second = second_pass_spec(spec);
  EXPECT_EQ(second.steps, 10);
  EXPECT_EQ(second.sampler, "dpmpp_2m");
  EXPECT_EQ(second.scheduler, "karras");
  EXPECT_EQ(second_pass_steps_that_run(second), 7);
  EXPECT_EQ(steps_in_all_passes(spec), 27);
  EXPECT_EQ(pass_sizes(spec).size(), 2u);
  spec.hires = resize(512, 512);  // the same size: one size of UNet calls
  EXPECT_EQ(pass_sizes(spec).size(), 1u);
  spec.hires.reset();
  EXPECT_EQ(steps_in_all_passes(spec), 20);
}

TEST(HiresSpec, EachErrorNamesItsField) {
  EXPECT_EQ(field_of(hires_spec(512, 512)), "(accepted)");
  HiresSpec h;
  h.scale = 0.5;
  EXPECT_EQ(field_of(hires_spec(512, 512, h)), "hires.scale");
  h.scale = 4.5;
  EXPECT_EQ(field_of(hires_spec(512, 512, h)), "hires.scale");
  h.scale = 4;  // 4096 px: past the largest side
  EXPECT_EQ(field_of(hires_spec(1024, 512, h)), "hires.scale");
  EXPECT_EQ(field_of(hires_spec(512, 512, resize(32, 0))), "hires.width");
  EXPECT_EQ(field_of(hires_spec(512, 512, resize(0, 4096))), "hires.height");
  EXPECT_EQ(field_of(hires_spec(64, 2048, resize(1024, 0))), "hires.width") << "32768 px tall";
  h = {};
  h.upscaler = "R-ESRGAN 4x+";
  try {
    validate(hires_spec(512, 512, h));
    FAIL() << "a pixel upscaler";
  } catch (const RequestError& e) {
    EXPECT_EQ(e.field(), "hires.upscaler");
    EXPECT_NE(std::string(e.what()).find("R-ESRGAN 4x+"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("Latent (nearest-exact)"), std::string::npos)
        << "lists the allowed values: " << e.what();
  }
  h = {};
  h.steps = 151;
  EXPECT_EQ(field_of(hires_spec(512, 512, h)), "hires.steps");
  h = {};
  h.strength = 0.04;  // int(20 x 0.04) = 0 steps would run
  EXPECT_EQ(field_of(hires_spec(512, 512, h)), "hires.strength");
  h.strength = 1.1;
  EXPECT_EQ(field_of(hires_spec(512, 512, h)), "hires.strength");
  h = {};
  h.sampler = "ddim";
  h.scheduler = "karras";  // DDIM has no sigma schedule
  EXPECT_EQ(field_of(hires_spec(512, 512, h)), "hires.scheduler");
  h = {};
  h.scheduler = "karras";  // without a sampler
  EXPECT_EQ(field_of(hires_spec(512, 512, h)), "hires.scheduler");
  ImageSpec with_init = hires_spec(64, 64);
  RgbImage init;
  init.width = init.height = 64;
  init.pixels.assign(64 * 64 * 3, 0);
  with_init.init_image = std::make_shared<const RgbImage>(init);
  with_init.strength = 0.5;
  EXPECT_EQ(field_of(with_init), "hires");
}

TEST(HiresSpec, RulesNameTheAllowedValues) {
  EXPECT_NE(rule("hires.scale").find("between 1 and 4"), std::string::npos);
  EXPECT_NE(rule("hires.upscaler").find("Latent (bicubic antialiased)"), std::string::npos);
  EXPECT_NE(rule("hires.steps").find("between 0 and 150"), std::string::npos);
  EXPECT_NE(rule("hires").find("object"), std::string::npos);
}

TEST(HiresParameters, A1111Keys) {
  GenerateRequest r;
  r.prompt = "a cat";
  r.image = hires_spec(512, 512);
  r.image.steps = 20;
  r.image.guidance_scale = 7;
  r.image.hires->strength = 0.7;
  r.image.hires->steps = 10;
  ModelInfo model;
  model.name = "tiny";
  EXPECT_EQ(a1111_parameters(r, 5, model),
            "a cat\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 5, "
            "Size: 512x512, Model: tiny, Denoising strength: 0.7, Hires upscale: 2, Hires steps: "
            "10, Hires upscaler: Latent, Version: sdserve");
  // A resize, another sampler and schedule, steps 0 (A1111 leaves "Hires steps" out then).
  r.image.hires = resize(1024, 768);
  r.image.hires->upscaler = "Latent (bicubic antialiased)";
  r.image.hires->sampler = "dpmpp_2m";
  r.image.hires->scheduler = "karras";
  r.image.hires->strength = 0.55;
  EXPECT_EQ(a1111_parameters(r, 5, model),
            "a cat\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 5, "
            "Size: 512x512, Model: tiny, Denoising strength: 0.55, Hires sampler: DPM++ 2M, "
            "Hires resize: 1024x768, Hires upscaler: Latent (bicubic antialiased), Hires schedule "
            "type: Karras, Version: sdserve");
}

}  // namespace hires_spec
}  // namespace sdserve::pipeline
