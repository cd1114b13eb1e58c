// LoRA against diffusers: every run in tests/fixtures/tiny-{sd15,sdxl}-lora-cases.json (made by
// tests/fixtures/make/make_lora_refs.py: diffusers' load_lora_weights + fuse_lora, kohya and
// PEFT files, one LoRA and two), each step's latents and the image, through the step-level API,
// in both ways sdserve runs LoRAs (per-row low-rank terms and merged weights); the fused
// weights diffusers / peft computed for a few UNet and text-encoder modules; a batch whose rows
// carry different LoRAs (or none) against each row alone.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "pipeline/errors.h"
#include "pipeline/lora.h"
#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

namespace sdserve::pipeline {
// Named, not anonymous: the unity build joins test files.
namespace lora_parity {

// As the other parity tests (max abs difference over max abs of the reference): float32
// reordering over at most 8 evaluations. The per-row form adds x A^T B^T where diffusers' fused
// weights compute x (W + B A)^T: a different order of the same float32 sums, well inside it.
constexpr double kTolerance = 5e-5;
// A LoRA must move the run far more than the bound, or the test could not fail.
constexpr double kMinChange = 100 * kTolerance;
// peft's merge and ours are the same float32 products ((up @ down) x scale, cast, added).
constexpr double kFusedTolerance = 1e-6;
// Rows of one batch against the same rows alone, in the same form: only batched-GEMM rounding.
constexpr double kBatchTolerance = 1e-5;

// Models of their own, not test::run_model()'s shared ones: merged LoRA weights stay in a model
// until its next call without them, and other suites read modules directly.
const std::shared_ptr<Model>& model(const std::string& family) {
  static std::map<std::string, std::shared_ptr<Model>> loaded;
  auto& m = loaded[family];
  if (!m) m = test::load_cpu(test::run_model_path(family));
  return m;
}

using LoraRun = test::DiffusersRun;

std::vector<LoraRun> runs() {
  return test::diffusers_runs("lora", {"sd15", "sdxl"}, "lora_step_latents", "_latents");
}

const torch::Tensor& lora_ref(const std::string& family, const std::string& name) {
  return test::family_ref("tiny-" + family + "-lora", name);
}

bool has_ref(const std::string& family, const std::string& name) {
  std::ifstream in(test::fixture("tiny-" + family + "-lora-cases.json"));
  const auto cases = nlohmann::json::parse(in, nullptr, false);
  if (cases.is_discarded()) return false;
  for (const auto& c : cases["cases"])
    if (c["name"] == name) return true;
  return false;
}

// The run's LoRAs, loaded once per file.
std::vector<LoraUse> uses_of(const nlohmann::json& info) {
  static std::map<std::string, std::shared_ptr<const Lora>> files;
  std::vector<LoraUse> uses;
  for (const auto& l : info["loras"]) {
    auto& lora = files[l["file"]];
    if (!lora) lora = Lora::load(test::fixture(l["file"]));
    uses.push_back({lora, l["unet_weight"], l["te_weight"]});
  }
  return uses;
}

ImageSpec spec_of(const nlohmann::json& c) {
  ImageSpec spec = test::run_spec(c);
  spec.seed = c["seed"];
  return spec;
}

// The run's latents after each step (steps, 1, C, h, w), with `loras` on the UNet.
torch::Tensor run_steps(const Model& m, const nlohmann::json& c, std::vector<LoraUse> loras) {
  auto spec = spec_of(c);
  spec.loras = std::move(loras);
  const auto cond = m.encode_text(c["prompt"], 1, TextRole::kPrompt, PromptSyntax::kNone);
  const auto uncond = m.encode_text(c["negative"], 1, TextRole::kNegative, PromptSyntax::kNone);
  auto t = m.begin(spec, cond, uncond);
  std::vector<torch::Tensor> out;
  for (int i = 0; i < t->evals_total(); ++i) {
    m.step({t.get()});
    out.push_back(t->state().latent.cpu());
  }
  return torch::stack(out);
}

// One run through the step-level API in `mode`: each step's latents (and the image, where the
// fixture stores it) against diffusers'. The prompts are encoded without LoRAs: diffusers' runs
// took the embeddings its own text encoders made without them (the text encoders' LoRAs are
// checked through their fused weights below).
void check_run(const Model& m, const LoraRun& run, LoraMode mode, double tolerance,
               const std::string& label) {
  m.impl().lora_mode = mode;
  const auto& want = lora_ref(run.family, run.name + "_latents");
  double worst = 0;
  const auto uses = uses_of(run.info);
  const auto spec = spec_of(run.info);
  auto cond = m.encode_text(run.info["prompt"], 1, TextRole::kPrompt, PromptSyntax::kNone);
  auto uncond = m.encode_text(run.info["negative"], 1, TextRole::kNegative, PromptSyntax::kNone);
  auto with = spec;
  with.loras = uses;
  auto t = m.begin(with, cond, uncond);
  ASSERT_EQ(t->evals_total(), want.size(0));
  for (int i = 0; i < t->evals_total(); ++i) {
    m.step({t.get()});
    const double err = test::rel_diff(t->state().latent, want[i]);
    worst = std::max(worst, err);
    ASSERT_LE(err, tolerance) << label << " " << run.family << " " << run.name << " step " << i;
  }
  double image_err = -1;
  if (has_ref(run.family, run.name + "_image")) {
    image_err =
        test::rel_diff(m.impl().decode_float({t.get()}), lora_ref(run.family, run.name + "_image"));
    EXPECT_LE(image_err, tolerance) << label << " " << run.name << " image";
  }
  m.impl().lora_mode = LoraMode::kAuto;
  std::cout << "[ " << label << " ] " << run.family << " " << run.name << ": latents " << worst;
  if (image_err >= 0) std::cout << ", image " << image_err;
  std::cout << "\n";
}

class LoraParity : public ::testing::TestWithParam<LoraRun> {};

TEST_P(LoraParity, PerRowMatchesDiffusers) {
  check_run(*model(GetParam().family), GetParam(), LoraMode::kPerRow, kTolerance, "per-row");
}

TEST_P(LoraParity, MergedMatchesDiffusers) {
  check_run(*model(GetParam().family), GetParam(), LoraMode::kMerged, kTolerance, "merged");
}

// Without its LoRAs the run ends far from the reference: the tests above can fail.
TEST_P(LoraParity, TheLorasChangeTheRun) {
  const auto& run = GetParam();
  const auto& m = *model(run.family);
  const auto& want = lora_ref(run.family, run.name + "_latents");
  const auto plain = run_steps(m, run.info, {});
  const double change = test::rel_diff(plain[plain.size(0) - 1], want[want.size(0) - 1]);
  EXPECT_GT(change, kMinChange) << run.name;
}

INSTANTIATE_TEST_SUITE_P(AllRuns, LoraParity, ::testing::ValuesIn(runs()), [](const auto& info) {
  return info.param.family + "_" + info.param.name;
});

TEST(LoraParityRuns, EveryCaseIsInstantiated) {
  // SD 1.x: kohya, PEFT, both at once, diffusers' older names; SDXL: kohya, PEFT, both.
  EXPECT_EQ(runs().size(), 7u);
}

// ---------------------------------------------------------------------------------------------
// The weights diffusers fused (peft's merge) for a few modules of each run, against ours.
TEST(LoraFusedWeights, MatchPeftsMerge) {
  int checked = 0;
  for (const std::string family : {"sd15", "sdxl"}) {
    std::ifstream in(test::fixture("tiny-" + family + "-lora-cases.json"));
    const auto cases = nlohmann::json::parse(in, nullptr, false);
    ASSERT_FALSE(cases.is_discarded()) << family;
    std::map<std::string, nlohmann::json> run_info;
    for (const auto& c : cases["cases"])
      if (c["kind"] == "lora_step_latents") run_info[c["run"]] = c;
    auto& impl = model(family)->impl();
    for (const auto& c : cases["cases"]) {
      if (c["kind"] != "lora_fused_weight") continue;
      const std::string component = c["component"];
      std::string module = c["module"];
      const auto side = component == "unet" ? LoraSide::kUnet : LoraSide::kText;
      const auto which = component == "unet"           ? lora_names::Component::kUnet
                         : component == "text_encoder" ? lora_names::Component::kTextEncoder
                                                       : lora_names::Component::kTextEncoder2;
      if (which != lora_names::Component::kUnet) module = module.substr(11);  // "text_model."
      const auto* target = impl.lora_targets.find(which, module, false);
      ASSERT_NE(target, nullptr) << module;
      const auto original = target->weight.clone();
      const auto set = make_lora_set(uses_of(run_info.at(c["run"])), side, *impl.lora_cache,
                                     impl.lora_targets, impl.info);
      auto& merged = side == LoraSide::kUnet ? impl.unet_merged : impl.text_merged;
      merged.apply(set, side);
      const auto& want = lora_ref(family, c["name"]);
      const double err = test::rel_diff(target->weight, want);
      EXPECT_LE(err, kFusedTolerance) << c["name"];
      EXPECT_GT(test::rel_diff(original, want), 1e-3) << c["name"] << ": the LoRA adapts it";
      merged.restore();
      EXPECT_TRUE(torch::equal(target->weight, original)) << c["name"];
      ++checked;
    }
  }
  EXPECT_EQ(checked, 21);  // SD 1.x 9, SDXL 12
}

// The text encoders' per-row form against their merged form (the form the fused weights above
// pin), for each run's LoRAs at their te_weight.
TEST(LoraTextEncoders, PerRowMatchesMerged) {
  for (const auto& run : runs()) {
    const auto& m = *model(run.family);
    const auto uses = uses_of(run.info);
    const auto plain = m.encode_text("a photo of a cat");
    m.impl().lora_mode = LoraMode::kPerRow;
    const auto per_row =
        m.encode_text("a photo of a cat", 1, TextRole::kPrompt, PromptSyntax::kA1111, uses);
    m.impl().lora_mode = LoraMode::kMerged;
    const auto merged =
        m.encode_text("a photo of a cat", 1, TextRole::kPrompt, PromptSyntax::kA1111, uses);
    m.impl().lora_mode = LoraMode::kAuto;
    const double change = test::rel_diff(per_row->hidden(), plain->hidden());
    const double err = test::rel_diff(per_row->hidden(), merged->hidden());
    EXPECT_GT(change, kMinChange) << run.name;
    EXPECT_LE(err, kBatchTolerance) << run.name;
    if (plain->pooled().defined()) {
      EXPECT_LE(test::rel_diff(per_row->pooled(), merged->pooled()), kBatchTolerance);
    }
    std::cout << "[ text ] " << run.family << " " << run.name << ": per row vs merged " << err
              << " (LoRA changes it by " << change << ")\n";
  }
  // Text encoders' LoRAs, then none: the embedding is the plain one again.
  const auto& m = *model("sd15");
  const auto a = m.encode_text("x");
  m.encode_text("x", 1, TextRole::kPrompt, PromptSyntax::kA1111, uses_of(runs().front().info));
  EXPECT_TRUE(torch::equal(m.encode_text("x")->hidden(), a->hidden()));
}

// ---------------------------------------------------------------------------------------------
// One batch: an image with LoRA A, one with B, one with none; each image's latents as it gets
// them alone.
void check_mixed_batch(const std::string& family) {
  const auto& m = *model(family);
  auto& impl = m.impl();
  const auto all = runs();
  std::vector<nlohmann::json> infos;
  for (const auto& r : all)
    if (r.family == family && (r.info["run"] == "kohya" || r.info["run"] == "peft"))
      infos.push_back(r.info);
  ASSERT_EQ(infos.size(), 2u);
  const std::vector<std::vector<LoraUse>> sets = {uses_of(infos[0]), uses_of(infos[1]), {}};
  auto spec = spec_of(infos[0]);
  const auto cond = m.encode_text("a photo of a cat", 1, TextRole::kPrompt, PromptSyntax::kNone);
  const auto uncond = m.encode_text("", 1, TextRole::kNegative, PromptSyntax::kNone);
  const auto run = [&](const std::vector<size_t>& which, LoraMode mode) {
    impl.lora_mode = mode;
    std::vector<std::unique_ptr<Trajectory>> owned;
    std::vector<Trajectory*> batch;
    for (size_t k : which) {
      auto s = spec;
      s.seed = 40 + k;
      s.loras = sets[k];
      owned.push_back(m.begin(s, cond, uncond));
      batch.push_back(owned.back().get());
    }
    while (!batch.front()->done()) m.step(batch);
    std::vector<torch::Tensor> out;
    for (auto* t : batch) out.push_back(t->state().latent.clone());
    impl.lora_mode = LoraMode::kAuto;
    return out;
  };
  const auto together = run({0, 1, 2}, LoraMode::kPerRow);
  EXPECT_EQ(m.last_step_rows().rows, 6);                 // one UNet call: three images, CFG
  const auto split = run({0, 1, 2}, LoraMode::kMerged);  // one call per set
  for (size_t k = 0; k < 3; ++k) {
    const auto alone = run({k}, LoraMode::kPerRow).front();
    const auto alone_merged = run({k}, LoraMode::kMerged).front();
    const double err = test::rel_diff(together[k], alone);
    EXPECT_LE(err, kBatchTolerance) << family << " image " << k;
    EXPECT_LE(test::rel_diff(together[k], alone_merged), kTolerance) << family << " image " << k;
    EXPECT_LE(test::rel_diff(split[k], alone_merged), kBatchTolerance) << family << " image " << k;
    std::cout << "[ mixed ] " << family << " image " << k << " in the batch vs alone: " << err
              << "\n";
  }
  // The images differ from each other by their LoRAs, not by the batch.
  EXPECT_GT(test::rel_diff(together[0], together[2]), kMinChange);
  EXPECT_GT(test::rel_diff(together[1], together[2]), kMinChange);
}

TEST(LoraMixedBatch, EachRowGetsWhatItGetsAloneSd15) {
  check_mixed_batch("sd15");
}

TEST(LoraMixedBatch, EachRowGetsWhatItGetsAloneSdxl) {
  check_mixed_batch("sdxl");
}

// ---------------------------------------------------------------------------------------------
// The runs on a GPU, both forms, in float32 (the bound family_cuda_test.cpp uses for fp32 runs)
// and fp16 (its fp16 bound: ~3 decimal digits per operation over the run).
TEST(LoraParityCuda, RunsMatchInFloat32AndFloat16) {
  SKIP_WITHOUT_CUDA();
  for (const auto& [precision, tolerance] : {std::pair{"fp32", 1e-3}, std::pair{"fp16", 5e-2}}) {
    std::map<std::string, std::shared_ptr<Model>> cuda;
    for (const auto& run : runs()) {
      auto& m = cuda[run.family];
      if (!m) m = test::load_run_model(run.family, "cuda", precision);
      check_run(*m, run, LoraMode::kPerRow, tolerance, std::string("per-row cuda ") + precision);
      check_run(*m, run, LoraMode::kMerged, tolerance, std::string("merged cuda ") + precision);
    }
  }
}

}  // namespace lora_parity
}  // namespace sdserve::pipeline
