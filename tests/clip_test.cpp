#include "pipeline/nn/clip.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "pipeline/errors.h"
#include "pipeline/io/safetensors.h"
#include "pipeline/io/tensor_io.h"
#include "pipeline/io/tokenizer.h"
#include "pipeline/nn/attention.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

constexpr double kTolerance = 1e-4;

nlohmann::json text_encoder_config() {
  return test::model_files().text_encoder_config;
}

// The folder checkpoint's tensors (the loader strips transformers' "text_model." prefix).
WeightSource text_encoder_weights() {
  return test::model_files().text_encoder;
}

ClipTextModel& model() {
  static ClipTextModel m = [] {
    ClipTextModel built(ClipTextConfig::from_json(text_encoder_config()));
    load_weights(*built, text_encoder_weights(), torch::kFloat32, torch::kCPU);
    built->eval();
    return built;
  }();
  return m;
}

torch::Tensor ids_tensor(const std::vector<int32_t>& ids) {
  return torch::tensor(std::vector<int64_t>(ids.begin(), ids.end()), torch::kLong).unsqueeze(0);
}

TEST(ClipText, ConfigFromJson) {
  const auto c = ClipTextConfig::from_json(text_encoder_config());
  EXPECT_EQ(c.hidden_size, 32);
  EXPECT_EQ(c.num_hidden_layers, 3);
  EXPECT_EQ(c.hidden_act, "quick_gelu");
  for (const char* key : {"hidden_size", "num_hidden_layers", "layer_norm_eps", "hidden_act"}) {
    auto j = text_encoder_config();
    j.erase(key);
    try {
      ClipTextConfig::from_json(j);
      FAIL() << "expected a ModelError for a config without " << key;
    } catch (const ModelError& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  }
  auto bad_act = text_encoder_config();
  bad_act["hidden_act"] = "relu";
  EXPECT_THROW(ClipTextConfig::from_json(bad_act), ModelError);
}

TEST(ClipText, MatchesReferenceEmbeddings) {
  const auto tok = ClipTokenizer::load(test::model_dir() + "/tokenizer/vocab.json",
                                       test::model_dir() + "/tokenizer/merges.txt");
  std::ifstream in(test::fixture("tiny-sd15-cases.json"));
  const auto cases = nlohmann::json::parse(in).at("cases");
  torch::NoGradGuard no_grad;
  int compared = 0;
  for (const auto& c : cases) {
    if (c.at("kind") != "text_embeds") continue;
    const std::string name = c.at("name");
    const int skip = c.at("clip_skip").is_null() ? 0 : c.at("clip_skip").get<int>();
    const auto got = model()->forward(ids_tensor(tok.encode(c.at("prompt"))), skip);
    const auto want = test::ref(name);
    ASSERT_EQ(got.sizes(), want.sizes()) << name;
    const double err = test::max_abs_diff(got, want);
    EXPECT_LE(err, kTolerance) << name;
    RecordProperty("max_abs_err_" + name, std::to_string(err));
    ++compared;
  }
  EXPECT_EQ(compared, 16);
}

TEST(ClipText, BatchesRowsIndependently) {
  torch::NoGradGuard no_grad;
  const auto ids =
      torch::stack({test::ref("tokens_0")[0], test::ref("tokens_4")[0]}).to(torch::kLong);
  const auto got = model()->forward(ids, 1);
  EXPECT_LE(test::max_abs_diff(got[0], test::ref("embeds_skip1_0")[0]), kTolerance);
  EXPECT_LE(test::max_abs_diff(got[1], test::ref("embeds_skip1_4")[0]), kTolerance);
}

TEST(ClipText, RefusesBadRequests) {
  torch::NoGradGuard no_grad;
  const auto ids = test::ref("tokens_0").to(torch::kLong);
  EXPECT_THROW(model()->forward(ids, -1), RequestError);
  EXPECT_THROW(model()->forward(ids, 4), RequestError);
  EXPECT_NO_THROW(model()->forward(ids, 3));  // the embeddings, through the final layer norm
  EXPECT_THROW(model()->forward(torch::zeros({1, 78}, torch::kLong)), RequestError);
  EXPECT_THROW(model()->forward(torch::full({1, 77}, 49408, torch::kLong)), RequestError);
}

TEST(ClipText, FusedAttentionMatchesReferenceCausal) {
  torch::manual_seed(0);
  const auto q = torch::randn({2, 4, 77, 8});
  const auto k = torch::randn({2, 4, 77, 8});
  const auto v = torch::randn({2, 4, 77, 8});
  const auto out = attention(q, k, v, true);
  // Against the definition, row by row and independent of attention_reference() (which is what
  // attention() itself runs on torch 1.13): query i attends to keys 0..i, softmax-weighted by
  // q.k / sqrt(d). Float32 sums of 77 terms: 1e-5 is ~100x their rounding.
  double worst = 0;
  for (int64_t i : {0, 1, 17, 76}) {
    const auto qi = q.select(2, i).unsqueeze(2);          // [2, 4, 1, 8]
    const auto keys = k.narrow(2, 0, i + 1);              // [2, 4, i+1, 8]
    const auto w = (qi * keys).sum(-1) / std::sqrt(8.0);  // [2, 4, i+1]
    const auto p = torch::exp(w - std::get<0>(w.max(-1, true)));
    const auto want = ((p / p.sum(-1, true)).unsqueeze(-1) * v.narrow(2, 0, i + 1)).sum(2);
    worst = std::max(worst, test::max_abs_diff(out.select(2, i), want));
  }
  EXPECT_LE(worst, 1e-5);
  // The first query sees only the first key.
  EXPECT_LE(test::max_abs_diff(out.select(2, 0), v.select(2, 0)), 1e-6);
}

}  // namespace
}  // namespace sdserve::pipeline
