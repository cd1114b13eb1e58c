// Samplers against diffusers: timesteps of every reference run, and the first steps of every
// sampler against the reference step latents. Without a UNet, the model outputs are recovered
// from one sampler's reference latents and fed to another sampler that evaluated the model at
// the same input (same sample, same timestep), whose reference latents must then follow.
#include "pipeline/samplers/sampler.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "pipeline/errors.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

struct FixtureSampler {
  std::string name;
  SigmaSchedule schedule;
};

// The fixtures' scheduler names in our names.
FixtureSampler fixture_sampler(const std::string& scheduler) {
  if (scheduler == "euler_a") return {"euler_ancestral", SigmaSchedule::kNormal};
  if (scheduler == "dpmpp_2m_karras") return {"dpmpp_2m", SigmaSchedule::kKarras};
  if (scheduler == "unipc") return {"uni_pc", SigmaSchedule::kNormal};
  return {scheduler, SigmaSchedule::kNormal};
}

const nlohmann::json& cases() {
  static const nlohmann::json json = [] {
    std::ifstream in(test::fixture("tiny-sd15-cases.json"));
    return nlohmann::json::parse(in);
  }();
  return json;
}

SchedulerConfig tiny_config() {
  std::ifstream in(test::model_dir() + "/scheduler/scheduler_config.json");
  return SchedulerConfig::from_json(nlohmann::json::parse(in));
}

const nlohmann::json& run_case(const std::string& name) {
  for (const auto& c : cases()["cases"]) {
    if (c["name"] == name) return c;
  }
  throw std::runtime_error("no fixture case " + name);
}

TEST(SamplerTest, TimestepsMatchReference) {
  const auto config = tiny_config();
  int checked = 0;
  for (const auto& c : cases()["cases"]) {
    if (c["kind"] != "scheduler_timesteps") continue;
    const std::string name = c["name"];
    const auto choice = fixture_sampler(c["scheduler"]);
    const auto sampler = make_sampler(choice.name, choice.schedule, c["steps"].get<int>(), config);
    const auto want = test::ref(name).to(torch::kFloat64).contiguous();
    ASSERT_EQ(sampler->num_evals(), want.numel()) << name;
    const double* w = want.data_ptr<double>();
    const bool integral = choice.name == "pndm" || choice.name == "ddim" ||
                          choice.name == "dpmpp_2m" || choice.name == "uni_pc";
    for (int i = 0; i < sampler->num_evals(); ++i) {
      if (integral) {
        EXPECT_EQ(sampler->timesteps()[i], w[i]) << name << " [" << i << "]";
      } else {
        EXPECT_NEAR(sampler->timesteps()[i], w[i], 1e-4) << name << " [" << i << "]";
      }
    }
    ++checked;
  }
  EXPECT_EQ(checked, 27);
}

TEST(SamplerTest, RejectsBadRequestsWithHelpfulMessages) {
  const SchedulerConfig config;
  try {
    make_sampler("dpm_fast", SigmaSchedule::kNormal, 20, config);
    FAIL() << "unknown sampler accepted";
  } catch (const RequestError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("dpm_fast"), std::string::npos) << msg;
    for (const auto& n : sampler_names()) EXPECT_NE(msg.find(n), std::string::npos) << msg;
  }
  for (const char* name : {"ddim", "pndm"}) {
    try {
      make_sampler(name, SigmaSchedule::kKarras, 20, config);
      FAIL() << "karras accepted for " << name;
    } catch (const RequestError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(name), std::string::npos) << msg;
      EXPECT_NE(msg.find("karras"), std::string::npos) << msg;
      for (const char* ok : {"euler", "euler_ancestral", "dpmpp_2m", "lms", "heun", "uni_pc"}) {
        EXPECT_NE(msg.find(ok), std::string::npos) << msg;
      }
    }
  }
  for (int steps : {0, -3, 1001}) {
    try {
      make_sampler("euler", SigmaSchedule::kNormal, steps, config);
      FAIL() << "steps " << steps << " accepted";
    } catch (const RequestError& e) {
      EXPECT_NE(std::string(e.what()).find("steps"), std::string::npos) << e.what();
    }
  }
}

TEST(SamplerTest, ConfigFromJson) {
  const auto defaults = SchedulerConfig::from_json(nlohmann::json::object());
  EXPECT_EQ(defaults.num_train_timesteps, 1000);
  EXPECT_EQ(defaults.beta_schedule, "scaled_linear");
  EXPECT_EQ(defaults.steps_offset, 1);
  EXPECT_FALSE(defaults.set_alpha_to_one);
  EXPECT_EQ(defaults.prediction_type, "epsilon");
  EXPECT_TRUE(defaults.timestep_spacing.empty());
  const auto v = SchedulerConfig::from_json({{"prediction_type", "v_prediction"}});
  EXPECT_EQ(v.prediction_type, "v_prediction");
  EXPECT_THROW(SchedulerConfig::from_json({{"prediction_type", "sample"}}), ModelError);
  EXPECT_THROW(SchedulerConfig::from_json({{"beta_schedule", "squaredcos_cap_v2"}}), ModelError);
  EXPECT_THROW(SchedulerConfig::from_json({{"steps_offset", "one"}}), ModelError);
}

// --- Step math against the reference step latents ---------------------------------------------

at::Generator cpu_generator(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

// One image of a reference run: its seed and its reference latents after each evaluation.
struct ImageRun {
  int steps;
  uint64_t seed;
  torch::Tensor latents;  // (evals, 1, 4, h, w)
};

std::vector<ImageRun> image_runs(const std::string& scheduler, int k) {
  const auto c = run_case("run_" + scheduler + "_" + std::to_string(k) + "_image");
  const auto latents = test::ref("run_" + scheduler + "_" + std::to_string(k) + "_latents");
  std::vector<ImageRun> out;
  int b = 0;
  for (const auto& seed : c["per_image_seeds"]) {
    out.push_back(
        {c["steps"].get<int>(), seed.get<uint64_t>(), latents.select(1, b++).unsqueeze(1)});
  }
  return out;
}

// Runs `sampler` from the image's initial noise with the given model outputs and returns the
// sample after the last one. The image's generator draws the initial noise first, as the
// reference does, then serves the ancestral samplers.
torch::Tensor replay(const std::string& name, const ImageRun& run,
                     const std::vector<torch::Tensor>& outputs) {
  const auto sampler = make_sampler(name, SigmaSchedule::kNormal, run.steps, tiny_config());
  auto generator = cpu_generator(run.seed);
  torch::Tensor x = torch::randn({1, 4, 8, 8}, generator) * sampler->init_noise_sigma();
  for (size_t i = 0; i < outputs.size(); ++i) {
    sampler->scale_model_input(x, static_cast<int>(i));
    x = sampler->step(outputs[i], static_cast<int>(i), x, generator);
  }
  return x;
}

// The model output at evaluation outputs.size() that takes `name` to `want`: every step is affine
// in the model output, element by element.
torch::Tensor recover_output(const std::string& name, const ImageRun& run,
                             std::vector<torch::Tensor> outputs, const torch::Tensor& want) {
  outputs.push_back(torch::zeros_like(want));
  const auto at_zero = replay(name, run, outputs);
  outputs.back() = torch::ones_like(want);
  const auto at_one = replay(name, run, outputs);
  return (want - at_zero) / (at_one - at_zero);
}

constexpr double kStepTolerance = 2e-5;  // relative to the latents' max magnitude

// `source` and `target` evaluate the model at the same inputs for evaluations 0..shared-1:
// the outputs recovered from source's reference latents must reproduce target's.
void expect_shared_evaluations(const std::string& source, const std::string& target, int shared) {
  const auto name_of = [](const std::string& s) { return fixture_sampler(s).name; };
  for (int k = 0; k < 3; ++k) {
    const auto src_runs = image_runs(source, k);
    const auto dst_runs = image_runs(target, k);
    for (size_t b = 0; b < src_runs.size(); ++b) {
      std::vector<torch::Tensor> outputs;
      for (int i = 0; i < shared; ++i) {
        outputs.push_back(
            recover_output(name_of(source), src_runs[b], outputs, src_runs[b].latents[i]));
        const auto got = replay(name_of(target), dst_runs[b], outputs);
        EXPECT_LT(test::rel_diff(got, dst_runs[b].latents[i]), kStepTolerance)
            << target << " run " << k << " image " << b << " evaluation " << i << " (outputs from "
            << source << ")";
      }
    }
  }
}

// Both start from the same noise at the same first timestep, with scale 1, and DDIM's step is
// PLMS's first; PLMS then evaluates DDIM's second input again for its warm-up.
TEST(SamplerTest, PndmFollowsDdimModelOutputs) {
  expect_shared_evaluations("ddim", "pndm", 2);
}
TEST(SamplerTest, DdimFollowsPndmFirstOutput) {
  expect_shared_evaluations("pndm", "ddim", 1);
}

// Euler, Heun and LMS share the first two model inputs (Heun's and LMS's first step is Euler's).
TEST(SamplerTest, HeunFollowsEulerModelOutputs) {
  expect_shared_evaluations("euler", "heun", 2);
}
TEST(SamplerTest, LmsFollowsEulerModelOutputs) {
  expect_shared_evaluations("euler", "lms", 2);
}
TEST(SamplerTest, EulerAncestralFollowsEulerFirstOutput) {
  expect_shared_evaluations("euler", "euler_a", 1);
}

// DPM-Solver++ and UniPC take the same first-order first step, so share two model inputs.
TEST(SamplerTest, UniPcFollowsDpmSolverModelOutputs) {
  expect_shared_evaluations("dpmpp_2m", "unipc", 2);
}
TEST(SamplerTest, DpmSolverFollowsUniPcModelOutputs) {
  expect_shared_evaluations("unipc", "dpmpp_2m", 2);
}

// --- Per-image state --------------------------------------------------------------------------

// A deterministic stand-in for the UNet.
torch::Tensor fake_model(const torch::Tensor& input, double timestep) {
  return torch::tanh(0.7 * input) + 0.3 * std::sin(timestep / 97.0);
}

std::vector<torch::Tensor> run_alone(const std::string& name, SigmaSchedule schedule, int steps,
                                     uint64_t seed) {
  const auto sampler = make_sampler(name, schedule, steps, SchedulerConfig());
  auto generator = cpu_generator(seed);
  torch::Tensor x = torch::randn({1, 4, 8, 8}, generator) * sampler->init_noise_sigma();
  std::vector<torch::Tensor> out;
  for (int i = 0; i < sampler->num_evals(); ++i) {
    const auto in = sampler->scale_model_input(x, i);
    x = sampler->step(fake_model(in, sampler->timesteps()[i]), i, x, generator);
    out.push_back(x);
  }
  return out;
}

TEST(SamplerTest, SamplersHoldOnlyTheirOwnImageState) {
  for (const auto& name : sampler_names()) {
    for (auto schedule : {SigmaSchedule::kNormal, SigmaSchedule::kKarras}) {
      if (schedule == SigmaSchedule::kKarras && !sampler_accepts_karras(name)) continue;
      const int steps = 7;
      const auto alone = run_alone(name, schedule, steps, 5);
      // Two samplers of the same kind, interleaved step by step, with identical inputs.
      const auto a = make_sampler(name, schedule, steps, SchedulerConfig());
      const auto b = make_sampler(name, schedule, steps, SchedulerConfig());
      auto gen_a = cpu_generator(5);
      auto gen_b = cpu_generator(5);
      torch::Tensor xa = torch::randn({1, 4, 8, 8}, gen_a) * a->init_noise_sigma();
      torch::Tensor xb = torch::randn({1, 4, 8, 8}, gen_b) * b->init_noise_sigma();
      ASSERT_EQ(a->num_evals(), static_cast<int>(alone.size()));
      for (int i = 0; i < a->num_evals(); ++i) {
        const auto in_a = a->scale_model_input(xa, i);
        const auto in_b = b->scale_model_input(xb, i);
        xa = a->step(fake_model(in_a, a->timesteps()[i]), i, xa, gen_a);
        xb = b->step(fake_model(in_b, b->timesteps()[i]), i, xb, gen_b);
        ASSERT_TRUE(torch::equal(xa, alone[i])) << name << " evaluation " << i;
        ASSERT_TRUE(torch::equal(xb, alone[i])) << name << " evaluation " << i;
      }
      EXPECT_TRUE(torch::isfinite(xa).all().item<bool>()) << name;
    }
  }
}

TEST(SamplerTest, StepsMustComeInOrder) {
  const auto sampler = make_sampler("dpmpp_2m", SigmaSchedule::kNormal, 4, SchedulerConfig());
  auto generator = cpu_generator(1);
  const auto x = torch::randn({1, 4, 8, 8}, generator);
  EXPECT_THROW(sampler->step(x, 1, x, generator), std::logic_error);
  sampler->step(x, 0, x, generator);
  EXPECT_THROW(sampler->step(x, 0, x, generator), std::logic_error);
}

TEST(SamplerTest, VPredictionRunsEverySampler) {
  SchedulerConfig config;
  config.prediction_type = "v_prediction";
  for (const auto& name : sampler_names()) {
    const auto sampler = make_sampler(name, SigmaSchedule::kNormal, 5, config);
    auto generator = cpu_generator(3);
    torch::Tensor x = torch::randn({1, 4, 8, 8}, generator) * sampler->init_noise_sigma();
    for (int i = 0; i < sampler->num_evals(); ++i) {
      const auto in = sampler->scale_model_input(x, i);
      x = sampler->step(fake_model(in, sampler->timesteps()[i]), i, x, generator);
    }
    EXPECT_TRUE(torch::isfinite(x).all().item<bool>()) << name;
  }
}

}  // namespace
}  // namespace sdserve::pipeline
