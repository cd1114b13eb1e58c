// The checkpoints one worker holds on its device: the default model, loaded at start, and any
// other a job asks for, loaded on first use by a thread of the set's own (the job waits in the
// queue meanwhile, and jobs behind it for loaded models go on) and evicted least recently used
// when the weights would pass `budget` bytes. A model some image still uses is never evicted:
// a load that needs its room waits, and the worker admits no new images while it does, so the
// models in use drain and the load starts within one job's run (engine/worker.cpp, admit()).
//
// Thread safety: every member may be called from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/model_runner.h"

namespace sdserve::engine {

// Loads a model by name on one device; throws (pipeline::ModelError) when it cannot.
using ModelLoader =
    std::function<std::shared_ptr<ModelRunner>(const std::string& name, const std::string& device)>;

// One model a worker holds, for /v1/models and the metrics.
struct LoadedModel {
  std::string name;
  std::string device;
  uint64_t bytes = 0;
  bool in_use = false;  // images use it now (the pinned default: always reported in use)
  bool pinned = false;
  double load_seconds = 0;
};

struct ModelSetStats {
  uint64_t loads = 0, load_failures = 0, evictions = 0;
  double load_seconds = 0;  // summed
};

class ModelSet {
 public:
  // `budget` 0: no bound. `changed` is called (without the set's lock) when a load ends, so the
  // worker looks at the queue again.
  ModelSet(std::string device, uint64_t budget, ModelLoader loader, std::function<void()> changed);
  ~ModelSet();  // stops the loader thread (a load in progress finishes first)
  ModelSet(const ModelSet&) = delete;
  ModelSet& operator=(const ModelSet&) = delete;

  // A model loaded elsewhere (the default, warmed up by the worker): never evicted. A model that
  // cannot fit beside the pinned ones fails to load, with that reason.
  void add_pinned(const std::string& name, std::shared_ptr<ModelRunner> runner);

  enum class State { kReady, kLoading, kFailed };
  struct Lookup {
    State state = State::kLoading;
    std::shared_ptr<ModelRunner> runner;  // kReady
    std::string error;                    // kFailed
  };
  // Ready: the runner, now the most recently used. Otherwise a load is queued (once;
  // `expected_bytes`, asked only then, says how much room to make) and kLoading returned. A load
  // that failed stays failed for `retry_after_s` (its jobs fail with its error), then may be tried
  // again.
  Lookup acquire(const std::string& name, const std::function<uint64_t()>& expected_bytes);
  // True while a load waits for models in use to become idle (the worker stops admitting).
  bool waiting_for_room() const;

  // Given to every model held now and to each one loaded later.
  void set_textual_inversions(std::vector<pipeline::TextualInversionPtr> list);

  std::vector<LoadedModel> loaded() const;
  ModelSetStats stats() const;

 private:
  struct Slot {
    std::shared_ptr<ModelRunner> runner;
    uint64_t bytes = 0;
    uint64_t last_used = 0;  // a counter: larger is more recent
    double load_seconds = 0;
    bool pinned = false;
  };
  struct Failure {
    std::string error;
    std::chrono::steady_clock::time_point at;
  };
  void loader_loop();
  // With mutex_ held: evicts idle models, least recently used first, until `bytes` more fit.
  bool make_room(uint64_t bytes);
  uint64_t used() const;  // with mutex_ held

  const std::string device_;
  const uint64_t budget_;
  const ModelLoader loader_;
  const std::function<void()> changed_;
  static constexpr double kRetryAfterS = 30;

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::string, Slot> slots_;                     // guarded by mutex_
  std::deque<std::pair<std::string, uint64_t>> pending_;  // guarded by mutex_: (name, bytes)
  std::string loading_;                                   // guarded by mutex_
  std::map<std::string, Failure> failures_;               // guarded by mutex_
  bool waiting_for_room_ = false;                         // guarded by mutex_
  uint64_t clock_ = 0;                                    // guarded by mutex_
  ModelSetStats stats_;                                   // guarded by mutex_
  std::vector<pipeline::TextualInversionPtr> textual_inversions_;  // guarded by mutex_
  bool stop_ = false;                                              // guarded by mutex_
  std::thread thread_;
};

}  // namespace sdserve::engine
