// The hires fix against diffusers on the tiny models: every run in
// tests/fixtures/tiny-{sd15,sdxl}-hires-cases.json (made by tests/fixtures/make/make_hires_refs.py:
// StableDiffusion[XL]Pipeline's latents, interpolate in the upscaler's mode, then the img2img
// pipeline given those latents with a fresh generator of the same seed). One trajectory runs both
// passes through the step-level API the engine uses; its first pass, the upscale and each
// second-pass step's latents are checked, and the image where the reference has one.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "pipeline/errors.h"
#include "pipeline/hires.h"
#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"
#include "pipeline/validate.h"
#include "test_util.h"

namespace sdserve::pipeline {
// Named, not anonymous: the unity build joins test files, and these helpers' names are common.
namespace hires_parity {

// As image to image's (img2img_parity_test.cpp) and text to image's (pipeline_parity_test.cpp):
// max abs difference over max abs of the reference, from float32 reordering. A run here chains
// at most 18 evaluations (10 + 8) and an interpolation; the measured worst on the CPU is 3e-6
// (each run prints its own, "[ parity ] ..."), so the text-to-image bound holds unchanged.
constexpr double kTolerance = 5e-5;
// interpolate() alone, same inputs, same kernels: only the summation order of a libtorch build
// may differ.
constexpr double kUpscaleTolerance = 1e-6;

const std::shared_ptr<Model>& model(const std::string& family) {
  return test::run_model(family);
}

struct HiresRun {
  std::string family;  // sd15, sdxl
  std::string name;    // hr_<k>
  nlohmann::json info;
};

void PrintTo(const HiresRun& run, std::ostream* os) {
  *os << run.family << " " << run.name << " " << run.info.value("upscaler", "");
}

std::vector<HiresRun> runs() {
  std::vector<HiresRun> out;
  for (auto& r : test::diffusers_runs("hires", {"sd15", "sdxl"}, "hires_step_latents", "_latents"))
    out.push_back({r.family, r.name, r.info});
  return out;
}

const torch::Tensor& hr_ref(const HiresRun& run, const std::string& what) {
  return test::family_ref("tiny-" + run.family + "-hires", run.name + what);
}
bool has_ref(const HiresRun& run, const std::string& what) {
  std::ifstream in(test::fixture("tiny-" + run.family + "-hires-cases.json"));
  const auto cases = nlohmann::json::parse(in);
  for (const auto& c : cases["cases"])
    if (c["name"] == run.name + what) return true;
  return false;
}

ImageSpec spec_of(const nlohmann::json& c) {
  const auto first = test::fixture_choice(c["scheduler"]);
  const auto second = test::fixture_choice(c["hr_scheduler"]);
  ImageSpec spec = test::run_spec(c);
  HiresSpec h;
  h.scale = c["scale"];
  h.width = c["resize_x"];
  h.height = c["resize_y"];
  h.upscaler = c["upscaler"];
  h.steps = c["hr_steps"];
  h.strength = c["strength"];
  if (second.sampler != first.sampler || second.scheduler != first.scheduler) {
    h.sampler = second.sampler;
    h.scheduler = second.scheduler;
  }
  spec.hires = h;
  return spec;
}

struct Embeddings {
  EmbeddingPtr cond, uncond;
};
Embeddings embeddings(const Model& m, const nlohmann::json& c) {
  Embeddings e;
  e.cond = m.encode_text(c["prompt"], 1, TextRole::kPrompt, PromptSyntax::kNone);
  if (c["cfg"].get<double>() > 1)
    e.uncond = m.encode_text(c["negative"], 1, TextRole::kNegative, PromptSyntax::kNone);
  return e;
}

// The run's images, one trajectory each, as the engine begins them.
std::vector<std::unique_ptr<Trajectory>> begin_all(const Model& m, ImageSpec spec,
                                                   const nlohmann::json& c, const Embeddings& e) {
  std::vector<std::unique_ptr<Trajectory>> out;
  for (uint64_t seed : c["per_image_seeds"]) {
    spec.seed = seed;
    out.push_back(m.begin(spec, e.cond, e.uncond));
  }
  return out;
}

torch::Tensor latents_of(const std::vector<Trajectory*>& batch) {
  std::vector<torch::Tensor> got;
  for (auto* t : batch) got.push_back(t->state().latent.cpu());
  return torch::cat(got);
}

void check_run(const Model& m, const HiresRun& run, double tolerance, const std::string& label) {
  const auto& c = run.info;
  const ImageSpec spec = spec_of(c);
  const auto size = hires_size(spec);
  ASSERT_EQ(size.width, c["final_w"].get<int>());
  ASSERT_EQ(size.height, c["final_h"].get<int>());
  const auto e = embeddings(m, c);

  // The first pass alone is text to image: diffusers' output_type="latent".
  ImageSpec plain = spec;
  plain.hires.reset();
  auto owned_plain = begin_all(m, plain, c, e);
  std::vector<Trajectory*> first;
  for (auto& t : owned_plain) first.push_back(t.get());
  while (!first[0]->done()) m.step(first);
  const double first_err = test::rel_diff(latents_of(first), hr_ref(run, "_first"));
  EXPECT_LE(first_err, tolerance) << "first pass";

  // Both passes in one trajectory each.
  auto owned = begin_all(m, spec, c, e);
  std::vector<Trajectory*> batch;
  for (auto& t : owned) batch.push_back(t.get());
  const torch::Tensor want = hr_ref(run, "_latents");
  const int first_evals = first[0]->evals_total();
  ASSERT_EQ(batch[0]->evals_total(), first_evals + want.size(0)) << "both passes' evaluations";
  ASSERT_EQ(batch[0]->evals_total(), m.evals_total(spec));
  EXPECT_EQ(steps_in_all_passes(spec), spec.steps + static_cast<int>(want.size(0)))
      << "one evaluation per step for these samplers";
  for (int i = 0; i < first_evals; ++i) {
    ASSERT_EQ(batch[0]->spec().width, spec.width) << "still the first pass at " << i;
    m.step(batch);
  }
  // The first pass's last step began the second: its size, settings and schedule.
  ASSERT_EQ(batch[0]->evals_done(), first_evals);
  ASSERT_EQ(batch[0]->spec().width, size.width);
  ASSERT_EQ(batch[0]->spec().height, size.height);
  EXPECT_FALSE(batch[0]->spec().hires.has_value());
  const torch::Tensor timesteps = hr_ref(run, "_timesteps");
  const auto& state = batch[0]->state();
  ASSERT_EQ(state.sampler->num_evals() - state.first_eval, timesteps.size(0));
  for (int64_t i = 0; i < timesteps.size(0); ++i)
    EXPECT_NEAR(state.sampler->timesteps()[state.first_eval + i], timesteps[i].item<double>(), 1e-3)
        << "second-pass timestep " << i;
  double worst = 0;
  for (int64_t i = 0; i < want.size(0); ++i) {
    m.step(batch);
    const double err = test::rel_diff(latents_of(batch), want[i]);
    worst = std::max(worst, err);
    ASSERT_LE(err, tolerance) << run.name << " second-pass evaluation " << i;
  }
  EXPECT_TRUE(batch[0]->done());
  std::string image = "";
  if (has_ref(run, "_image")) {
    const double image_err = test::rel_diff(m.impl().decode_float(batch), hr_ref(run, "_image"));
    EXPECT_LE(image_err, tolerance) << run.name;
    image = ", image " + std::to_string(image_err);
  }
  std::cout << "[ " << label << " ] " << run.family << " " << run.name << " " << c["upscaler"]
            << ": first pass " << first_err << ", second pass " << worst << image << "\n";
}

class HiresParity : public ::testing::TestWithParam<HiresRun> {};

TEST_P(HiresParity, BothPassesMatchDiffusers) {
  check_run(*model(GetParam().family), GetParam(), kTolerance, "parity");
}

// The upscale alone, from diffusers' own first-pass latents: interpolate in each mode, and
// A1111's crop.
TEST_P(HiresParity, UpscaleMatchesInterpolate) {
  const auto& run = GetParam();
  const ImageSpec spec = spec_of(run.info);
  const auto size = hires_size(spec);
  const auto up = upscale_latents(hr_ref(run, "_first"), spec.hires->upscaler,
                                  size.upscaled_height / 8, size.upscaled_width / 8)
                      .narrow(2, size.crop_top / 8, size.height / 8)
                      .narrow(3, size.crop_left / 8, size.width / 8);
  const auto& want = hr_ref(run, "_upscaled");
  ASSERT_EQ(up.sizes(), want.sizes());
  EXPECT_LE(test::max_abs_diff(up, want), kUpscaleTolerance);
}

INSTANTIATE_TEST_SUITE_P(AllRuns, HiresParity, ::testing::ValuesIn(runs()), [](const auto& info) {
  return info.param.family + "_" + info.param.name;
});

// The same runs on a GPU in float32 (the CPU generators' draws moved to the device, as the
// service does). The bound is family_cuda_test.cpp's for fp32 runs.
TEST(HiresCuda, RunsMatchInFloat32) {
  SKIP_WITHOUT_CUDA();
  std::map<std::string, std::shared_ptr<Model>> cuda;
  for (const auto& run : runs()) {
    auto& m = cuda[run.family];
    if (!m) m = test::load_run_model(run.family, "cuda", "fp32");
    check_run(*m, run, 1e-3, "parity cuda fp32");
  }
}

TEST(HiresParityRuns, EveryCaseIsInstantiated) {
  // SD 1.x: the six latent upscalers, another hires sampler, a crop, a smaller second pass
  // (where antialiasing matters); SDXL: one.
  EXPECT_EQ(runs().size(), 10u);
}

}  // namespace hires_parity
}  // namespace sdserve::pipeline
