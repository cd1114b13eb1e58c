// SDXL against diffusers on the tiny-sdxl fixture: both tokenizers, both text encoders' hidden
// states and the pooled embedding, encode_prompt with and without clip_skip and negatives
// (zeros for an empty one), the UNet with text_time conditioning, the VAE, and every
// text-to-image run (square and non-square, 1 and 2 images) with its step latents.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "family_parity.h"

namespace sdserve::pipeline {
namespace {

using test::family_model;
using test::family_ref;

const char* const kSdxlFamily = "tiny-sdxl";

torch::Tensor ids_tensor(const std::vector<int32_t>& ids) {
  return torch::tensor(std::vector<int64_t>(ids.begin(), ids.end()), torch::kInt64).view({1, -1});
}

// diffusers' clip_skip (null or k) in this API's convention (1 = no skip).
int clip_skip_of(const nlohmann::json& c) {
  return c["clip_skip"].is_null() ? 1 : c["clip_skip"].get<int>() + 1;
}

TEST(SdxlParity, LoadsAsSdxl) {
  const auto loaded = family_model(kSdxlFamily);
  const auto& info = loaded->info();
  EXPECT_EQ(info.family, "sdxl");
  EXPECT_TRUE(info.size_conditioning);
  EXPECT_TRUE(info.negatives_differ);
  EXPECT_EQ(info.native_size, 64);  // sample_size 8 x the VAE's 8
  EXPECT_EQ(info.text_layers, 3);   // the shallower encoder bounds clip_skip
  EXPECT_DOUBLE_EQ(family_model(kSdxlFamily)->impl().vae_scaling_factor, 0.13025);
}

TEST(SdxlParity, TokensOfBothTokenizersMatch) {
  const auto loaded = family_model(kSdxlFamily);
  const auto& impl = loaded->impl();
  int checked = 0;
  for (const auto& c : test::cases_of_kind(kSdxlFamily, "tokens")) {
    const auto& tokenizer = c["encoder"] == 1 ? *impl.tokenizer : *impl.tokenizer_2;
    const auto want = family_ref(kSdxlFamily, c["name"]).reshape({-1}).to(torch::kLong);
    const auto ids = tokenizer.encode(c["prompt"]);
    ASSERT_EQ(static_cast<int64_t>(ids.size()), want.size(0));
    for (size_t i = 0; i < ids.size(); ++i)
      ASSERT_EQ(ids[i], want[static_cast<int64_t>(i)].item<int64_t>()) << c["name"] << " @" << i;
    ++checked;
  }
  EXPECT_EQ(checked, 10);
}

TEST(SdxlParity, HiddenStatesAndPooledMatch) {
  torch::NoGradGuard no_grad;
  auto& impl = family_model(kSdxlFamily)->impl();
  int checked = 0;
  for (const std::string kind : {"text_hidden", "text_pooled"}) {
    for (const auto& c : test::cases_of_kind(kSdxlFamily, kind)) {
      const bool second = c["encoder"] == 2;
      auto& encoder = second ? impl.text_encoder_2 : impl.text_encoder;
      const auto& tokenizer = second ? *impl.tokenizer_2 : *impl.tokenizer;
      // text_hidden is layer -2: one layer skipped, no final layer norm.
      const auto out = encoder->encode_unnormed(ids_tensor(tokenizer.encode(c["prompt"])), 1);
      test::expect_close(kind == "text_hidden" ? out.hidden : out.pooled,
                         family_ref(kSdxlFamily, c["name"]), test::kModuleTolerance, c["name"]);
      ++checked;
    }
  }
  EXPECT_EQ(checked, 15);
}

// Published SDXL configs say eos_token_id 2, which makes transformers read the pooled
// embedding at the highest token id: the same position (the end token) for CLIP's vocabulary.
TEST(SdxlParity, LegacyEosTokenIdGivesTheSamePooledEmbedding) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("sdserve-eos2-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::copy(test::family_dir(kSdxlFamily), dir, fs::copy_options::recursive);
  const fs::path config = dir / "text_encoder_2" / "config.json";
  auto j = nlohmann::json::parse(std::ifstream(config));
  j["eos_token_id"] = 2;
  fs::permissions(config, fs::perms::owner_write, fs::perm_options::add);
  std::ofstream(config) << j.dump();
  const auto model = test::load_cpu(dir.string());
  for (const auto& c : test::cases_of_kind(kSdxlFamily, "text_pooled"))
    test::expect_close(
        model->encode_text(c["prompt"], 1, TextRole::kPrompt, PromptSyntax::kNone)->pooled(),
        family_ref(kSdxlFamily, c["name"]), test::kModuleTolerance,
        std::string(c["name"]) + " (eos_token_id 2)");
  fs::remove_all(dir);
}

TEST(SdxlParity, EncodePromptMatchesWithAndWithoutClipSkip) {
  const auto model = family_model(kSdxlFamily);
  int checked = 0;
  for (const auto& c : test::cases_of_kind(kSdxlFamily, "prompt_embeds")) {
    const auto e =
        model->encode_text(c["prompt"], clip_skip_of(c), TextRole::kPrompt, PromptSyntax::kNone);
    const std::string pooled_name =
        std::string(c["name"]).replace(0, std::string("prompt_embeds").size(), "pooled_embeds");
    test::expect_close(e->hidden(), family_ref(kSdxlFamily, c["name"]), test::kModuleTolerance,
                       c["name"]);
    test::expect_close(e->pooled(), family_ref(kSdxlFamily, pooled_name), test::kModuleTolerance,
                       pooled_name);
    ++checked;
  }
  EXPECT_EQ(checked, 10);
}

TEST(SdxlParity, NegativesIgnoreClipSkipAndEmptyOnesAreZeros) {
  const auto model = family_model(kSdxlFamily);
  int checked = 0, zeros = 0;
  for (const auto& c : test::cases_of_kind(kSdxlFamily, "negative_embeds")) {
    const std::string negative = c["negative"];
    const auto e =
        model->encode_text(negative, clip_skip_of(c), TextRole::kNegative, PromptSyntax::kNone);
    const std::string pooled_name =
        std::string(c["name"]).replace(0, std::string("negative_embeds").size(), "negative_pooled");
    test::expect_close(e->hidden(), family_ref(kSdxlFamily, c["name"]), test::kModuleTolerance,
                       c["name"]);
    test::expect_close(e->pooled(), family_ref(kSdxlFamily, pooled_name), test::kModuleTolerance,
                       pooled_name);
    if (negative.empty()) {
      EXPECT_EQ(e->hidden().abs().max().item<float>(), 0.0f);
      ++zeros;
    }
    ++checked;
  }
  EXPECT_EQ(checked, 10);
  EXPECT_GT(zeros, 0);
  // The same empty text as a prompt is encoded, not zeroed.
  EXPECT_GT(model->encode_text("")->hidden().abs().max().item<float>(), 0.0f);
}

TEST(SdxlParity, UNetWithTextTimeConditioningMatches) {
  torch::NoGradGuard no_grad;
  auto& unet = family_model(kSdxlFamily)->impl().unet;
  const auto x = family_ref(kSdxlFamily, "unet_in");
  for (int t : {1, 500, 999}) {
    auto out = unet->forward(
        x, torch::full({x.size(0)}, t, torch::kFloat32), family_ref(kSdxlFamily, "unet_emb"),
        family_ref(kSdxlFamily, "unet_text_embeds"), family_ref(kSdxlFamily, "unet_time_ids"));
    test::expect_close(out, family_ref(kSdxlFamily, "unet_t" + std::to_string(t) + "_out"),
                       test::kModuleTolerance, "sdxl unet t" + std::to_string(t));
  }
}

TEST(SdxlParity, VaeDecodeAndEncodeMatch) {
  torch::NoGradGuard no_grad;
  auto& vae = family_model(kSdxlFamily)->impl().vae;
  test::expect_close(vae->decode(family_ref(kSdxlFamily, "vae_decode_in")),
                     family_ref(kSdxlFamily, "vae_decode_out"), test::kModuleTolerance,
                     "sdxl vae decode");
  test::expect_close(vae->encode_mean(family_ref(kSdxlFamily, "vae_encode_in")),
                     family_ref(kSdxlFamily, "vae_encode_mean"), test::kModuleTolerance,
                     "sdxl vae encode");
}

TEST(SdxlParity, SchedulerTimestepsFollowTheConfigsLeadingSpacing) {
  EXPECT_EQ(test::check_timesteps(kSdxlFamily), 12);
}

TEST(SdxlParity, TimeIdsDefaultToTheImageSizeAndTakeOverrides) {
  const auto loaded = family_model(kSdxlFamily);
  const auto& impl = loaded->impl();
  ImageSpec spec;
  spec.width = 96;
  spec.height = 64;
  EXPECT_EQ(impl.time_ids(spec), (std::vector<float>{64, 96, 0, 0, 64, 96}));
  spec.original_width = 2048;
  spec.original_height = 1024;
  spec.crop_top = 8;
  spec.crop_left = 16;
  spec.target_width = 1024;
  spec.target_height = 512;
  EXPECT_EQ(impl.time_ids(spec), (std::vector<float>{1024, 2048, 8, 16, 512, 1024}));
}

class SdxlRuns : public ::testing::TestWithParam<test::FamilyRun> {};

TEST_P(SdxlRuns, StepLatentsAndImagesMatchDiffusers) {
  test::check_run(GetParam());
}

INSTANTIATE_TEST_SUITE_P(AllRuns, SdxlRuns, ::testing::ValuesIn(test::family_runs(kSdxlFamily)),
                         [](const auto& info) { return info.param.name; });

TEST(SdxlParity, AllTwelveRunsAreInstantiated) {
  EXPECT_EQ(test::family_runs(kSdxlFamily).size(), 12u);
}

}  // namespace
}  // namespace sdserve::pipeline
