// AutoencoderKL parity with diffusers on the tiny SD 1.x model, and its config parsing.
#include "pipeline/nn/vae.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <fstream>
#include <iomanip>
#include <set>
#include <sstream>

#include "pipeline/errors.h"
#include "pipeline/io/safetensors.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

constexpr double kVaeTolerance = 1e-4;

nlohmann::json vae_json() {
  return test::model_files().vae_config;
}

WeightSource vae_weights() {
  return test::model_files().vae;
}

Vae& tiny_vae() {
  static Vae vae = [] {
    Vae v(VaeConfig::from_json(vae_json()));
    load_weights(*v, vae_weights(), torch::kFloat32, torch::kCPU);
    v->eval();
    return v;
  }();
  return vae;
}

// vae_decode_out is diffusers' raw `vae.decode(latent).sample` (values outside [0, 1], about
// [-3.8, 2.9] with these random weights): no scaling-factor division, no clamp, no [0, 1] map.
TEST(Vae, DecodeMatchesDiffusers) {
  torch::NoGradGuard no_grad;
  auto out = tiny_vae()->decode(test::ref("vae_decode_in"));
  const auto want = test::ref("vae_decode_out");
  ASSERT_EQ(out.sizes(), want.sizes());
  const double err = test::max_abs_diff(out, want);
  std::ostringstream shown;
  shown << std::scientific << std::setprecision(2) << err;
  ::testing::Test::RecordProperty("max_abs_error", shown.str());
  EXPECT_LE(err, kVaeTolerance);
}

TEST(Vae, EncodeMeanMatchesDiffusers) {
  torch::NoGradGuard no_grad;
  auto out = tiny_vae()->encode_mean(test::ref("vae_encode_in"));
  const auto want = test::ref("vae_encode_mean");
  ASSERT_EQ(out.sizes(), want.sizes());
  const double err = test::max_abs_diff(out, want);
  std::ostringstream shown;
  shown << std::scientific << std::setprecision(2) << err;
  ::testing::Test::RecordProperty("max_abs_error", shown.str());
  EXPECT_LE(err, kVaeTolerance);
}

TEST(Vae, RegistersExactlyTheCheckpointTensors) {
  std::set<std::string> registered, stored;
  for (const auto& p : tiny_vae()->named_parameters()) registered.insert(p.key());
  EXPECT_TRUE(tiny_vae()->named_buffers().is_empty());
  for (const auto& entry : vae_weights().tensors) stored.insert(entry.first);
  EXPECT_EQ(registered, stored);
}

TEST(VaeConfig, ReadsTheTinyConfig) {
  const auto c = VaeConfig::from_json(vae_json());
  EXPECT_EQ(c.block_out_channels, (std::vector<int64_t>{32, 32, 64, 64}));
  EXPECT_EQ(c.latent_channels, 4);
  EXPECT_DOUBLE_EQ(c.scaling_factor, 0.18215);
  EXPECT_DOUBLE_EQ(c.shift_factor, 0.0);
  EXPECT_TRUE(c.force_upcast);
}

TEST(VaeConfig, RefusesUnsupportedValuesNamingTheKey) {
  auto expect_refused = [](const std::string& key, const nlohmann::json& value) {
    auto j = vae_json();
    j[key] = value;
    try {
      VaeConfig::from_json(j);
      ADD_FAILURE() << key << " = " << value.dump() << " was accepted";
    } catch (const ModelError& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  };
  expect_refused("up_block_types",
                 nlohmann::json::array({"UpDecoderBlock2D", "AttnUpDecoderBlock2D",
                                        "UpDecoderBlock2D", "UpDecoderBlock2D"}));
  expect_refused("act_fn", "gelu");
  expect_refused("latents_mean", nlohmann::json::array({0.1, 0.2, 0.3, 0.4}));
  expect_refused("scaling_factor", "large");
}

}  // namespace
}  // namespace sdserve::pipeline
