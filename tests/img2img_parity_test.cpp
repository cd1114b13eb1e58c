// Image to image against diffusers' StableDiffusionImg2ImgPipeline on the tiny SD 1.x model:
// every run in tests/fixtures/tiny-sd15-img2img-cases.json (made by
// tests/fixtures/make/make_img2img_refs.py), each step's latents and the final image, through the
// step-level API the engine uses. Also Pillow's Lanczos resize, which diffusers applies to an
// init image of another size.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "pipeline/errors.h"
#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"
#include "test_util.h"

namespace sdserve::pipeline {
// Named, not anonymous: the unity build joins test files, and these helpers' names are common.
namespace img2img_parity {

// As the text-to-image parity (pipeline_parity_test.cpp): max abs difference over max abs of the
// reference, float32 reordering over at most 12 evaluations and one VAE encode. The prompts'
// embeddings come from our text encoder here and from diffusers' there (equal within 1e-6).
constexpr double kTolerance = 5e-5;

// "sd15" (the bundled model), "sd2", "sdxl" (tests/fixtures/tiny-*), loaded once each.
const std::shared_ptr<Model>& model(const std::string& family = "sd15") {
  return test::run_model(family);
}

using Img2ImgRun = test::DiffusersRun;
using test::fixture_png;

std::vector<Img2ImgRun> runs() {
  return test::diffusers_runs("img2img", {"sd15", "sd2", "sdxl"}, "img2img_image", "_image");
}

const torch::Tensor& i2i_ref(const Img2ImgRun& run, const std::string& what) {
  return test::family_ref("tiny-" + run.family + "-img2img", run.name + what);
}

// One run through the step-level API, each step's latents and the image against diffusers'.
void check_run(const Model& m, const Img2ImgRun& run, double tolerance, const std::string& label) {
  const auto& c = run.info;
  ImageSpec spec = test::run_spec(c);
  spec.strength = c["strength"];
  auto init = fixture_png(c["init"]);
  if (init.width != spec.width || init.height != spec.height)
    init = resize_lanczos(init, spec.width, spec.height);  // as diffusers' image processor
  spec.init_image = std::make_shared<const RgbImage>(std::move(init));
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
  const torch::Tensor want = i2i_ref(run, "_latents");
  // Only the evaluations that run (of int(steps x strength) steps), one latent each in diffusers'
  // callback.
  ASSERT_EQ(batch[0]->evals_total(), m.evals_total(spec));
  ASSERT_EQ(batch[0]->evals_total(), want.size(0));
  ASSERT_EQ(batch[0]->evals_done(), 0);
  const torch::Tensor timesteps = i2i_ref(run, "_timesteps");
  ASSERT_EQ(batch[0]->evals_total(), timesteps.size(0)) << "evaluations that run";
  const auto& state = batch[0]->state();
  const auto& all = state.sampler->timesteps();
  for (int i = 0; i < batch[0]->evals_total(); ++i)
    EXPECT_NEAR(all[state.first_eval + i], timesteps[i].item<double>(), 1e-3) << "timestep " << i;
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
  const double image_err = test::rel_diff(m.impl().decode_float(batch), i2i_ref(run, "_image"));
  EXPECT_LE(image_err, tolerance) << run.name;
  std::cout << "[ " << label << " ] " << run.family << " " << run.name << ": latents " << worst
            << ", image " << image_err << "\n";
}

class Img2ImgParity : public ::testing::TestWithParam<Img2ImgRun> {};

TEST_P(Img2ImgParity, StepLatentsAndImageMatchDiffusers) {
  check_run(*model(GetParam().family), GetParam(), kTolerance, "parity");
}

// The same runs on a GPU in float32 (the CPU generator's draws moved to the device, as the
// service does). The bound is family_cuda_test.cpp's for fp32 runs.
TEST(Img2ImgCuda, RunsMatchInFloat32) {
  SKIP_WITHOUT_CUDA();
  std::map<std::string, std::shared_ptr<Model>> cuda;
  for (const auto& run : runs()) {
    auto& m = cuda[run.family];
    if (!m) m = test::load_run_model(run.family, "cuda", "fp32");
    check_run(*m, run, 1e-3, "parity cuda fp32");
  }
}

INSTANTIATE_TEST_SUITE_P(AllRuns, Img2ImgParity, ::testing::ValuesIn(runs()), [](const auto& info) {
  return info.param.family + "_" + info.param.name;
});

TEST(Img2ImgParityRuns, EveryCaseIsInstantiated) {
  // SD 1.x: 4 samplers x 3 strengths, 5 more samplers, two images, no guidance, non-square,
  // resized; SD 2.x (v-prediction) and SDXL (size conditioning): 3 each.
  EXPECT_EQ(runs().size(), 27u);
}

TEST(Img2ImgRequests, StrengthAndInitImageAreChecked) {
  ImageSpec spec;
  spec.width = spec.height = 64;
  spec.steps = 10;
  spec.init_image = std::make_shared<const RgbImage>(fixture_png("img2img-init-64x64.png"));
  spec.strength = 0.05;  // int(10 x 0.05) = 0 steps
  const auto& m = model();
  auto cond = m->encode_text("x");
  try {
    m->begin(spec, cond, cond);
    FAIL() << "no step would run";
  } catch (const RequestError& e) {
    EXPECT_EQ(e.field(), "strength");
  }
  spec.strength = 1.5;
  EXPECT_THROW(m->begin(spec, cond, cond), RequestError);
  spec.strength = 0.5;
  spec.width = 128;
  try {
    m->begin(spec, cond, cond);
    FAIL() << "init image of another size";
  } catch (const RequestError& e) {
    EXPECT_EQ(e.field(), "init_image");
  }
}

TEST(ResizeLanczos, MatchesPillowValueForValue) {
  const auto src = fixture_png("img2img-init-80x72.png");
  for (const auto& [w, h] : {std::pair{64, 64}, {131, 47}, {160, 150}}) {
    const auto want =
        fixture_png("resize-80x72-to-" + std::to_string(w) + "x" + std::to_string(h) + ".png");
    const auto got = resize_lanczos(src, w, h);
    ASSERT_EQ(got.width, w);
    ASSERT_EQ(got.height, h);
    size_t differing = 0;
    for (size_t i = 0; i < got.pixels.size(); ++i) differing += got.pixels[i] != want.pixels[i];
    EXPECT_EQ(differing, 0u) << w << "x" << h;
  }
}

}  // namespace img2img_parity
}  // namespace sdserve::pipeline
