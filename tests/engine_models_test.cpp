// Several checkpoints in one engine (engine/model_set.h), on the CPU with the real tiny models:
// each job runs on its own model with the pixels a one-model engine gives, models load on first
// use and are evicted least recently used within model_memory_bytes, a job for model B is not
// starved by a stream for model A, and a model that cannot load fails only its own jobs.
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <thread>

#include "cache/embedding_cache.h"
#include "engine/engine.h"
#include "engine/model_runner.h"
#include "pipeline/errors.h"
#include "pipeline/image.h"
#include "test_util.h"

namespace sdserve::engine_models_test {
namespace {

using namespace std::chrono_literals;
using engine::Engine;
using engine::EngineOptions;
using engine::JobRequest;
using engine::JobStatus;

const pipeline::LoadOptions kCpu{"cpu", "fp32", "", ""};

// The models by name, as a models folder would hold them.
std::map<std::string, std::string> paths() {
  return {{"sd15", test::model_dir()},
          {"sd15-single", test::single_file()},
          {"sdxl", test::fixture("tiny-sdxl")},
          {"broken", test::fixture("README.md")}};
}

EngineOptions multi_model_options(std::atomic<int>* loads = nullptr) {
  EngineOptions o;
  o.default_model = "sd15";
  o.load_model = [loads](const std::string& name, const std::string& device) {
    if (loads) ++*loads;
    auto options = kCpu;
    options.device = device;
    return engine::pipeline_runner(pipeline::Model::load(paths().at(name), options));
  };
  o.describe_model = [](const std::string& name) {
    const auto p = paths();
    if (!p.count(name)) throw pipeline::RequestError("model", "no model named " + name);
    if (name == "broken") return pipeline::ModelInfo{};
    return pipeline::inspect_model(p.at(name), kCpu);
  };
  return o;
}

std::unique_ptr<Engine> start(EngineOptions o, const std::string& default_path) {
  auto engine = Engine::create(o, {pipeline::Model::load(default_path, kCpu)},
                               std::make_shared<cache::PassThroughCache>());
  for (int i = 0; i < 600 && !engine->ready(); ++i) std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(engine->ready());
  return engine;
}

JobRequest request(const std::string& model, uint64_t seed, int steps = 3) {
  JobRequest r;
  r.model = model;
  r.prompt = "a red cube";
  r.width = r.height = 64;
  r.steps = steps;
  r.seed = seed;
  return r;
}

JobStatus wait_final(Engine& engine, const std::string& id, std::chrono::seconds timeout = 120s) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    const auto snap = engine.get(id);
    if (snap && engine::is_final(snap->status)) return snap->status;
    std::this_thread::sleep_for(10ms);
  }
  return JobStatus::kRunning;
}

std::vector<uint8_t> pixels(Engine& engine, const std::string& id) {
  const auto img = engine.image(id, 0);
  EXPECT_EQ(img.status, engine::ImageLookup::kOk);
  return img.png ? pipeline::decode_png(*img.png).pixels : std::vector<uint8_t>{};
}

TEST(EngineModels, EachJobRunsOnItsModelWithTheSamePixelsAsAOneModelEngine) {
  std::map<std::string, std::vector<uint8_t>> alone;
  for (const std::string name : {"sd15", "sdxl"}) {
    auto engine = start({}, paths().at(name));
    const auto snap = engine->submit(request("", 11));
    ASSERT_EQ(wait_final(*engine, snap.id), JobStatus::kSucceeded);
    alone[name] = pixels(*engine, snap.id);
  }
  ASSERT_NE(alone["sd15"], alone["sdxl"]);
  std::atomic<int> loads{0};
  auto engine = start(multi_model_options(&loads), paths().at("sd15"));
  // One at a time: exactly the pixels of the one-model engine.
  for (const std::string name : {"sdxl", "sd15"}) {
    const auto id = engine->submit(request(name, 11)).id;
    ASSERT_EQ(wait_final(*engine, id), JobStatus::kSucceeded) << engine->get(id)->error;
    EXPECT_EQ(pixels(*engine, id), alone[name]) << name;
  }
  // Alternating, all queued at once: the two models' images take turns on the worker, each
  // model's in UNet calls of its own. Within one level of 255: the CPU's matrix products round
  // differently at other batch sizes (rows of the same model batch together here).
  std::vector<std::pair<std::string, std::string>> jobs;
  for (int i = 0; i < 3; ++i)
    for (const std::string name : {"sdxl", "sd15"})
      jobs.emplace_back(name, engine->submit(request(name, 11)).id);
  for (const auto& [name, id] : jobs) {
    ASSERT_EQ(wait_final(*engine, id), JobStatus::kSucceeded) << engine->get(id)->error;
    const auto got = pixels(*engine, id);
    ASSERT_EQ(got.size(), alone[name].size());
    int worst = 0;
    for (size_t i = 0; i < got.size(); ++i)
      worst = std::max(worst, std::abs(int(got[i]) - int(alone[name][i])));
    EXPECT_LE(worst, 1) << name;
  }
  EXPECT_EQ(loads.load(), 1);  // sdxl, once; sd15 is the default, loaded at start
  const auto stats = engine->stats();
  EXPECT_EQ(stats.models.loads, 1u);
  EXPECT_EQ(stats.models.evictions, 0u);
  EXPECT_EQ(engine->loaded_models().size(), 2u);
  // The PNG names the job's model.
  std::vector<std::pair<std::string, std::string>> text;
  pipeline::decode_png(*engine->image(jobs[0].second, 0).png, &text);
  ASSERT_FALSE(text.empty());
  EXPECT_NE(text[0].second.find("Model: tiny-sdxl"), std::string::npos) << text[0].second;
}

TEST(EngineModels, ModelsBeyondTheMemoryBoundAreEvictedLeastRecentlyUsedFirst) {
  auto o = multi_model_options();
  const uint64_t sd15 = pipeline::inspect_model(paths().at("sd15"), kCpu).weight_bytes;
  const uint64_t sdxl = pipeline::inspect_model(paths().at("sdxl"), kCpu).weight_bytes;
  // Room for the default and one other: each switch between the others evicts.
  o.model_memory_bytes = sd15 + std::max(sd15, sdxl) + 1;
  auto engine = start(o, paths().at("sd15"));
  for (const std::string name : {"sdxl", "sd15-single", "sdxl", "sd15"}) {
    const auto snap = engine->submit(request(name, 5));
    ASSERT_EQ(wait_final(*engine, snap.id), JobStatus::kSucceeded) << engine->get(snap.id)->error;
    uint64_t held = 0;
    for (const auto& m : engine->loaded_models()) held += m.bytes;
    EXPECT_LE(held, o.model_memory_bytes) << name;
  }
  const auto stats = engine->stats();
  EXPECT_EQ(stats.models.loads, 3u);      // sdxl, sd15-single, sdxl again
  EXPECT_EQ(stats.models.evictions, 2u);  // sdxl, then sd15-single
  EXPECT_GT(stats.models.load_seconds, 0.0);
  // A model that cannot fit beside the default fails its job with the reason, at once.
  o.model_memory_bytes = sd15 + 1;
  auto small = start(o, paths().at("sd15"));
  const auto snap = small->submit(request("sdxl", 5));
  ASSERT_EQ(wait_final(*small, snap.id), JobStatus::kFailed);
  EXPECT_NE(small->get(snap.id)->error.find("model_memory_mb"), std::string::npos)
      << small->get(snap.id)->error;
}

TEST(EngineModels, AJobForModelBIsNotStarvedByAStreamForModelA) {
  EngineOptions o = multi_model_options();
  o.max_batch = 2;
  auto engine = start(o, paths().at("sd15"));
  // A stream of A (the default) keeps the worker full; B is queued in the middle of it.
  std::vector<std::string> before, after;
  for (int i = 0; i < 4; ++i) before.push_back(engine->submit(request("", 100 + i, 8)).id);
  const auto b = engine->submit(request("sdxl", 1, 8)).id;
  for (int i = 0; i < 8; ++i) after.push_back(engine->submit(request("", 200 + i, 8)).id);
  ASSERT_EQ(wait_final(*engine, b), JobStatus::kSucceeded) << engine->get(b)->error;
  // B ran while its load and its steps took turns with A: it ended before the A jobs queued
  // after it had all finished.
  int after_done = 0;
  for (const auto& id : after)
    if (engine::is_final(engine->get(id)->status)) ++after_done;
  EXPECT_LT(after_done, static_cast<int>(after.size()));
  for (const auto& id : after) ASSERT_EQ(wait_final(*engine, id), JobStatus::kSucceeded);
}

TEST(EngineModels, AModelThatCannotLoadFailsOnlyItsOwnJobs) {
  auto engine = start(multi_model_options(), paths().at("sd15"));
  const auto bad = engine->submit(request("broken", 1)).id;
  const auto good = engine->submit(request("", 1)).id;
  ASSERT_EQ(wait_final(*engine, bad), JobStatus::kFailed);
  EXPECT_NE(engine->get(bad)->error.find("could not be loaded"), std::string::npos)
      << engine->get(bad)->error;
  EXPECT_EQ(wait_final(*engine, good), JobStatus::kSucceeded);
  EXPECT_EQ(engine->stats().models.load_failures, 1u);
  // A model the service does not have is refused at submission, naming the field.
  try {
    engine->submit(request("nope", 1));
    FAIL() << "submitted";
  } catch (const pipeline::RequestError& e) {
    EXPECT_EQ(e.field(), "model");
  }
}

}  // namespace
}  // namespace sdserve::engine_models_test
