// SD 2.x against diffusers on the tiny-sd2 fixture (v-prediction, linear projections, upcast
// attention, per-block head counts, a gelu text encoder, "!" padding): tokens, text embeddings,
// UNet, VAE and every text-to-image run with its step latents.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "family_parity.h"
#include "pipeline/errors.h"

namespace sdserve::pipeline {
namespace {

using test::family_model;
using test::family_ref;

const char* const kSd2Family = "tiny-sd2";

TEST(Sd2Parity, LoadsAsSd2WithItsSchedulerConfig) {
  const auto model = family_model(kSd2Family);
  EXPECT_EQ(model->info().family, "sd2");
  EXPECT_EQ(model->info().layout, "diffusers");
  EXPECT_FALSE(model->info().size_conditioning);
  EXPECT_EQ(model->impl().scheduler.prediction_type, "v_prediction");
  EXPECT_EQ(model->info().native_size, 64);  // sample_size 8 x the VAE's 8
}

TEST(Sd2Parity, TokensMatchIncludingExclamationPadding) {
  const auto model = family_model(kSd2Family);
  int checked = 0;
  for (const auto& c : test::cases_of_kind(kSd2Family, "tokens")) {
    const auto want = family_ref(kSd2Family, c["name"]).reshape({-1}).to(torch::kLong);
    const auto ids = model->text_input(c["prompt"], PromptSyntax::kNone).ids;
    ASSERT_EQ(static_cast<int64_t>(ids.size()), want.size(0));
    for (size_t i = 0; i < ids.size(); ++i)
      ASSERT_EQ(ids[i], want[static_cast<int64_t>(i)].item<int64_t>()) << c["name"] << " @" << i;
    ++checked;
  }
  EXPECT_GT(checked, 0);
  EXPECT_EQ(model->text_input("a", PromptSyntax::kNone).ids.back(), 0);  // "!" is id 0
}

TEST(Sd2Parity, TextEmbeddingsMatch) {
  const auto model = family_model(kSd2Family);
  int checked = 0;
  for (const auto& c : test::cases_of_kind(kSd2Family, "text_embeds")) {
    const int clip_skip = c["clip_skip"].is_null() ? 1 : c["clip_skip"].get<int>() + 1;
    const auto e =
        model->encode_text(c["prompt"], clip_skip, TextRole::kPrompt, PromptSyntax::kNone);
    test::expect_close(e->hidden(), family_ref(kSd2Family, c["name"]), test::kModuleTolerance,
                       c["name"]);
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

TEST(Sd2Parity, UNetMatchesAtEveryTimestep) {
  torch::NoGradGuard no_grad;
  auto& unet = family_model(kSd2Family)->impl().unet;
  for (int t : {1, 500, 999}) {
    const auto prefix = "unet_t" + std::to_string(t);
    const auto x = family_ref(kSd2Family, prefix + "_in");
    auto out = unet->forward(x, torch::full({x.size(0)}, t, torch::kFloat32),
                             family_ref(kSd2Family, prefix + "_emb"));
    test::expect_close(out, family_ref(kSd2Family, prefix + "_out"), test::kModuleTolerance,
                       "sd2 " + prefix);
  }
}

TEST(Sd2Parity, VaeDecodeAndEncodeMatch) {
  torch::NoGradGuard no_grad;
  auto& vae = family_model(kSd2Family)->impl().vae;
  test::expect_close(vae->decode(family_ref(kSd2Family, "vae_decode_in")),
                     family_ref(kSd2Family, "vae_decode_out"), test::kModuleTolerance,
                     "sd2 vae decode");
  test::expect_close(vae->encode_mean(family_ref(kSd2Family, "vae_encode_in")),
                     family_ref(kSd2Family, "vae_encode_mean"), test::kModuleTolerance,
                     "sd2 vae encode");
}

// The fixture's text encoder embeds ~1,000 tokens; CLIP's full tokenizer beside it would make ids
// past its table: refused when the model loads, naming both, not at the first prompt.
TEST(Sd2Parity, ATokenizerLargerThanTheTextEncoderIsRefusedAtLoad) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("sdserve-vocab-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::copy(test::family_dir(kSd2Family), dir, fs::copy_options::recursive);
  for (const char* name : {"vocab.json", "merges.txt"}) {
    fs::permissions(dir / "tokenizer", fs::perms::owner_all, fs::perm_options::add);
    fs::remove(dir / "tokenizer" / name);
    fs::copy_file(fs::path(test::model_dir()) / "tokenizer" / name, dir / "tokenizer" / name);
  }
  try {
    test::load_cpu(dir.string());
    ADD_FAILURE() << "expected a ModelError";
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("ids up to 49407"), std::string::npos) << e.what();
    const auto rows = family_model(kSd2Family)->impl().text_encoder->config().vocab_size;
    EXPECT_NE(std::string(e.what()).find("embeds only " + std::to_string(rows) + " tokens"),
              std::string::npos)
        << e.what();
  }
  fs::remove_all(dir);
}

TEST(Sd2Parity, SchedulerTimestepsMatch) {
  EXPECT_EQ(test::check_timesteps(kSd2Family), 8);
}

class Sd2Runs : public ::testing::TestWithParam<test::FamilyRun> {};

TEST_P(Sd2Runs, StepLatentsAndImagesMatchDiffusers) {
  test::check_run(GetParam());
}

INSTANTIATE_TEST_SUITE_P(AllRuns, Sd2Runs, ::testing::ValuesIn(test::family_runs(kSd2Family)),
                         [](const auto& info) { return info.param.name; });

TEST(Sd2Parity, AllEightRunsAreInstantiated) {
  EXPECT_EQ(test::family_runs(kSd2Family).size(), 8u);
}

}  // namespace
}  // namespace sdserve::pipeline
