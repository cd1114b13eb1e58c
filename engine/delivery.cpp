// The engine's two helper threads: the dispatcher, which delivers events in order and sweeps
// expired jobs and results, and the encoder, which turns images into PNG/JPEG bytes off the
// GPU worker's thread.
#include <string>

#include "engine/engine_impl.h"
#include "pipeline/log.h"

namespace sdserve::engine {

// ---------------------------------------------------------------------------------------------
// Dispatcher: delivers events in order, expires queued jobs and old results, stops jobs that ran
// past max_run_s (workers check their own images every turn too).

void Engine::Impl::dispatcher_loop() {
  auto next_sweep = SteadyClock::now();
  for (;;) {
    std::pair<JobEvent, std::vector<EventCallback>> item;
    {
      std::unique_lock<std::mutex> lock(event_mutex);
      event_cv.wait_until(lock, next_sweep, [&] { return !events.empty() || events_exit; });
      if (events.empty() && events_exit) return;
      if (!events.empty()) {
        item = std::move(events.front());
        events.pop_front();
      }
    }
    for (auto& cb : item.second) {
      try {
        cb(item.first);
      } catch (...) {
        // A subscriber's failure must not stop delivery to the others.
      }
    }
    const auto now = SteadyClock::now();
    if (now >= next_sweep) {
      std::lock_guard<std::mutex> lock(mutex);
      expire_queued(now);
      stop_overruns(now);
      for (const auto& id : results.expire(now)) {
        auto it = jobs.find(id);
        if (it != jobs.end()) it->second->results_evicted = true;
      }
      forget_old_jobs();
      next_sweep = now + std::chrono::milliseconds(200);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Encoder: PNG/JPEG encoding off the GPU thread. Previews are dropped when it falls behind.

void Engine::Impl::post_encode(EncodeTask task) {
  {
    std::lock_guard<std::mutex> lock(encode_mutex);
    constexpr size_t kMaxPendingPreviews = 32;
    if (task.droppable) {
      size_t pending = 0;
      for (const auto& t : encode_tasks) pending += t.droppable ? 1 : 0;
      if (pending >= kMaxPendingPreviews) {
        ++previews_dropped_behind;
        return;
      }
    }
    encode_tasks.push_back(std::move(task));
  }
  encode_cv.notify_one();
}

void Engine::Impl::encoder_loop() {
  for (;;) {
    EncodeTask task;
    {
      std::unique_lock<std::mutex> lock(encode_mutex);
      encode_cv.wait(lock, [&] { return !encode_tasks.empty() || encode_exit; });
      if (encode_tasks.empty()) return;
      task = std::move(encode_tasks.front());
      encode_tasks.pop_front();
    }
    try {
      task.run();
    } catch (const std::exception& e) {
      pipeline::log(pipeline::LogLevel::kError, std::string("image encoding failed: ") + e.what());
      if (task.fail) task.fail(public_error(e.what()));
    } catch (...) {
      pipeline::log(pipeline::LogLevel::kError, "image encoding failed: unknown exception");
      if (task.fail) task.fail("image encoding failed");
    }
  }
}

}  // namespace sdserve::engine
