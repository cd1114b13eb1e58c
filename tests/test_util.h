// Shared helpers for the test suite: fixture paths and reference-tensor comparison.
#pragma once

#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "pipeline/image.h"
#include "pipeline/io/model_files.h"
#include "pipeline/io/tensor_io.h"
#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"

// GPU tests skip cleanly where there is no CUDA device (CI).
#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

namespace sdserve::test {

// tests/fixtures/REL, else the fixture built from them at build time (the single files, in
// SDSERVE_BUILT_FIXTURES; tests/fixtures/make/README.md).
inline std::string fixture(const std::string& rel) {
  const std::string own = std::string(SDSERVE_FIXTURES) + "/" + rel;
  if (std::filesystem::exists(own)) return own;
  return std::string(SDSERVE_BUILT_FIXTURES) + "/" + rel;
}
inline std::string model_dir() {
  return std::string(SDSERVE_MODELS) + "/tiny-sd15";
}
// The fixture folder as the loader presents it: configs and per-module weight sources.
inline const pipeline::ModelFiles& model_files() {
  static const auto files = pipeline::open_model_files(model_dir(), model_dir() + "/tokenizer");
  return files;
}
inline std::string single_file() {
  return fixture("tiny-sd15.safetensors");
}

// The 118 diffusers reference tensors, loaded once per test binary.
inline const std::map<std::string, torch::Tensor>& reference() {
  static const auto ref = pipeline::load_all(fixture("tiny-sd15-reference.safetensors"));
  return ref;
}
inline const torch::Tensor& ref(const std::string& name) {
  return reference().at(name);
}

// A PNG of tests/fixtures (or of the built fixtures), decoded.
inline pipeline::RgbImage fixture_png(const std::string& name) {
  std::ifstream in(fixture(name), std::ios::binary);
  return pipeline::decode_png(
      {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()});
}

// One diffusers run recorded in tests/fixtures/tiny-FAMILY-SET-cases.json: its family, the
// cases' name without the suffix of the tensor that marks it, and what made it.
struct DiffusersRun {
  std::string family;
  std::string name;
  nlohmann::json info;
};
inline void PrintTo(const DiffusersRun& run, std::ostream* os) {
  *os << run.family << " " << run.name;
}
// The runs of SET ("img2img", "inpaint", "hires") for each family, one per case of `kind`
// (whose name ends in `suffix`). Read at test registration: a missing or broken file leaves no
// runs (each suite's count test reports it) instead of aborting every test in the binary.
inline std::vector<DiffusersRun> diffusers_runs(const std::string& set,
                                                std::initializer_list<const char*> families,
                                                const std::string& kind,
                                                const std::string& suffix) {
  std::vector<DiffusersRun> out;
  for (const std::string family : families) {
    std::ifstream in(fixture("tiny-" + family + "-" + set + "-cases.json"));
    const auto cases = nlohmann::json::parse(in, nullptr, false);
    if (cases.is_discarded() || !cases.contains("cases")) continue;
    for (const auto& c : cases["cases"])
      if (c["kind"] == kind) {
        const std::string name = c["name"];
        out.push_back({family, name.substr(0, name.size() - suffix.size()), c});
      }
  }
  return out;
}

// Another family's fixture ("tiny-sd2", "tiny-sdxl"): its folder, reference tensors and cases.
inline std::string family_dir(const std::string& family) {
  return fixture(family);
}
inline const torch::Tensor& family_ref(const std::string& family, const std::string& name) {
  static std::map<std::string, std::map<std::string, torch::Tensor>> loaded;
  auto it = loaded.find(family);
  if (it == loaded.end())
    it = loaded.emplace(family, pipeline::load_all(fixture(family + "-reference.safetensors")))
             .first;
  return it->second.at(name);
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64).cpu() - b.to(torch::kFloat64).cpu()).abs().max().item<double>();
}
// Max abs difference over max abs of the reference: the end-to-end measure.
inline double rel_diff(const torch::Tensor& got, const torch::Tensor& want) {
  return max_abs_diff(got, want) / want.to(torch::kFloat64).abs().max().item<double>();
}

// The reference fixtures' scheduler names (diffusers' classes) as sampler + schedule.
inline pipeline::SamplerChoice fixture_choice(const std::string& scheduler) {
  if (scheduler == "euler_a") return {"euler_ancestral", "normal"};
  if (scheduler == "dpmpp_2m_karras") return {"dpmpp_2m", "karras"};
  if (scheduler == "unipc") return {"uni_pc", "normal"};
  return {scheduler, "normal"};
}

inline std::shared_ptr<pipeline::Model> load_cpu(const std::string& path) {
  pipeline::LoadOptions o;
  o.device = "cpu";
  o.precision = "fp32";
  return pipeline::Model::load(path, o);
}
// The same, loaded once per test binary and path.
inline const std::shared_ptr<pipeline::Model>& cpu_model(const std::string& path) {
  static std::map<std::string, std::shared_ptr<pipeline::Model>> loaded;
  auto& m = loaded[path];
  if (!m) m = load_cpu(path);
  return m;
}

// The model of a diffusers run's family ("sd15": the bundled one; else tests/fixtures/tiny-FAMILY).
inline std::string run_model_path(const std::string& family) {
  return family == "sd15" ? model_dir() : family_dir("tiny-" + family);
}
// Loaded on the CPU in float32, once per test binary.
inline const std::shared_ptr<pipeline::Model>& run_model(const std::string& family) {
  return cpu_model(run_model_path(family));
}
// Loaded on `device` in `precision` (the CUDA variants: freed with the test).
inline std::shared_ptr<pipeline::Model> load_run_model(const std::string& family,
                                                       const std::string& device,
                                                       const std::string& precision) {
  pipeline::LoadOptions o;
  o.device = device;
  o.precision = precision;
  return pipeline::Model::load(run_model_path(family), o);
}

// The settings every diffusers run records: size, steps, guidance and scheduler.
inline pipeline::ImageSpec run_spec(const nlohmann::json& c) {
  const auto choice = fixture_choice(c["scheduler"]);
  pipeline::ImageSpec spec;
  spec.width = c["w"];
  spec.height = c["h"];
  spec.steps = c["steps"];
  spec.guidance_scale = c["cfg"];
  spec.sampler = choice.sampler;
  spec.scheduler = choice.scheduler;
  return spec;
}

}  // namespace sdserve::test
