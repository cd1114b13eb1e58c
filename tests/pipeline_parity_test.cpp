// End to end against diffusers: all 27 fixture runs (9 samplers x 3 settings), every step's
// latents and the final images, through the same step-level API the batching engine uses.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pipeline/errors.h"
#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

// The measure: max abs difference over max abs of the reference. Measured worst over the
// 27 runs: 5.1e-6 on the CPU (torch 1.13) and 6.0e-6 in CUDA fp32 (H200, torch 2.11), float32
// reordering across up to 39 model evaluations; 5e-5 leaves ~8x headroom and still catches a
// real numerical change. The measured errors are printed so drift shows before it fails.
constexpr double kTolerance = 5e-5;

std::shared_ptr<Model> tiny(const std::string& path = test::model_dir()) {
  LoadOptions o;
  o.device = "cpu";
  o.precision = "fp32";
  return Model::load(path, o);
}

const std::shared_ptr<Model>& shared_tiny() {
  static auto m = tiny();
  return m;
}

struct FixtureRun {
  std::string name;  // run_<sched>_<k>
  nlohmann::json image_case;
};

void PrintTo(const FixtureRun& run, std::ostream* os) {
  *os << run.name;
}

std::vector<FixtureRun> fixture_runs() {
  std::ifstream in(test::fixture("tiny-sd15-cases.json"));
  auto cases = nlohmann::json::parse(in)["cases"];
  std::vector<FixtureRun> out;
  for (const auto& c : cases)
    if (c["kind"] == "pipeline_image") {
      std::string name = c["name"];
      out.push_back({name.substr(0, name.size() - std::string("_image").size()), c});
    }
  return out;
}

class PipelineParity : public ::testing::TestWithParam<FixtureRun> {};

TEST_P(PipelineParity, StepLatentsAndImageMatchDiffusers) {
  const FixtureRun& run = GetParam();
  const auto& c = run.image_case;
  const auto& model = shared_tiny();
  const auto choice = test::fixture_choice(c["scheduler"]);
  ImageSpec spec;
  spec.width = spec.height = 64;
  spec.steps = c["steps"];
  spec.guidance_scale = c["cfg"];
  spec.sampler = choice.sampler;
  spec.scheduler = choice.scheduler;
  auto cond = model->encode_text(c["prompt"]);
  EmbeddingPtr uncond;
  if (spec.guidance_scale > 1) uncond = model->encode_text(c["negative"]);

  std::vector<std::unique_ptr<Trajectory>> owned;
  std::vector<Trajectory*> batch;
  for (uint64_t seed : c["per_image_seeds"]) {
    spec.seed = seed;
    owned.push_back(model->begin(spec, cond, uncond));
    batch.push_back(owned.back().get());
  }
  const auto want_latents = test::ref(run.name + "_latents");
  ASSERT_EQ(batch[0]->evals_total(), want_latents.size(0));
  double worst = 0;
  for (int i = 0; i < batch[0]->evals_total(); ++i) {
    model->step(batch);
    std::vector<torch::Tensor> got;
    for (auto* t : batch) got.push_back(t->state().latent.cpu());
    const double err = test::rel_diff(torch::cat(got), want_latents[i]);
    worst = std::max(worst, err);
    ASSERT_LE(err, kTolerance) << run.name << " step " << i;
  }
  const auto image = model->impl().decode_float(batch);
  const double image_err = test::rel_diff(image, test::ref(run.name + "_image"));
  EXPECT_LE(image_err, kTolerance) << run.name;
  std::cout << "[ parity ] " << run.name << ": latents " << worst << ", image " << image_err
            << "\n";
}

TEST(PipelineParityRuns, AllTwentySevenAreInstantiated) {
  EXPECT_EQ(fixture_runs().size(), 27u);
}

INSTANTIATE_TEST_SUITE_P(AllRuns, PipelineParity, ::testing::ValuesIn(fixture_runs()),
                         [](const auto& info) { return info.param.name; });

TEST(PipelineParityTimesteps, EverySchedulerMatches) {
  std::ifstream in(test::fixture("tiny-sd15-cases.json"));
  const auto& model = shared_tiny();
  const auto all = nlohmann::json::parse(in);
  int checked = 0;
  for (const auto& c : all["cases"]) {
    if (c["kind"] != "scheduler_timesteps") continue;
    ++checked;
    const auto choice = test::fixture_choice(c["scheduler"]);
    ImageSpec spec;
    spec.width = spec.height = 64;
    spec.steps = c["steps"];
    spec.sampler = choice.sampler;
    spec.scheduler = choice.scheduler;
    spec.guidance_scale = 1;
    auto t = model->begin(spec, model->encode_text(""), nullptr);
    const auto want = test::ref(c["name"]);
    const auto& got = t->state().sampler->timesteps();
    ASSERT_EQ(static_cast<int64_t>(got.size()), want.size(0)) << c["name"];
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_NEAR(got[i], want[i].item<double>(), 1e-4) << c["name"] << " [" << i << "]";
  }
  EXPECT_EQ(checked, 27);
}

TEST(PipelineLoad, SingleFileAndFolderGiveTheSameImage) {
  auto folder = shared_tiny();
  auto single = tiny(test::single_file());
  EXPECT_EQ(single->info().layout, "single-file");
  EXPECT_EQ(folder->info().layout, "diffusers");
  GenerateRequest r;
  r.prompt = "a photo of a cat";
  r.image.width = r.image.height = 64;
  r.image.steps = 5;
  r.image.seed = 42;
  const auto a = folder->generate(r);
  const auto b = single->generate(r);
  ASSERT_EQ(a.size(), 1u);
  EXPECT_EQ(a[0].pixels, b[0].pixels);
}

TEST(PipelineLoad, GenerateMatchesReferenceImagePixels) {
  // The 8-bit image of run_euler_0 equals the reference rounded as diffusers rounds it
  // (a pixel may flip by one where the float sits at .5).
  GenerateRequest r;
  r.prompt = "a photo of a cat";
  r.image.width = r.image.height = 64;
  r.image.steps = 12;
  r.image.seed = 42;
  r.image.sampler = "euler";
  const auto img = shared_tiny()->generate(r);
  auto want = (test::ref("run_euler_0_image")[0] * 255)
                  .round()
                  .clamp(0, 255)
                  .permute({1, 2, 0})
                  .contiguous();
  auto got =
      torch::from_blob(const_cast<uint8_t*>(img[0].pixels.data()), {64, 64, 3}, torch::kUInt8)
          .to(torch::kFloat32);
  EXPECT_LE((got - want).abs().max().item<float>(), 1.0f);
}

TEST(PipelineLoad, ShapeMismatchNamesTensorAndBothShapes) {
  // A folder whose text-encoder config disagrees with its weights.
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::temp_directory_path() / ("sdserve-mismatch-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::copy(test::model_dir(), dir, fs::copy_options::recursive);
  const auto config_path = dir / "text_encoder" / "config.json";
  auto config = nlohmann::json::parse(std::ifstream(config_path));
  config["intermediate_size"] = 38;  // the weights have 37
  fs::permissions(config_path, fs::perms::owner_write, fs::perm_options::add);
  std::ofstream(config_path) << config.dump();
  try {
    tiny(dir.string());
    FAIL() << "expected a ModelError";
  } catch (const ModelError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'encoder.layers.0.mlp.fc1.weight'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[37, 32]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[38, 32]"), std::string::npos) << msg;
  }
  fs::remove_all(dir);
}

TEST(PipelineRequests, RefusesBadSpecs) {
  const auto& model = shared_tiny();
  auto cond = model->encode_text("x");
  ImageSpec spec;
  spec.width = 65;
  EXPECT_THROW(model->begin(spec, cond, cond), RequestError);
  spec.width = 64;
  spec.steps = 0;
  EXPECT_THROW(model->begin(spec, cond, cond), RequestError);
  spec.steps = 5;
  spec.sampler = "nope";
  EXPECT_THROW(model->begin(spec, cond, cond), RequestError);
  spec.sampler = "euler";
  EXPECT_THROW(model->begin(spec, cond, nullptr), RequestError);  // CFG needs the negative
  EXPECT_THROW(model->encode_text("x", 0), RequestError);
  EXPECT_THROW(model->encode_text("x", 99), RequestError);
}

TEST(PipelinePreview, ProjectsPredictedLatentToRgb) {
  const auto& model = shared_tiny();
  ImageSpec spec;
  spec.width = 128;
  spec.height = 64;
  spec.steps = 3;
  auto t = model->begin(spec, model->encode_text("a"), model->encode_text(""));
  model->step({t.get()});
  const auto p = model->preview(*t, 256);
  EXPECT_EQ(p.width, 16);  // latent resolution: 128 / 8
  EXPECT_EQ(p.height, 8);
  EXPECT_EQ(p.pixels.size(), 16u * 8 * 3);
  const auto v = model->preview_vae(*t, 64);
  EXPECT_EQ(v.width, 64);
  EXPECT_EQ(v.height, 32);
}

}  // namespace
}  // namespace sdserve::pipeline
