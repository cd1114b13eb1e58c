// A1111's prompt syntax through the model (issue #12): weights applied to the text encoder's
// output as A1111's default emphasis does, long prompts in chunks, and exact diffusers parity for
// prompts without syntax. The parser and the chunking rules are tested in prompt_syntax_test.cpp.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "family_parity.h"
#include "pipeline/errors.h"
#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"
#include "stepping.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

const std::shared_ptr<Model>& sd1() {
  static const auto m = test::load_cpu(test::model_dir());
  return m;
}

bool has_syntax(const std::string& prompt) {
  return prompt.find_first_of("()[]\\:") != std::string::npos ||
         prompt.find("BREAK") != std::string::npos;
}

// Every fixture prompt without syntax that fits one chunk: A1111's reading is bit-for-bit the
// literal one, which the parity suites compare with diffusers.
void expect_no_syntax_is_literal(Model& model, const std::vector<nlohmann::json>& cases,
                                 bool sdxl) {
  int checked = 0;
  for (const auto& c : cases) {
    const std::string prompt = c["prompt"];
    if (has_syntax(prompt) || model.tokenize(prompt).size() > 75) continue;
    for (int clip_skip : {1, 2}) {
      for (auto role : {TextRole::kPrompt, TextRole::kNegative}) {
        const auto a = model.encode_text(prompt, clip_skip, role, PromptSyntax::kA1111);
        const auto n = model.encode_text(prompt, clip_skip, role, PromptSyntax::kNone);
        EXPECT_TRUE(torch::equal(a->hidden(), n->hidden())) << prompt;
        if (sdxl) {
          EXPECT_TRUE(torch::equal(a->pooled(), n->pooled())) << prompt;
        }
        EXPECT_EQ(model.text_input(prompt, PromptSyntax::kA1111).ids,
                  model.text_input(prompt, PromptSyntax::kNone).ids);
      }
    }
    ++checked;
  }
  EXPECT_GE(checked, 3);
}

TEST(PromptWeighting, WithoutSyntaxA1111ReadingIsExactlyDiffusers) {
  std::vector<nlohmann::json> embeds;
  for (const auto& c : test::cases_of_kind("tiny-sd15", "text_embeds")) embeds.push_back(c);
  expect_no_syntax_is_literal(*sd1(), embeds, false);
  // And against diffusers' tensors directly, through the default (A1111) syntax.
  for (const auto& c : embeds) {
    const std::string prompt = c["prompt"];
    if (has_syntax(prompt) || sd1()->tokenize(prompt).size() > 75) continue;
    const int clip_skip = c["clip_skip"].is_null() ? 1 : c["clip_skip"].get<int>() + 1;
    test::expect_close(sd1()->encode_text(prompt, clip_skip)->hidden(), test::ref(c["name"]),
                       test::kModuleTolerance, c["name"]);
  }
}

TEST(PromptWeighting, WithoutSyntaxA1111ReadingIsExactlyDiffusersForSdxl) {
  expect_no_syntax_is_literal(*test::family_model("tiny-sdxl"),
                              test::cases_of_kind("tiny-sdxl", "prompt_embeds"), true);
}

// A1111's "Original" emphasis, written out: each token's vector times its weight, then the chunk
// scaled back to its mean.
torch::Tensor emphasised(torch::Tensor z, const std::vector<float>& weights) {
  const auto w = torch::tensor(weights).view({1, -1, 1});
  const auto mean = z.mean();
  z = z * w;
  return z * (mean / z.mean());
}

TEST(PromptWeighting, WeightsScaleTheirTokensAndKeepTheMean) {
  const auto& model = *sd1();
  // "a (red:1.5) [cube]" reads the tokens of "a red cube" with red x 1.5 and cube / 1.1.
  const auto literal = model.encode_text("a red cube", 1, TextRole::kPrompt, PromptSyntax::kNone);
  const auto in = model.text_input("a (red:1.5) [cube]", PromptSyntax::kA1111);
  EXPECT_EQ(in.ids, model.text_input("a red cube", PromptSyntax::kNone).ids);
  std::vector<float> weights(in.ids.size(), 1.0f);
  weights[2] = 1.5f;                         // start, a, red
  weights[3] = static_cast<float>(1 / 1.1);  // cube
  EXPECT_EQ(in.weights, weights);
  const auto got = model.encode_text("a (red:1.5) [cube]")->hidden();
  const auto want = emphasised(literal->hidden(), weights);
  EXPECT_LE(test::max_abs_diff(got, want), 1e-6);  // float32 rounding of the same arithmetic
  EXPECT_GT(test::max_abs_diff(got, literal->hidden()), 1e-3);  // and it does change things
  // The mean over the chunk is kept.
  EXPECT_NEAR(got.mean().item<double>(), literal->hidden().mean().item<double>(), 1e-6);
}

TEST(PromptWeighting, LongPromptsAreEncodedInChunksOf75) {
  const auto& model = *sd1();
  // The fixture's longest prompt (no commas): diffusers cut it to its first 75 tokens.
  std::string lorem;
  for (const auto& c : test::cases_of_kind("tiny-sd15", "text_embeds"))
    if (c["name"] == "embeds_7") lorem = c["prompt"];
  ASSERT_GT(model.tokenize(lorem).size(), 75u);
  const auto e = model.encode_text(lorem);
  const int64_t chunks = (static_cast<int64_t>(model.tokenize(lorem).size()) + 74) / 75;
  ASSERT_EQ(e->hidden().size(1), 77 * chunks);
  // The first chunk is what diffusers made of the whole prompt ...
  test::expect_close(e->hidden().narrow(1, 0, 77), test::ref("embeds_7"), test::kModuleTolerance,
                     "first chunk");
  // ... and each next one the encoder's reading of the next 75 tokens, framed the same way.
  const auto in = model.text_input(lorem, PromptSyntax::kA1111);
  ASSERT_EQ(static_cast<int64_t>(in.ids.size()), 77 * chunks);
  const auto ids =
      torch::tensor(std::vector<int64_t>(in.ids.begin() + 77, in.ids.begin() + 154)).view({1, 77});
  torch::NoGradGuard no_grad;
  const auto second = model.impl().text_encoder->forward(ids);
  // (A batch of two chunks against one: float32 rounding of the same sums.)
  EXPECT_LE(test::max_abs_diff(e->hidden().narrow(1, 77, 77), second), 1e-5);
  // "none" keeps diffusers' cut.
  EXPECT_EQ(model.encode_text(lorem, 1, TextRole::kPrompt, PromptSyntax::kNone)->hidden().size(1),
            77);
  // The chunked embedding survives the shared cache tier's bytes.
  const auto back = model.embedding_from_bytes(model.embedding_to_bytes(*e));
  EXPECT_TRUE(torch::equal(back->hidden(), e->hidden()));
}

TEST(PromptWeighting, SdxlChunksBothEncodersAndPoolsTheFirstChunk) {
  const auto& model = *test::family_model("tiny-sdxl");
  std::string words;
  for (int i = 0; i < 100; ++i) words += "cat ";
  const auto e = model.encode_text(words);
  const auto cut = model.encode_text(words, 1, TextRole::kPrompt, PromptSyntax::kNone);
  ASSERT_EQ(e->hidden().size(1), 154);
  // No commas: the first chunk holds the same 75 tokens diffusers keeps (encoded in a batch of
  // two chunks against one: float32 rounding apart).
  EXPECT_LE(test::max_abs_diff(e->hidden().narrow(1, 0, 77), cut->hidden()), 1e-5);
  EXPECT_LE(test::max_abs_diff(e->pooled(), cut->pooled()), 1e-5);
}

TEST(PromptWeighting, LongAndShortPromptsStepTogetherAsTheyWouldAlone) {
  const auto& model = *sd1();
  const std::string words = test::two_chunk_prompt();
  ImageSpec spec;
  spec.width = spec.height = 64;
  spec.steps = 3;
  spec.seed = 5;
  const auto run = [&](const std::vector<std::string>& prompts) {
    return test::latents_stepped_together(model, spec, prompts);
  };
  const auto together = run({words, "a red cube"});
  const auto long_alone = run({words});
  const auto short_alone = run({"a red cube"});
  // Rows of one length share a UNet call either way; only the batch size differs, which moves
  // float32 CPU results by rounding alone.
  EXPECT_LE(test::rel_diff(together[0], long_alone[0]), 1e-5);
  EXPECT_LE(test::rel_diff(together[1], short_alone[0]), 1e-5);
  EXPECT_GT(test::rel_diff(together[0], together[1]), 1e-3);
}

TEST(PromptWeighting, UnusableSyntaxIsARequestErrorNamingTheField) {
  const auto& model = *sd1();
  try {
    model.encode_text("a (cat:1.2.3)", 1, TextRole::kNegative);
    FAIL();
  } catch (const RequestError& e) {
    EXPECT_EQ(e.field(), "negative_prompt");
  }
  // Weights so large that the embedding overflows are refused, not turned into NaN pixels.
  try {
    model.encode_text("a (cat:1" + std::string(60, '0') + ")");
    FAIL();
  } catch (const RequestError& e) {
    EXPECT_EQ(e.field(), "prompt");
  }
  EXPECT_THROW(parse_prompt_syntax("comfy"), RequestError);
  EXPECT_EQ(parse_prompt_syntax(prompt_syntax_name(PromptSyntax::kNone)), PromptSyntax::kNone);
}

}  // namespace
}  // namespace sdserve::pipeline
