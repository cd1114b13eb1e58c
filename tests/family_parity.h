// Shared by the SD 2.x and SDXL parity suites: loading a fixture family's model on the CPU in
// float32, its cases, and running one fixture text-to-image run through the step-level API.
#pragma once

#include <gtest/gtest.h>

#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"
#include "test_util.h"

namespace sdserve::test {

// The SD 1.x suite's end-to-end measure and bound (max abs difference over the reference's max
// abs; see pipeline_parity_test.cpp for the measured headroom), well inside the 1e-3.
constexpr double kRunTolerance = 5e-5;
// Single modules in float32 on the CPU, as the SD 1.x module tests.
constexpr double kModuleTolerance = 1e-4;

inline const std::shared_ptr<pipeline::Model>& family_model(const std::string& family) {
  return cpu_model(family_dir(family));
}

// Empty when the file is missing: the parameterised suites are instantiated from this before
// main(), where throwing would abort the whole test binary; gtest then fails the uninstantiated
// suite, and the tests that load the fixture fail naming the missing path.
inline nlohmann::json family_cases(const std::string& family) {
  std::ifstream in(fixture(family + "-cases.json"));
  if (!in) return nlohmann::json::array();
  return nlohmann::json::parse(in)["cases"];
}

inline std::vector<nlohmann::json> cases_of_kind(const std::string& family,
                                                 const std::string& kind) {
  std::vector<nlohmann::json> out;
  for (const auto& c : family_cases(family))
    if (c["kind"] == kind) out.push_back(c);
  return out;
}

struct FamilyRun {
  std::string family;
  std::string name;  // run_<sched>_<k>
  nlohmann::json image_case;
};
inline void PrintTo(const FamilyRun& run, std::ostream* os) {
  *os << run.family << "/" << run.name;
}

inline std::vector<FamilyRun> family_runs(const std::string& family) {
  std::vector<FamilyRun> out;
  for (const auto& c : cases_of_kind(family, "pipeline_image")) {
    const std::string name = c["name"];
    out.push_back({family, name.substr(0, name.size() - std::string("_image").size()), c});
  }
  return out;
}

// Runs `run` on `model` as the engine does (encode, begin per image, step together, decode)
// and returns {worst step-latent error, image error}, each relative to the reference's range.
inline std::pair<double, double> run_errors(const pipeline::Model& model, const FamilyRun& run) {
  const auto& c = run.image_case;
  const auto choice = fixture_choice(c["scheduler"]);
  pipeline::ImageSpec spec;
  spec.width = c.value("w", 64);
  spec.height = c.value("h", 64);
  spec.steps = c["steps"];
  spec.guidance_scale = c["cfg"];
  spec.sampler = choice.sampler;
  spec.scheduler = choice.scheduler;
  // The text as diffusers reads it (cut at 75 tokens): some cases' prompts are longer.
  const auto literal = pipeline::PromptSyntax::kNone;
  auto cond = model.encode_text(c["prompt"], 1, pipeline::TextRole::kPrompt, literal);
  pipeline::EmbeddingPtr uncond;
  if (spec.guidance_scale > 1)
    uncond = model.encode_text(c["negative"], 1, pipeline::TextRole::kNegative, literal);
  std::vector<std::unique_ptr<pipeline::Trajectory>> owned;
  std::vector<pipeline::Trajectory*> batch;
  const uint64_t seed = c["seed"];
  for (int k = 0; k < c["n"].get<int>(); ++k) {
    spec.seed = seed + static_cast<uint64_t>(k);  // the fixtures' per-image seeds
    owned.push_back(model.begin(spec, cond, uncond));
    batch.push_back(owned.back().get());
  }
  const auto want_latents = family_ref(run.family, run.name + "_latents");
  EXPECT_EQ(batch[0]->evals_total(), want_latents.size(0));
  double worst = 0;
  for (int i = 0; i < batch[0]->evals_total() && i < want_latents.size(0); ++i) {
    model.step(batch);
    std::vector<torch::Tensor> got;
    for (auto* t : batch) got.push_back(t->state().latent.cpu());
    worst = std::max(worst, rel_diff(torch::cat(got), want_latents[i]));
  }
  const auto image = model.impl().decode_float(batch);
  return {worst, rel_diff(image, family_ref(run.family, run.name + "_image"))};
}

// run_errors() on the CPU model, within kRunTolerance.
inline void check_run(const FamilyRun& run) {
  const auto [latents, image] = run_errors(*family_model(run.family), run);
  EXPECT_LE(latents, kRunTolerance) << run.name;
  EXPECT_LE(image, kRunTolerance) << run.name;
  std::cout << "[ parity ] " << run.family << " " << run.name << ": latents " << latents
            << ", image " << image << "\n";
}

// Every scheduler_timesteps case of the family; returns how many were checked.
inline int check_timesteps(const std::string& family) {
  const auto model = family_model(family);
  int checked = 0;
  for (const auto& c : cases_of_kind(family, "scheduler_timesteps")) {
    ++checked;
    const auto choice = fixture_choice(c["scheduler"]);
    pipeline::ImageSpec spec;
    spec.width = spec.height = 64;
    spec.steps = c["steps"];
    spec.sampler = choice.sampler;
    spec.scheduler = choice.scheduler;
    spec.guidance_scale = 1;
    auto t = model->begin(spec, model->encode_text(""), nullptr);
    const auto want = family_ref(family, c["name"]);
    const auto& got = t->state().sampler->timesteps();
    EXPECT_EQ(static_cast<int64_t>(got.size()), want.size(0)) << c["name"];
    for (size_t i = 0; i < got.size() && static_cast<int64_t>(i) < want.size(0); ++i)
      EXPECT_NEAR(got[i], want[i].item<double>(), 1e-4) << c["name"] << " [" << i << "]";
  }
  return checked;
}

inline void expect_close(const torch::Tensor& got, const torch::Tensor& want, double bound,
                         const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const double err = max_abs_diff(got, want);
  EXPECT_LE(err, bound) << what;
  std::cout << "[ parity ] " << what << ": " << err << "\n";
}

}  // namespace sdserve::test
