// The engine against the real tiny model on the CPU: queueing, step-level admission, batching
// invariance, cancellation, expiry, results, shutdown.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>

#include "cache/embedding_cache.h"
#include "engine/job_queue.h"
#include "engine/result_store.h"
#include "pipeline/errors.h"
#include "pipeline/image.h"
#include "pipeline/memory.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

namespace sdserve::engine {
namespace {

using namespace std::chrono_literals;

std::shared_ptr<pipeline::Model> tiny_model() {
  static auto model = pipeline::Model::load(test::model_dir(), {"cpu", "fp32", "", ""});
  return model;
}

JobRequest small_request(int steps = 4, uint64_t seed = 7) {
  JobRequest r;
  r.prompt = "a red cube";
  r.width = r.height = 64;
  r.steps = steps;
  r.sampler = "euler";
  r.seed = seed;
  return r;
}

// Records a job's events and lets a test wait for one. Declare it before the engine: the engine's
// dispatcher may call it until the engine is destroyed.
class Recorder {
 public:
  EventCallback callback() {
    return [this](const JobEvent& e) {
      std::lock_guard<std::mutex> lock(mutex_);
      events_.push_back(e);
      cv_.notify_all();
    };
  }
  bool wait_for(const std::string& type, std::chrono::seconds timeout = 60s) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return index_of_locked(type) >= 0; });
  }
  int index_of(const std::string& type) {
    std::lock_guard<std::mutex> lock(mutex_);
    return index_of_locked(type);
  }
  std::vector<JobEvent> events() {
    std::lock_guard<std::mutex> lock(mutex_);
    return events_;
  }

 private:
  int index_of_locked(const std::string& type) const {
    for (size_t i = 0; i < events_.size(); ++i)
      if (to_string(events_[i].type) == type) return static_cast<int>(i);
    return -1;
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<JobEvent> events_;
};

std::unique_ptr<Engine> make_engine(EngineOptions o = {}) {
  auto engine = Engine::create(o, {tiny_model()}, std::make_shared<cache::PassThroughCache>());
  for (int i = 0; i < 600 && !engine->ready(); ++i) std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(engine->ready());
  return engine;
}

JobStatus wait_final(Engine& engine, const std::string& id, std::chrono::seconds timeout = 60s) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    auto snap = engine.get(id);
    if (snap && is_final(snap->status)) return snap->status;
    std::this_thread::sleep_for(10ms);
  }
  return JobStatus::kRunning;
}

std::vector<uint8_t> pixels_of(Engine& engine, const std::string& id, int k) {
  auto img = engine.image(id, k);
  EXPECT_EQ(img.status, ImageLookup::kOk);
  if (!img.png) return {};
  return pipeline::decode_png(*img.png).pixels;
}

TEST(JobQueue, StrictPriorityFifoWithinLevel) {
  BoundedPriorityQueue q(4);
  EXPECT_TRUE(q.push("a", Priority::kLow));
  EXPECT_TRUE(q.push("b", Priority::kNormal));
  EXPECT_TRUE(q.push("c", Priority::kHigh));
  EXPECT_TRUE(q.push("d", Priority::kNormal));
  EXPECT_FALSE(q.push("e", Priority::kHigh));  // full
  EXPECT_EQ(*q.front(), "c");
  EXPECT_EQ(q.position("b"), 1);
  EXPECT_EQ(q.position("d"), 2);
  EXPECT_EQ(q.position("a"), 3);
  EXPECT_TRUE(q.remove("b"));
  EXPECT_EQ(q.position("d"), 1);
  EXPECT_EQ(q.position("b"), -1);
}

TEST(ResultStore, EvictsOldestOverByteCapAndByAge) {
  ResultStore store(10s, 100);
  const auto t0 = std::chrono::steady_clock::now();
  auto png = [](size_t n) { return std::make_shared<const std::vector<uint8_t>>(n, 1); };
  EXPECT_TRUE(store.add("a", 0, png(60), t0).empty());
  auto evicted = store.add("b", 0, png(60), t0 + 1s);
  ASSERT_EQ(evicted.size(), 1u);
  EXPECT_EQ(evicted[0], "a");
  EXPECT_EQ(store.get("a", 0), nullptr);
  EXPECT_NE(store.get("b", 0), nullptr);
  EXPECT_TRUE(store.expire(t0 + 5s).empty());
  EXPECT_EQ(store.expire(t0 + 12s), std::vector<std::string>{"b"});
  EXPECT_EQ(store.bytes(), 0u);
}

TEST(Engine, JobRunsToPngWithEventsInOrder) {
  Recorder rec;
  auto engine = make_engine();
  auto snap = engine->submit(small_request());
  ASSERT_NE(engine->subscribe(snap.id, rec.callback()), 0u);
  ASSERT_TRUE(rec.wait_for("succeeded"));
  auto events = rec.events();
  ASSERT_GE(events.size(), 3u);
  EXPECT_TRUE(events.front().type == EventType::kQueued ||
              events.front().type == EventType::kStarted);
  EXPECT_EQ(events.back().type, EventType::kSucceeded);
  int last_step = 0;
  for (const auto& e : events)
    if (e.type == EventType::kProgress) {
      const int step = e.evaluations;  // euler: one model evaluation per step
      EXPECT_GT(step, last_step);
      last_step = step;
    }
  EXPECT_EQ(last_step, 4);
  auto img = engine->image(snap.id, 0);
  ASSERT_EQ(img.status, ImageLookup::kOk);
  std::vector<std::pair<std::string, std::string>> text;
  auto decoded = pipeline::decode_png(*img.png, &text);
  EXPECT_EQ(decoded.width, 64);
  ASSERT_EQ(text.size(), 1u);
  EXPECT_NE(text[0].second.find("Seed: 7"), std::string::npos) << text[0].second;
  EXPECT_EQ(engine->image(snap.id, 1).status, ImageLookup::kNoSuchImage);
  EXPECT_EQ(engine->image("nope", 0).status, ImageLookup::kUnknownJob);
}

TEST(Engine, LateSubscriberGetsCurrentStateFirst) {
  Recorder rec;
  auto engine = make_engine();
  auto snap = engine->submit(small_request());
  ASSERT_EQ(wait_final(*engine, snap.id), JobStatus::kSucceeded);
  engine->subscribe(snap.id, rec.callback());
  ASSERT_TRUE(rec.wait_for("succeeded", 10s));
  EXPECT_EQ(rec.events().size(), 1u);
}

TEST(Engine, ShortJobStartsWhileLongOneRuns) {
  EngineOptions o;
  o.max_batch = 4;
  Recorder long_rec, short_rec;
  auto engine = make_engine(o);
  auto long_job = engine->submit(small_request(150));
  engine->subscribe(long_job.id, long_rec.callback());
  ASSERT_TRUE(long_rec.wait_for("progress"));
  auto short_job = engine->submit(small_request(3, 99));
  engine->subscribe(short_job.id, short_rec.callback());
  ASSERT_TRUE(short_rec.wait_for("succeeded"));
  // The short job finished while the long one was still running: it was admitted at a step.
  auto long_snap = engine->get(long_job.id);
  EXPECT_EQ(long_snap->status, JobStatus::kRunning);
  EXPECT_LT(long_snap->evaluations, 150);
  engine->cancel(long_job.id);
  EXPECT_EQ(wait_final(*engine, long_job.id), JobStatus::kCancelled);
}

TEST(Engine, SamePixelsAloneAndBatched) {
  std::vector<uint8_t> alone;
  {
    EngineOptions o;
    o.max_batch = 1;
    auto engine = make_engine(o);
    auto r = small_request(6, 1234);
    r.sampler = "euler_ancestral";
    auto snap = engine->submit(r);
    ASSERT_EQ(wait_final(*engine, snap.id), JobStatus::kSucceeded);
    alone = pixels_of(*engine, snap.id, 0);
  }
  EngineOptions o;
  o.max_batch = 8;
  auto engine = make_engine(o);
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    auto other = small_request(9, 50 + i);
    other.sampler = i == 0 ? "dpmpp_2m" : "ddim";
    other.guidance_scale = 3 + i;
    ids.push_back(engine->submit(other).id);
  }
  auto r = small_request(6, 1234);
  r.sampler = "euler_ancestral";
  auto target = engine->submit(r).id;
  ASSERT_EQ(wait_final(*engine, target), JobStatus::kSucceeded);
  for (const auto& id : ids) ASSERT_EQ(wait_final(*engine, id), JobStatus::kSucceeded);
  EXPECT_EQ(pixels_of(*engine, target, 0), alone);
}

TEST(Engine, CancelQueuedAndRunning) {
  EngineOptions o;
  o.max_batch = 1;
  Recorder rec;
  auto engine = make_engine(o);
  auto running = engine->submit(small_request(150));
  engine->subscribe(running.id, rec.callback());
  auto queued = engine->submit(small_request(150));
  ASSERT_TRUE(rec.wait_for("progress"));
  EXPECT_EQ(engine->get(queued.id)->status, JobStatus::kQueued);
  EXPECT_TRUE(engine->cancel(queued.id));
  EXPECT_EQ(engine->get(queued.id)->status, JobStatus::kCancelled);
  EXPECT_TRUE(engine->cancel(running.id));
  ASSERT_TRUE(rec.wait_for("cancelled"));
  EXPECT_LT(engine->get(running.id)->evaluations, 150);
  EXPECT_FALSE(engine->cancel(running.id));  // already final
  // The slot is free again.
  auto next = engine->submit(small_request(2));
  EXPECT_EQ(wait_final(*engine, next.id), JobStatus::kSucceeded);
}

TEST(Engine, QueueFullAndExpiry) {
  EngineOptions o;
  o.max_batch = 1;
  o.max_queue = 2;
  Recorder rec;
  auto engine = make_engine(o);
  auto running = engine->submit(small_request(150));
  engine->subscribe(running.id, rec.callback());
  ASSERT_TRUE(rec.wait_for("started"));
  auto r = small_request(2);
  r.timeout_s = 0.2;
  auto expiring = engine->submit(r);
  engine->submit(small_request(2));
  try {
    engine->submit(small_request(2));
    FAIL() << "expected QueueFull";
  } catch (const QueueFull& e) {
    EXPECT_GT(e.retry_after_s, 0);
  }
  EXPECT_EQ(wait_final(*engine, expiring.id, 10s), JobStatus::kExpired);
  engine->cancel(running.id);
}

TEST(Engine, HighPriorityOvertakesNormal) {
  EngineOptions o;
  o.max_batch = 1;
  Recorder rec;
  auto engine = make_engine(o);
  auto blocker = engine->submit(small_request(40));
  engine->subscribe(blocker.id, rec.callback());
  ASSERT_TRUE(rec.wait_for("started"));
  auto normal = engine->submit(small_request(2));
  auto r = small_request(2);
  r.priority = Priority::kHigh;
  auto high = engine->submit(r);
  EXPECT_EQ(engine->get(high.id)->queue_position, 0);
  EXPECT_EQ(engine->get(normal.id)->queue_position, 1);
  ASSERT_EQ(wait_final(*engine, normal.id), JobStatus::kSucceeded);
  EXPECT_LT(*engine->get(high.id)->times.finished_at, *engine->get(normal.id)->times.finished_at);
}

// Images per UNet call: (the most, how many calls).
std::pair<int, uint64_t> unet_batches(const EngineStats& stats) {
  const auto& h = stats.unet_batch_images;
  int most = 0;
  uint64_t calls = 0;
  for (size_t i = 0; i < h.counts.size(); ++i) {
    calls += h.counts[i];
    if (h.counts[i] > 0) most = i < h.bounds.size() ? static_cast<int>(h.bounds[i]) : 1 << 30;
  }
  return {most, calls};
}

// max_memory_bytes where one 64x64 image (its UNet call with guidance, beside its decode) fits
// the model's own estimate and two in one call do not: jobs of that size submitted together all
// succeed, each UNet call holding one image; a size that does not fit even alone is refused
// naming width. With the default budget the same jobs share calls.
TEST(Engine, MemoryBudgetCapsTheUNetBatchNotTheRequest) {
  const auto shape = pipeline::memory_shape(*tiny_model());
  const uint64_t one = pipeline::estimate_memory(shape, 64, 64, 2, 1).total();
  const uint64_t two = pipeline::estimate_memory(shape, 64, 64, 4, 1).total();
  ASSERT_LT(one, two);
  const auto run = [](uint64_t budget) {
    EngineOptions o;
    o.max_batch = 4;
    o.light_load_max_wait_s = 0;  // batch whatever waits
    o.max_memory_bytes = budget;
    auto engine = make_engine(o);
    std::vector<std::string> ids;
    for (int i = 0; i < 3; ++i) ids.push_back(engine->submit(small_request(8, 20 + i)).id);
    auto two_images = small_request(8, 30);
    two_images.num_images = 2;
    ids.push_back(engine->submit(two_images).id);
    for (const auto& id : ids) EXPECT_EQ(wait_final(*engine, id), JobStatus::kSucceeded);
    return unet_batches(engine->stats());
  };
  const uint64_t budget = (one + two) / 2;
  const auto [most, calls] = run(budget);
  EXPECT_EQ(most, 1);
  EXPECT_EQ(calls, 5u * 8);  // five images, eight steps each, one at a time
  EXPECT_GT(run(0).first, 1);

  EngineOptions o;
  o.max_memory_bytes = budget;
  auto engine = make_engine(o);
  auto big = small_request();
  big.width = big.height = 128;
  ASSERT_GT(pipeline::estimate_memory(shape, 128, 128, 2, 1).total(), budget);
  try {
    engine->submit(big);
    ADD_FAILURE() << "a 128x128 request past the budget was accepted";
  } catch (const pipeline::RequestError& e) {
    EXPECT_EQ(e.field(), "width");
    const std::string m = e.what();
    int side = 64;
    while (pipeline::estimate_memory(shape, side + 8, side + 8, 2, 1).total() <= budget) side += 8;
    const std::string fits =
        "largest square size that fits is " + std::to_string(side) + "x" + std::to_string(side);
    for (const std::string& words : {std::string("128x128"), std::string("for one image"),
                                     std::string("(max_memory_mb)"), fits})
      EXPECT_NE(m.find(words), std::string::npos) << words << " in " << m;
  }
}

TEST(Engine, InvalidRequestNamesField) {
  auto engine = make_engine();
  auto r = small_request();
  r.clip_skip = 99;
  try {
    engine->submit(r);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("clip_skip"), std::string::npos);
  }
}

TEST(Engine, ShutdownFinishesRunningWorkAndRefusesNew) {
  auto engine = make_engine();
  auto snap = engine->submit(small_request(20));
  engine->shutdown(std::chrono::steady_clock::now() + 60s);
  EXPECT_EQ(engine->get(snap.id)->status, JobStatus::kSucceeded);
  EXPECT_THROW(engine->submit(small_request()), ShuttingDown);
}

TEST(Engine, ShutdownDeadlineCancelsTheRest) {
  auto engine = make_engine();
  auto snap = engine->submit(small_request(150));
  std::this_thread::sleep_for(50ms);
  engine->shutdown(std::chrono::steady_clock::now());
  EXPECT_EQ(engine->get(snap.id)->status, JobStatus::kCancelled);
}

}  // namespace
}  // namespace sdserve::engine
