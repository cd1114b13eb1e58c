// The engine's failure paths, with a fake model behind ModelRunner that fails where a test says:
// a step, a decode, the text encoder, the image encoder, the warm-up. Each failure must end the
// affected job with a clear error, never run a failed job's other images, never end the process,
// and leave the engine serving the next job. The same fake times the scheduling: resolutions
// side by side, and the admission policy.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#include "cache/embedding_cache.h"
#include "engine/engine.h"
#include "engine/model_runner.h"
#include "pipeline/errors.h"

namespace sdserve::engine {
namespace {

using namespace std::chrono_literals;

class FakeRun : public ImageRun {
 public:
  explicit FakeRun(const pipeline::ImageSpec& spec)
      : pixels(static_cast<uint64_t>(spec.width) * spec.height),
        rows(spec.guidance_scale > 1 ? 2 : 1),
        size_(spec.width, spec.height),
        total_(spec.steps) {}
  int evals_done() const override { return done_; }
  int evals_total() const override { return total_; }
  std::pair<int, int> size() const override { return size_; }
  int done_ = 0;
  uint64_t pixels;  // for the fake's memory estimate (estimate_memory below)
  int rows;

 private:
  std::pair<int, int> size_;
  int total_;
};

// A model that denoises nothing: each step counts, each decode returns a grey image. The
// atomics say which call fails next (-1: none).
class FakeRunner : public ModelRunner {
 public:
  explicit FakeRunner(const std::string& device = "cpu") {
    info_.name = "fake";
    info_.device = device;
    info_.native_size = 64;
  }
  const pipeline::ModelInfo& info() const override { return info_; }
  int evals_total(const pipeline::ImageSpec& spec) const override { return spec.steps; }
  void warm_up(int) override {
    if (fail_warm_up) throw std::runtime_error("no device here");
  }
  // step_seconds[i] for batch 2^i (the default buckets), taking that long when sleep_timing;
  // without step_seconds every batch size takes as long: the biggest batch is best.
  double time_step(int size, int batch) override {
    timed.push_back({size, batch});
    int i = 0;
    while ((1 << (i + 1)) <= batch) ++i;
    const double s = step_seconds.empty() ? 0.001 : step_seconds.at(i);
    if (sleep_timing) std::this_thread::sleep_for(std::chrono::duration<double>(s));
    return s;
  }
  pipeline::EmbeddingPtr encode_text(const std::string& prompt, int) override {
    if (prompt == "unencodable") throw std::runtime_error("text encoder broke");
    if (prompt == "slow to encode") std::this_thread::sleep_for(std::chrono::milliseconds(800));
    return nullptr;
  }
  std::unique_ptr<ImageRun> begin(const pipeline::ImageSpec& spec, pipeline::EmbeddingPtr,
                                  pipeline::EmbeddingPtr) override {
    ++begins;
    return std::make_unique<FakeRun>(spec);
  }
  void step(const std::vector<ImageRun*>& batch) override {
    if (fail_steps > 0) {
      --fail_steps;
      throw std::runtime_error(
          "CUDA out of memory.\nException raised from malloc at alloc.cpp:1 (most recent call "
          "first):\nframe #0: 0x7f00deadbeef");
    }
    uint64_t bytes = 0;
    for (ImageRun* r : batch)
      bytes += static_cast<FakeRun*>(r)->pixels * static_cast<FakeRun*>(r)->rows;
    in_flight(&unet_bytes_now, bytes);
    if (step_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(step_ms.load()));
    in_flight(&unet_bytes_now, 0);
    largest_batch = std::max(largest_batch.load(), static_cast<int>(batch.size()));
    for (ImageRun* r : batch) ++static_cast<FakeRun*>(r)->done_;
  }
  std::vector<pipeline::RgbImage> decode(const std::vector<ImageRun*>& batch) override {
    if (fail_decodes > 0) {
      --fail_decodes;
      throw std::runtime_error("VAE broke");
    }
    uint64_t bytes = 0;
    for (ImageRun* r : batch) {
      bytes += static_cast<FakeRun*>(r)->pixels;
      // As on a GPU, which decodes a call's latents as one tensor.
      if (static_cast<FakeRun*>(r)->pixels != static_cast<FakeRun*>(batch.front())->pixels)
        throw std::runtime_error("latents of different sizes in one decode");
    }
    in_flight(&decode_bytes_now, bytes);
    if (decode_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(decode_ms.load()));
    in_flight(&decode_bytes_now, 0);
    largest_decode = std::max(largest_decode.load(), static_cast<int>(batch.size()));
    std::vector<pipeline::RgbImage> out;
    for (size_t i = 0; i < batch.size(); ++i) {
      pipeline::RgbImage img{8, 8, std::vector<uint8_t>(8 * 8 * 3, 128)};
      // A buffer that does not match its size makes the PNG encoder throw.
      if (bad_images > 0) {
        --bad_images;
        img.pixels.resize(5);
      }
      out.push_back(std::move(img));
    }
    return out;
  }
  pipeline::RgbImage preview(const ImageRun&, const PreviewOptions&) override {
    return {8, 8, std::vector<uint8_t>(8 * 8 * 3, 0)};
  }
  // A byte per pixel and row in the UNet call, a byte per pixel and image in the decode.
  pipeline::MemoryEstimate estimate_memory(int width, int height, int unet_rows,
                                           int decode_images) const override {
    pipeline::MemoryEstimate e;
    e.unet = e.unet_attention = static_cast<uint64_t>(width) * height * unet_rows;
    e.vae = static_cast<uint64_t>(width) * height * decode_images;
    return e;
  }
  uint64_t available_memory() const override { return free_memory; }
  void in_flight(uint64_t* now, uint64_t bytes) {
    std::lock_guard<std::mutex> lock(in_flight_mutex);
    *now = bytes;
    most_together = std::max(most_together, unet_bytes_now + decode_bytes_now);
  }
  uint64_t free_memory = 0;

  std::atomic<int> begins{0};
  std::atomic<int> fail_steps{0}, fail_decodes{0}, bad_images{0};
  std::atomic<bool> fail_warm_up{false};
  std::atomic<int> step_ms{0};  // how long a step takes
  std::atomic<int> largest_batch{0}, largest_decode{0};
  std::atomic<int> decode_ms{0};  // how long a decode takes
  // The estimate's bytes of the UNet call and the decode in flight, and the most of both at once.
  std::mutex in_flight_mutex;
  uint64_t unet_bytes_now = 0, decode_bytes_now = 0, most_together = 0;
  std::vector<double> step_seconds;  // what warm-up says a step takes per batch size
  bool sleep_timing = false;
  std::vector<std::pair<int, int>> timed;  // (size, batch) of each time_step() call

 private:
  pipeline::ModelInfo info_;
};

JobRequest request(const std::string& prompt, int images = 1) {
  JobRequest r;
  r.prompt = prompt;
  r.width = r.height = 64;
  r.steps = 3;
  r.seed = 1;
  r.num_images = images;
  return r;
}

std::unique_ptr<Engine> make_engine(std::shared_ptr<FakeRunner> fake, int max_batch = 2,
                                    double max_wait_s = 0.25, double warm_up_budget_s = 10) {
  EngineOptions o;
  o.max_batch = max_batch;
  o.light_load_max_wait_s = max_wait_s;
  o.warm_up_budget_s = warm_up_budget_s;
  return Engine::create(o, std::vector<std::shared_ptr<ModelRunner>>{fake},
                        std::make_shared<cache::PassThroughCache>());
}

void wait_warm(const Engine& e) {
  for (int i = 0; i < 500 && !e.warm_up_done(); ++i) std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(e.warm_up_done());
}

JobSnapshot wait_final(const Engine& e, const std::string& id) {
  for (int i = 0; i < 1000; ++i) {
    const auto job = e.get(id);
    if (job && is_final(job->status)) return *job;
    std::this_thread::sleep_for(10ms);
  }
  ADD_FAILURE() << "job " << id << " did not end";
  return {};
}

TEST(EngineFaults, FailedStepEndsTheJobAndItsOtherImagesNeverRun) {
  auto fake = std::make_shared<FakeRunner>();
  auto engine = make_engine(fake, 2);
  wait_warm(*engine);
  fake->begins = 0;  // the decoder's warm-up began one
  fake->fail_steps = 1;
  const auto job = engine->submit(request("four images", 4));
  const auto end = wait_final(*engine, job.id);
  EXPECT_EQ(end.status, JobStatus::kFailed);
  EXPECT_EQ(fake->begins.load(), 2);  // the two admitted images; the other two never start
  // No backtrace reaches the user.
  EXPECT_EQ(end.error, "generation failed: CUDA out of memory.");
  // The engine goes on serving.
  const auto next = engine->submit(request("next"));
  EXPECT_EQ(wait_final(*engine, next.id).status, JobStatus::kSucceeded);
}

TEST(EngineFaults, FailedDecodeFailsThatJobOnly) {
  auto fake = std::make_shared<FakeRunner>();
  auto engine = make_engine(fake);
  wait_warm(*engine);
  fake->fail_decodes = 1;
  const auto a = engine->submit(request("decoded badly"));
  const auto end = wait_final(*engine, a.id);
  EXPECT_EQ(end.status, JobStatus::kFailed);
  EXPECT_NE(end.error.find("decoding failed: VAE broke"), std::string::npos) << end.error;
  const auto b = engine->submit(request("decoded well"));
  EXPECT_EQ(wait_final(*engine, b.id).status, JobStatus::kSucceeded);
}

TEST(EngineFaults, TextEncoderFailureFailsThatJobOnly) {
  auto fake = std::make_shared<FakeRunner>();
  auto engine = make_engine(fake);
  wait_warm(*engine);
  const auto a = engine->submit(request("unencodable"));
  const auto b = engine->submit(request("fine"));
  const auto end = wait_final(*engine, a.id);
  EXPECT_EQ(end.status, JobStatus::kFailed);
  EXPECT_NE(end.error.find("text encoder broke"), std::string::npos) << end.error;
  EXPECT_EQ(wait_final(*engine, b.id).status, JobStatus::kSucceeded);
}

TEST(EngineFaults, ImageEncoderFailureFailsTheJobInsteadOfEndingTheProcess) {
  auto fake = std::make_shared<FakeRunner>();
  auto engine = make_engine(fake);
  wait_warm(*engine);
  fake->bad_images = 1;
  const auto a = engine->submit(request("unencodable pixels"));
  const auto end = wait_final(*engine, a.id);
  EXPECT_EQ(end.status, JobStatus::kFailed);
  EXPECT_NE(end.error.find("encoding the image failed"), std::string::npos) << end.error;
  const auto b = engine->submit(request("encodable"));
  EXPECT_EQ(wait_final(*engine, b.id).status, JobStatus::kSucceeded);
  EXPECT_EQ(engine->image(b.id, 0).status, ImageLookup::kOk);
}

TEST(EngineFaults, FailedWarmUpIsNotReadyAndRefusesJobs) {
  auto fake = std::make_shared<FakeRunner>();
  fake->fail_warm_up = true;
  auto engine = make_engine(fake);
  wait_warm(*engine);
  EXPECT_FALSE(engine->ready());
  EXPECT_NE(engine->warm_up_error().find("no device here"), std::string::npos);
  EXPECT_THROW(engine->submit(request("never")), Unavailable);
}

// The decoder thread warms up too (cuDNN plans are per thread); when it cannot decode, the
// worker is as broken as when the UNet cannot run.
TEST(EngineFaults, FailedDecoderWarmUpIsNotReady) {
  auto fake = std::make_shared<FakeRunner>();
  fake->fail_decodes = 1;
  auto engine = make_engine(fake);
  wait_warm(*engine);
  EXPECT_FALSE(engine->ready());
  EXPECT_NE(engine->warm_up_error().find("VAE broke"), std::string::npos)
      << engine->warm_up_error();
}

// Two devices, one of which cannot warm up: the service is ready on the other, says which device
// failed, and never gives the broken one a job.
TEST(EngineFaults, OneFailedWorkerOfTwoTakesNoJobs) {
  auto broken = std::make_shared<FakeRunner>("cuda:0");
  auto healthy = std::make_shared<FakeRunner>("cuda:1");
  broken->fail_warm_up = true;
  auto engine =
      Engine::create(EngineOptions{}, std::vector<std::shared_ptr<ModelRunner>>{broken, healthy},
                     std::make_shared<cache::PassThroughCache>());
  wait_warm(*engine);
  healthy->begins = 0;  // the decoder's warm-up began one
  EXPECT_TRUE(engine->ready());
  const auto workers = engine->workers();
  ASSERT_EQ(workers.size(), 2u);
  EXPECT_EQ(workers[0].device, "cuda:0");
  EXPECT_EQ(workers[0].state, "failed");
  EXPECT_NE(workers[0].error.find("no device here"), std::string::npos) << workers[0].error;
  EXPECT_EQ(workers[1].state, "ready");
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(engine->submit(request("job", 2)).id);
  for (const auto& id : ids) EXPECT_EQ(wait_final(*engine, id).status, JobStatus::kSucceeded);
  EXPECT_EQ(broken->begins.load(), 0);
  EXPECT_EQ(healthy->begins.load(), 12);
}

// One UNet call holds one resolution; a job of another size no longer waits for the running set
// to drain: the turns alternate, so a 3-step job finishes while a 150-step one still runs.
TEST(EngineFaults, ShortJobOfAnotherResolutionRunsBesideALongOne) {
  auto fake = std::make_shared<FakeRunner>();
  fake->step_ms = 5;
  auto engine = make_engine(fake, 4);
  wait_warm(*engine);
  JobRequest long_job = request("long");
  long_job.steps = 150;
  const auto a = engine->submit(long_job);
  for (int i = 0; i < 500 && engine->get(a.id)->status == JobStatus::kQueued; ++i)
    std::this_thread::sleep_for(2ms);
  JobRequest short_job = request("short");
  short_job.width = short_job.height = 96;
  const auto b = engine->submit(short_job);
  EXPECT_EQ(wait_final(*engine, b.id).status, JobStatus::kSucceeded);
  const auto long_now = engine->get(a.id);
  EXPECT_EQ(long_now->status, JobStatus::kRunning);
  EXPECT_LT(long_now->evaluations, 100);  // about 3-6 of its 150 turns have passed
  EXPECT_EQ(wait_final(*engine, a.id).status, JobStatus::kSucceeded);
}

TEST(EngineFaults, TextEncodingDoesNotStallTheImagesBeingDenoised) {
  // Encoding a new job's prompts (800 ms here) happens beside the denoising loop: the running
  // job keeps stepping (10 ms a step) meanwhile. Encoded on the worker thread, it would stall.
  auto fake = std::make_shared<FakeRunner>();
  fake->step_ms = 10;
  auto engine = make_engine(fake, 4);
  wait_warm(*engine);
  JobRequest long_job = request("long");
  long_job.steps = 150;
  const auto a = engine->submit(long_job);
  for (int i = 0; i < 500 && engine->get(a.id)->evaluations == 0; ++i)
    std::this_thread::sleep_for(2ms);
  const auto b = engine->submit(request("slow to encode"));
  std::this_thread::sleep_for(100ms);  // the text thread is encoding now
  const int before = engine->get(a.id)->evaluations;
  std::this_thread::sleep_for(400ms);
  const int after = engine->get(a.id)->evaluations;
  EXPECT_EQ(engine->get(b.id)->evaluations, 0);  // still encoding
  EXPECT_GE(after - before, 20) << "~40 steps of 10 ms fit in 400 ms";
  EXPECT_EQ(wait_final(*engine, b.id).status, JobStatus::kSucceeded);
  EXPECT_EQ(wait_final(*engine, a.id).status, JobStatus::kSucceeded);
}

void wait_running(const Engine& e, const std::string& id) {
  for (int i = 0; i < 500 && e.get(id)->status == JobStatus::kQueued; ++i)
    std::this_thread::sleep_for(2ms);
  ASSERT_EQ(e.get(id)->status, JobStatus::kRunning);
}

// Submits a one-image job of `steps` steps (10 ms each) and waits until it runs.
std::string run_long_job(Engine& engine, int steps) {
  JobRequest long_job = request("long");
  long_job.steps = steps;
  const auto id = engine.submit(long_job).id;
  wait_running(engine, id);
  return id;
}

// The admission policy (admission.h) through a worker. Warm-up says batches of 1, 2 and 4 take
// 1, 1.1 and 2.2 s: 2 and 4 give the same images/s, so under light load the worker batches
// at most 2 images.
std::shared_ptr<FakeRunner> model_best_at_two() {
  auto fake = std::make_shared<FakeRunner>();
  fake->step_seconds = {1.0, 1.1, 2.2};  // max_batch 4: the sizes are buckets 1, 2, 4
  fake->step_ms = 10;
  return fake;
}

TEST(EngineAdmission, LightLoadBatchesUpToTheEconomicalSize) {
  auto fake = model_best_at_two();
  auto engine = make_engine(fake, 4, 60);
  wait_warm(*engine);
  EXPECT_EQ(engine->workers().front().light_load_batch, 2);
  const auto a = run_long_job(*engine, 60);  // ~0.6 s
  const auto b = run_long_job(*engine, 60);
  // One image waits, under the light-load batch and for less than max_wait: it waits for a slot.
  const auto c = engine->submit(request("third"));
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(engine->get(c.id)->status, JobStatus::kQueued);
  EXPECT_EQ(engine->get(a)->status, JobStatus::kRunning);
  for (const auto& id : {a, b, c.id})
    EXPECT_EQ(wait_final(*engine, id).status, JobStatus::kSucceeded);
  EXPECT_EQ(fake->largest_batch.load(), 2);
}

TEST(EngineAdmission, AJobWaitingPastMaxWaitOpensTheBatch) {
  auto fake = model_best_at_two();
  auto engine = make_engine(fake, 4, 0.05);
  wait_warm(*engine);
  const auto a = run_long_job(*engine, 100);  // ~1 s
  run_long_job(*engine, 100);
  const auto c = engine->submit(request("third"));
  // c runs after ~50 ms of waiting, beside the two long jobs, and ends long before them.
  EXPECT_EQ(wait_final(*engine, c.id).status, JobStatus::kSucceeded);
  EXPECT_EQ(engine->get(a)->status, JobStatus::kRunning);
  EXPECT_EQ(fake->largest_batch.load(), 3);
  EXPECT_EQ(wait_final(*engine, a).status, JobStatus::kSucceeded);
}

TEST(EngineAdmission, ALightLoadBatchOfQueuedImagesOpensToMaxBatch) {
  auto fake = model_best_at_two();
  auto engine = make_engine(fake, 4, 60);
  wait_warm(*engine);
  const auto a = run_long_job(*engine, 60);
  // Three images queue at once (>= the light-load batch of 2): heavy load, up to max_batch.
  const auto b = engine->submit(request("three images", 3));
  EXPECT_EQ(wait_final(*engine, b.id).status, JobStatus::kSucceeded);
  EXPECT_EQ(fake->largest_batch.load(), 4);
  EXPECT_EQ(wait_final(*engine, a).status, JobStatus::kSucceeded);
}

TEST(EngineFaults, SuccessfulWarmUpIsReady) {
  auto fake = std::make_shared<FakeRunner>();
  auto engine = make_engine(fake);
  wait_warm(*engine);
  EXPECT_TRUE(engine->ready());
  EXPECT_TRUE(engine->warm_up_error().empty());
}

// Warm-up's plan (engine/warm_up.h): on the CPU, one image from 64 px up to the native size,
// then the batch sizes; on a GPU, the batch sizes at the native size only.
TEST(WarmUpPlan, CpuClimbsToTheNativeSizeThenTheBatchSizes) {
  const auto pairs = [](const std::vector<StepTiming>& steps) {
    std::vector<std::pair<int, int>> out;
    for (const auto& t : steps) out.emplace_back(t.size, t.batch);
    return out;
  };
  EXPECT_EQ(pairs(warm_up_probes(512, {1, 2, 4, 8}, false)),
            (std::vector<std::pair<int, int>>{
                {64, 1}, {128, 1}, {256, 1}, {512, 1}, {512, 2}, {512, 4}, {512, 8}}));
  EXPECT_EQ(pairs(warm_up_probes(768, {1, 2}, false)),
            (std::vector<std::pair<int, int>>{
                {64, 1}, {128, 1}, {256, 1}, {512, 1}, {768, 1}, {768, 2}}));
  EXPECT_EQ(pairs(warm_up_probes(1024, {1, 2}, true)),
            (std::vector<std::pair<int, int>>{{1024, 1}, {1024, 2}}));
  EXPECT_EQ(pairs(warm_up_probes(64, {1}, false)), (std::vector<std::pair<int, int>>{{64, 1}}));
}

TEST(WarmUpPlan, WhatWasNotMeasuredScalesWithPixelsAndImagesFromTheLastMeasured) {
  // Only smaller images timed: the native size's steps scale by pixels squared (x16 from 256 to
  // 512 px).
  auto native = native_step_times({{64, 1, 0.01, true}, {256, 1, 0.16, true}}, 512, {1, 2, 4});
  ASSERT_EQ(native.size(), 3u);
  for (size_t i = 0; i < native.size(); ++i) {
    EXPECT_EQ(native[i].size, 512);
    EXPECT_EQ(native[i].batch, 1 << i);
    EXPECT_FALSE(native[i].measured);
    EXPECT_DOUBLE_EQ(native[i].seconds, 2.56 * (1 << i));
  }
  // Batch sizes 1 and 2 timed at the native size: kept; 4 from 2's images/s.
  native = native_step_times({{256, 1, 0.16, true}, {512, 1, 0.7, true}, {512, 2, 1.2, true}}, 512,
                             {1, 2, 4});
  ASSERT_EQ(native.size(), 3u);
  EXPECT_TRUE(native[0].measured);
  EXPECT_DOUBLE_EQ(native[0].seconds, 0.7);
  EXPECT_TRUE(native[1].measured);
  EXPECT_DOUBLE_EQ(native[1].seconds, 1.2);
  EXPECT_FALSE(native[2].measured);
  EXPECT_DOUBLE_EQ(native[2].seconds, 2.4);
  EXPECT_TRUE(native_step_times({}, 512, {1, 2}).empty());
}

// A worker times steps while the next is predicted to end within warm_up_budget_s and estimates
// the rest: batch 1 (0.1 s), then 2 (predicted 0.2 s, ends by ~0.3 s), not 4 (predicted 0.4 s,
// would end past 0.5 s). The estimates scale batch 2's images/s, whatever 4 and 8 would take.
TEST(EngineWarmUp, TimesWhatFitsTheBudgetAndEstimatesTheRest) {
  auto fake = std::make_shared<FakeRunner>();
  fake->step_seconds = {0.1, 0.2, 0.35, 0.6};
  fake->sleep_timing = true;
  auto engine = make_engine(fake, 8, 0.25, 0.5);
  wait_warm(*engine);
  ASSERT_TRUE(engine->ready());
  EXPECT_EQ(fake->timed, (std::vector<std::pair<int, int>>{{64, 1}, {64, 2}}));
  const auto w = engine->workers().front().warm_up;
  EXPECT_EQ(w.phase, "done");
  EXPECT_DOUBLE_EQ(w.budget_s, 0.5);
  EXPECT_GE(w.elapsed_s, 0.3);
  ASSERT_EQ(w.steps.size(), 4u);
  EXPECT_TRUE(w.steps[0].measured);
  EXPECT_TRUE(w.steps[1].measured);
  EXPECT_FALSE(w.steps[2].measured);
  EXPECT_EQ(w.steps[2].batch, 4);
  EXPECT_DOUBLE_EQ(w.steps[2].seconds, 0.4);
  EXPECT_FALSE(w.steps[3].measured);
  EXPECT_DOUBLE_EQ(w.steps[3].seconds, 0.8);
  EXPECT_EQ(engine->workers().front().light_load_batch, 1);  // the same images/s at every size
}

// Shutdown during warm-up (nothing queued, so nothing to wait for) stops it before its next
// model call: the worker never reports ready and shutdown() returns after the step in progress,
// not after the four steps of a whole warm-up.
TEST(EngineWarmUp, ShutdownStopsItBetweenModelCalls) {
  auto fake = std::make_shared<FakeRunner>();
  fake->step_seconds = {1, 1, 1, 1};
  fake->sleep_timing = true;
  auto engine = make_engine(fake, 8, 0.25, 60);
  for (int i = 0; i < 500 && engine->workers().front().warm_up.steps.empty() &&
                  engine->workers().front().warm_up.phase != "timing";
       ++i)
    std::this_thread::sleep_for(10ms);
  const auto start = std::chrono::steady_clock::now();
  engine->shutdown(start);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1900ms);
  const auto w = engine->workers().front();
  EXPECT_EQ(w.state, "warming_up");
  EXPECT_EQ(w.warm_up.phase, "stopped");
  EXPECT_LE(fake->timed.size(), 2u);
  EXPECT_FALSE(engine->ready());
}

// A running job past max_run_s (the service's, or its request's smaller one) stops between UNet
// steps and ends timed_out: its own state and event, counted apart from expired, no images kept
// (not even those already finished), its images not yet admitted never run, and the worker goes
// on to the next job.
TEST(EngineFaults, JobRunningPastMaxRunSEndsTimedOutBetweenSteps) {
  auto fake = std::make_shared<FakeRunner>();
  EngineOptions o;
  o.max_batch = 1;
  o.max_run_s = 5;
  auto engine = Engine::create(o, std::vector<std::shared_ptr<ModelRunner>>{fake},
                               std::make_shared<cache::PassThroughCache>());
  wait_warm(*engine);
  fake->step_ms = 20;
  auto r = request("runs too long", 3);  // image 0 (5 steps) finishes; image 1 overruns
  r.steps = 5;
  r.max_run_s = 0.2;
  std::mutex m;
  std::vector<EventType> events;
  std::string final_error;
  const auto job = engine->submit(r);
  engine->subscribe(job.id, [&](const JobEvent& e) {
    std::lock_guard<std::mutex> lock(m);
    events.push_back(e.type);
    if (is_final(e.type)) final_error = e.error;
  });
  // Image 0 takes ~100 ms; the limit falls within image 1 or 2.
  const auto start = std::chrono::steady_clock::now();
  const auto end = wait_final(*engine, job.id);
  EXPECT_EQ(end.status, JobStatus::kTimedOut);
  EXPECT_EQ(to_string(end.status), "timed_out");
  EXPECT_NE(end.error.find("max_run_s (0.2 s)"), std::string::npos) << end.error;
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1500ms);
  EXPECT_LT(end.evaluations, end.evaluations_total);  // stopped before all its steps
  EXPECT_EQ(engine->image(job.id, 0).status, ImageLookup::kNotReady);  // finished one discarded
  // The worker stopped stepping it: the step count no longer moves.
  const auto steps_then = engine->stats().unet_steps;
  std::this_thread::sleep_for(150ms);
  EXPECT_EQ(engine->stats().unet_steps, steps_then);
  const auto stats = engine->stats();
  EXPECT_EQ(stats.jobs_timed_out, 1u);
  EXPECT_EQ(stats.jobs_expired, 0u);
  EXPECT_EQ(stats.jobs_failed, 0u);
  EXPECT_EQ(stats.active_images, 0);
  {
    std::lock_guard<std::mutex> lock(m);
    ASSERT_FALSE(events.empty());
    EXPECT_EQ(events.back(), EventType::kTimedOut);
    EXPECT_EQ(final_error, end.error);
  }
  // A request may only shorten the service's limit.
  auto too_long = request("too long a limit");
  too_long.max_run_s = 6;
  try {
    engine->submit(too_long);
    ADD_FAILURE() << "max_run_s above the service's was accepted";
  } catch (const pipeline::RequestError& e) {
    EXPECT_EQ(e.field(), "max_run_s");
    EXPECT_NE(std::string(e.what()).find("at most 5"), std::string::npos) << e.what();
  }
  // Within the service's limit (and without a field) the next job runs to its end.
  fake->step_ms = 0;
  const auto next = engine->submit(request("next"));
  EXPECT_EQ(wait_final(*engine, next.id).status, JobStatus::kSucceeded);
}

// A request one of whose images, alone, exceeds the memory budget (its UNet call plus its
// decode) is refused before it is queued, naming width; the budget is max_memory_bytes, else what
// the device had free when the engine started. More images of a size that fits run one call
// after another instead.
TEST(EngineFaults, RequestPastTheMemoryBudgetIsRefusedBeforeQueueing) {
  auto fake = std::make_shared<FakeRunner>();
  fake->free_memory = 270000;  // 3 bytes a pixel (2 rows + 1 decode): up to 296x296
  EngineOptions o;
  o.max_batch = 2;
  auto engine = Engine::create(o, std::vector<std::shared_ptr<ModelRunner>>{fake},
                               std::make_shared<cache::PassThroughCache>());
  wait_warm(*engine);
  // Four images of 256x256, where a call holds 3 rows beside a decode: one image a call.
  auto fits = request("fits", 4);
  fits.width = fits.height = 256;
  EXPECT_EQ(wait_final(*engine, engine->submit(fits).id).status, JobStatus::kSucceeded);
  EXPECT_EQ(fake->largest_batch.load(), 1);
  auto big = request("too big", 1);
  big.width = 512;
  big.height = 512;
  try {
    engine->submit(big);
    ADD_FAILURE() << "a request past the memory budget was accepted";
  } catch (const pipeline::RequestError& e) {
    EXPECT_EQ(e.field(), "width");
    const std::string m = e.what();
    for (const char* words :
         {"512x512", "estimated 1 MB", "for one image", "available", "with guidance",
          "num_images (1)", "max_memory_mb 0", "largest square size that fits is 296x296"})
      EXPECT_NE(m.find(words), std::string::npos) << words << " in " << m;
  }
  // Without guidance an image is one UNet row: 2 bytes a pixel, up to 360x360.
  big.guidance_scale = 1;
  try {
    engine->submit(big);
    ADD_FAILURE() << "a request past the memory budget was accepted";
  } catch (const pipeline::RequestError& e) {
    const std::string m = e.what();
    for (const char* words : {"without guidance", "largest square size that fits is 360x360"})
      EXPECT_NE(m.find(words), std::string::npos) << words << " in " << m;
  }
  EXPECT_EQ(engine->stats().jobs_submitted, 1u);
  // max_memory_bytes overrides what the device has.
  EngineOptions tight = o;
  tight.max_memory_bytes = 3 * 64 * 64;
  auto small_engine = Engine::create(tight, std::vector<std::shared_ptr<ModelRunner>>{fake},
                                     std::make_shared<cache::PassThroughCache>());
  wait_warm(*small_engine);
  fits.num_images = 1;
  EXPECT_THROW(small_engine->submit(fits), pipeline::RequestError);
  EXPECT_EQ(wait_final(*small_engine, small_engine->submit(request("64 px")).id).status,
            JobStatus::kSucceeded);
}

// A UNet call and a decode run at once only while their estimates fit the budget together. With
// 12 units, a call holds five 64x64 images (10 units beside a 64x64 decode's 1) and one 128x128
// image (8 beside its decode's 4): a 128x128 decode (4) cannot run beside the 64x64 call, and
// waits for it, with decodes much slower than steps. Every job succeeds and the most in flight at
// once stays within the budget; with room to spare the same traffic goes past it.
TEST(EngineFaults, UNetCallsAndDecodesTogetherStayWithinTheBudget) {
  constexpr uint64_t kUnit = 64 * 64;  // the fake's bytes for one 64x64 row or decoded image
  const auto run = [&](uint64_t budget) {
    auto fake = std::make_shared<FakeRunner>();
    EngineOptions o;
    o.max_batch = 8;
    o.decode_batch = 4;
    o.light_load_max_wait_s = 0;
    o.max_memory_bytes = budget;
    auto engine = Engine::create(o, std::vector<std::shared_ptr<ModelRunner>>{fake},
                                 std::make_shared<cache::PassThroughCache>());
    wait_warm(*engine);
    fake->step_ms = 5;
    fake->decode_ms = 40;
    auto long_job = request("five images of 64x64", 5);
    long_job.steps = 60;
    std::vector<std::string> ids{engine->submit(long_job).id};
    for (int i = 0; i < 3; ++i) {
      auto r = request("128x128 " + std::to_string(i));
      r.width = r.height = 128;  // a row or a decoded image of 4 units
      ids.push_back(engine->submit(r).id);
    }
    for (const auto& id : ids) EXPECT_EQ(wait_final(*engine, id).status, JobStatus::kSucceeded);
    std::lock_guard<std::mutex> lock(fake->in_flight_mutex);
    return fake->most_together;
  };
  EXPECT_LE(run(12 * kUnit), 12 * kUnit);
  EXPECT_GT(run(1000 * kUnit), 12 * kUnit);
}

// A decode call holds images of one size (a GPU decodes them as one tensor; the fake refuses
// mixed sizes too): while the first 64x64 image decodes, a 128x128 and a 64x64 image finish, and
// are decoded in two calls, not one.
TEST(EngineFaults, DecodeCallsHoldOneSize) {
  auto fake = std::make_shared<FakeRunner>();
  EngineOptions o;
  o.max_batch = 4;
  o.decode_batch = 4;
  o.light_load_max_wait_s = 0;
  auto engine = Engine::create(o, std::vector<std::shared_ptr<ModelRunner>>{fake},
                               std::make_shared<cache::PassThroughCache>());
  wait_warm(*engine);
  fake->largest_decode = 0;  // the decoder's warm-up decoded each batch size
  fake->step_ms = 5;
  fake->decode_ms = 150;
  auto first = request("first");
  first.steps = 2;
  auto big = request("128x128");
  big.width = big.height = 128;
  auto later = request("later");
  later.steps = 4;
  std::vector<std::string> ids;
  for (const auto& r : {first, big, later}) ids.push_back(engine->submit(r).id);
  for (const auto& id : ids) EXPECT_EQ(wait_final(*engine, id).status, JobStatus::kSucceeded);
  EXPECT_EQ(fake->largest_decode.load(), 1);
}

// The service's limit applies to jobs that ask for none; the engine refuses a limit of 0.
TEST(EngineFaults, ServiceMaxRunSBoundsJobsWithoutTheField) {
  EngineOptions bad;
  bad.max_run_s = 0;
  EXPECT_THROW(
      Engine::create(bad, std::vector<std::shared_ptr<ModelRunner>>{std::make_shared<FakeRunner>()},
                     nullptr),
      std::invalid_argument);
  auto fake = std::make_shared<FakeRunner>();
  EngineOptions o;
  o.max_run_s = 0.15;
  auto engine = Engine::create(o, std::vector<std::shared_ptr<ModelRunner>>{fake},
                               std::make_shared<cache::PassThroughCache>());
  wait_warm(*engine);
  fake->step_ms = 20;
  auto r = request("no limit asked");
  r.steps = 100;
  const auto end = wait_final(*engine, engine->submit(r).id);
  EXPECT_EQ(end.status, JobStatus::kTimedOut);
  EXPECT_LT(end.evaluations, 50);
}

}  // namespace
}  // namespace sdserve::engine
