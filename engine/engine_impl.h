// The engine's shared state and threads (internal header: engine.cpp, delivery.cpp, worker.cpp).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cache/embedding_cache.h"
#include "engine/engine.h"
#include "engine/job_queue.h"
#include "engine/model_hash.h"
#include "engine/model_runner.h"
#include "engine/result_store.h"
#include "pipeline/pipeline.h"

namespace sdserve::engine {

using SteadyClock = std::chrono::steady_clock;

// Everything the engine knows of one job. Guarded by Engine::Impl::mutex.
struct JobState {
  std::string id;
  JobRequest request;
  uint64_t seed = 0;
  JobStatus status = JobStatus::kQueued;
  JobTimes times;
  SteadyClock::time_point queued_steady;
  SteadyClock::time_point queue_deadline;
  SteadyClock::time_point started_steady;
  SteadyClock::duration run_limit{};  // max_run_s: running longer ends it timed_out
  int images_admitted = 0;            // images handed to a worker so far
  int images_finished = 0;            // images decoded and encoded
  int images_in_flight = 0;           // admitted, not yet stored: in a batch or awaiting encoding
  std::vector<int> evals_done;        // per image
  int evals_per_image = 0;
  // Sampler steps that run per image, every pass (pipeline::steps_in_all_passes): the "steps"
  // of its views and events.
  int steps_total = 0;
  bool cancel_requested = false;
  bool first_step_seen = false;  // the first progress event went out (a metric's moment)
  bool results_evicted = false;  // the result store dropped its images (TTL or byte cap)
  std::string error;
  std::map<uint64_t, EventCallback> subscribers;
  std::vector<int> last_preview;  // per image: evaluations of the newest preview sent
};

// A unit of work for the encoder thread (PNG/JPEG encoding stays off the GPU thread).
struct EncodeTask {
  std::function<void()> run;
  bool droppable = false;
  // Called (without the engine's mutex) when run() throws: an image that cannot be encoded
  // fails its job instead of ending the process.
  std::function<void(const std::string& error)> fail;
};

struct Engine::Impl {
  EngineOptions options;
  std::vector<std::shared_ptr<ModelRunner>> models;
  std::shared_ptr<cache::EmbeddingCache> cache;
  std::unique_ptr<ModelHash> model_hash;  // of the checkpoint file, computed in the background
  // The name jobs use for the default model ("" when options.default_model is unset).
  const std::string& model_name(const JobRequest& request) const {
    return request.model.empty() ? options.default_model : request.model;
  }
  // The A1111 hash of a job's model for its PNG ("" while unknown).
  std::string hash_of(const std::string& model) const;

  mutable std::mutex mutex;         // guards everything below up to the threads
  std::condition_variable work_cv;  // workers wait here for jobs
  std::unique_ptr<JobQueue> queue;
  std::map<std::string, std::shared_ptr<JobState>> jobs;
  ResultStore results;
  EngineStats stats;
  bool stopping = false;    // shutdown began: no new jobs
  bool cancel_all = false;  // shutdown deadline passed
  bool threads_exit = false;
  std::vector<WorkerStatus> worker_status;  // one per model, in order
  // Set at creation, read-only after: the memory an estimated peak may take (0: no check), and
  // where it came from.
  uint64_t memory_budget = 0;
  std::string memory_budget_source;
  uint64_t next_token = 1;
  // Counted up when a job is queued and when a model set's load ends: a worker that found
  // nothing it could run sleeps until one changes.
  uint64_t queue_changes = 0, models_changed = 0;
  std::vector<pipeline::TextualInversionPtr> textual_inversions;  // Engine::set_textual_inversions
  // One per worker: the checkpoints it holds (the default first). Created before the workers;
  // declared after `mutex`, so their loader threads (which lock it) end before it goes.
  std::vector<std::unique_ptr<ModelSet>> model_sets;

  // Events go through one FIFO and one dispatcher thread, so every subscriber sees a job's
  // events in the order the state changed, and engine threads never run network code.
  std::mutex event_mutex;
  std::condition_variable event_cv;
  std::deque<std::pair<JobEvent, std::vector<EventCallback>>> events;  // guarded by event_mutex
  bool events_exit = false;

  std::mutex encode_mutex;
  std::condition_variable encode_cv;
  std::deque<EncodeTask> encode_tasks;               // guarded by encode_mutex
  std::atomic<uint64_t> previews_dropped_behind{0};  // the encoder's preview backlog was full
  bool encode_exit = false;

  std::vector<std::thread> workers;
  std::thread dispatcher;
  std::vector<std::thread> encoders;

  Impl(const EngineOptions& o)
      : results(std::chrono::duration<double>(o.result_ttl_s), o.result_max_bytes) {}

  // --- called with `mutex` held ---
  void emit(JobState& job, JobEvent event);         // to the job's current subscribers
  JobEvent state_event(const JobState& job) const;  // copies scalars only
  static int mean_evals(const JobState& job);       // model evaluations done, per image
  JobSnapshot snapshot(const JobState& job) const;
  void finish(JobState& job, JobStatus status, const std::string& error = "");
  void expire_queued(SteadyClock::time_point now);
  // Ends `job` timed_out when it has run past its run_limit; true when it did (or had).
  bool stop_overrun(JobState& job, SteadyClock::time_point now);
  void stop_overruns(SteadyClock::time_point now);  // every running job
  void forget_old_jobs();
  void fail_images(JobState& job, int images, const std::string& error);
  int workers_in(const std::string& state) const;  // "ready", "failed", "warming_up"
  std::string warm_up_error() const;               // "device: why" of the first failed worker

  // --- no lock needed (read-only state) ---
  // The largest of the models' estimates (ModelRunner::estimate_memory).
  pipeline::MemoryEstimate estimate_memory(int width, int height, int unet_rows,
                                           int decode_images) const;
  // The largest square side whose image of `rows` UNet rows fits memory_budget (0: none).
  int largest_square(int rows) const;
  // Throws pipeline::RequestError (field width, or hires.scale / hires.width / hires.height for
  // a hires fix's second pass) when one of the request's images, alone, exceeds memory_budget
  // at any size it runs at.
  void check_memory(const JobRequest& request) const;

  // --- thread bodies ---
  void worker_loop(size_t index);
  void dispatcher_loop();
  void encoder_loop();
  void post_encode(EncodeTask task);
};

}  // namespace sdserve::engine
