// The job engine: a bounded priority queue feeding one GPU worker per device (the CPU when there
// is none), each running step-level continuous batching over the images of many jobs.
//
// Thread safety: every public member is safe to call from any thread (the network threads call
// it). Event callbacks run on engine threads and must not block: post to your own executor.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache/embedding_cache.h"
#include "engine/job.h"
#include "engine/model_set.h"
#include "engine/warm_up.h"

namespace sdserve::pipeline {
class Model;
}

namespace sdserve::cache {
class EmbeddingCache;
}

namespace sdserve::engine {

class ModelRunner;  // engine/model_runner.h

struct EngineOptions {
  int max_queue = 64;  // queued jobs; more -> QueueFull (HTTP 429)
  int max_batch = 8;   // images denoised together per worker (fewer where memory is short)
  // The admission policy (admission.h): under light load a worker batches up to the smallest
  // batch size within this fraction of the best images/s measured at warm-up ...
  double light_load_efficiency = 0.9;
  // ... and opens to max_batch when that many images queue or the next job has waited this long.
  double light_load_max_wait_s = 0.25;
  // Finished images per VAE decode call (fewer where memory is short). Each size costs a cuDNN
  // autotune at warm-up; decoding one at a time is ~10% slower per image than 8 at once (~1% of an
  // image's GPU time).
  int decode_batch = 1;
  // Warm-up times UNet steps (for the admission policy) until this many seconds after it began,
  // cheapest first, and estimates the rest from what it measured (engine/warm_up.h). At least
  // one step is timed.
  double warm_up_budget_s = 10;
  std::vector<int> batch_buckets = {1, 2, 4, 8, 16, 32};  // UNet batch sizes are padded up to one
  double default_timeout_s = 600;  // a job still queued after this ends `expired`
  double max_timeout_s = 3600;
  // A running job (from its first image's start) past this many seconds, or its request's
  // smaller max_run_s, stops between UNet steps and ends `timed_out`.
  double max_run_s = 3600;
  // Memory an estimated peak (pipeline/memory.h) may take. A request is refused (RequestError
  // on width) only when one of its images cannot fit alone (its UNet call, with CFG if it asks
  // for guidance, beside its decode); a worker merges images into a UNet call, and decodes them,
  // only as far as the estimates fit, so images that do not fit together run one call after
  // another (memory_plan.h). 0: what the devices have free when the engine starts (the least of
  // them), or no limit where that cannot be read.
  uint64_t max_memory_bytes = 0;
  // Several checkpoints (a models folder). Jobs whose request names no model, or
  // `default_model`, run on the models given to create() (one per worker, loaded and warmed up
  // at start, never evicted); another is loaded on a worker when a job for it comes up in its
  // queue (engine/model_set.h), within `model_memory_bytes` of weights per device (0: no bound).
  std::string default_model;
  ModelLoader load_model;  // unset: jobs for other models fail (no such model)
  // What a model is without loading it (its family, native size, text layers): a request's
  // limits at submission. Throws pipeline::RequestError (field "model") for one that cannot run.
  std::function<pipeline::ModelInfo(const std::string& name)> describe_model;
  // The model's A1111 hash (AutoV2) for the PNG's parameters, "" while unknown; unset: the
  // default model's file, hashed in the background.
  std::function<std::string(const std::string& name)> model_hash;
  uint64_t model_memory_bytes = 0;
  // Reads a LoRA file (JobRequest::Lora::path) for a job; throws pipeline::ModelError. Unset:
  // jobs with LoRAs are refused.
  // (The engine calls no Lora member itself: its torch-free build for the sanitizers links none.)
  struct LoadedLora {
    std::shared_ptr<const pipeline::Lora> file;
    bool text_encoder = false;  // pipeline::LoraInfo::text_encoder
  };
  std::function<LoadedLora(const std::string& path)> load_lora;
  double result_ttl_s = 3600;              // finished images are kept this long
  uint64_t result_max_bytes = 1ull << 30;  // ... and within this many PNG bytes (oldest go first)
};

class QueueFull : public std::runtime_error {
 public:
  QueueFull(const std::string& what, double retry_after_s)
      : std::runtime_error(what), retry_after_s(retry_after_s) {}
  double retry_after_s;
};

class ShuttingDown : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// No worker can run jobs (every warm-up failed).
class Unavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A message for users from an exception's text: the first line only (torch appends a C++
// backtrace with addresses), at most 500 bytes. The whole text goes to the log.
std::string public_error(const std::string& what);

// How far a worker's warm-up is, for /readyz.
struct WarmUpStatus {
  // "generating" (a short generation), "decoder" (the decoder thread's first decodes), "timing"
  // (UNet steps by batch size), "done", "stopped" (by shutdown) or "failed".
  std::string phase = "starting";
  double elapsed_s = 0;  // since the warm-up began; its length once over (Engine::workers())
  std::chrono::steady_clock::time_point started;  // when it began
  bool over = false;                              // done, stopped or failed
  double budget_s = 0;                            // EngineOptions::warm_up_budget_s
  // The steps timed so far, in order; once done, also the native size's estimated ones.
  std::vector<StepTiming> steps;
};

// One worker (one device) as /readyz reports it.
struct WorkerStatus {
  std::string device;                // "cuda:0", "cpu"
  std::string state = "warming_up";  // "warming_up" | "ready" | "failed"
  std::string error;                 // why, when failed
  int light_load_batch = 0;          // the admission policy's light-load cap, once ready
  WarmUpStatus warm_up;
};

// The torch allocator's bytes on one worker's device (zero on the CPU).
struct DeviceMemory {
  std::string device;
  uint64_t allocated = 0, reserved = 0;
};

enum class ImageLookup { kOk, kUnknownJob, kNotReady, kNoSuchImage, kEvicted };

struct ImageResult {
  ImageLookup status = ImageLookup::kUnknownJob;
  std::shared_ptr<const std::vector<uint8_t>> png;
};

// Seconds from 10 ms to 10 min: a job's waits and latencies.
inline std::vector<double> job_latency_buckets() {
  return {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600};
}
// Images per UNet call: the batch buckets' sizes.
inline std::vector<double> batch_size_buckets() {
  return {1, 2, 4, 8, 16, 32, 64};
}
// Padding rows per UNet step: none, or up to half a bucket of 128 rows.
inline std::vector<double> padding_row_buckets() {
  return {0, 1, 2, 4, 8, 16, 32, 64};
}

struct EngineStats {
  int queued = 0;
  double oldest_queued_s = 0;  // how long the oldest job not yet started has waited
  int running_jobs = 0;
  int active_images = 0;
  uint64_t jobs_submitted = 0, jobs_succeeded = 0, jobs_failed = 0, jobs_cancelled = 0,
           jobs_expired = 0, jobs_timed_out = 0;
  uint64_t jobs_rejected_queue_full = 0, jobs_rejected_unavailable = 0;  // refused by submit()
  uint64_t unet_steps = 0;                                               // UNet calls
  uint64_t image_steps = 0;  // images stepped, summed over UNet calls
  uint64_t images_done = 0;
  uint64_t result_bytes = 0;
  // Previews: sent to the job's subscribers; dropped (the encoder fell behind, or a newer one
  // was already sent).
  uint64_t previews_sent = 0, previews_dropped = 0;
  // Checkpoints loaded, failed to load and evicted on every worker since start, and the seconds
  // the loads took.
  ModelSetStats models;
  int queued_by_priority[3] = {0, 0, 0};  // queued jobs, index = Priority (high, normal, low)
  cache::HistogramCounts text_encode{cache::fast_latency_buckets()};  // seconds per encoder call
  // Per job, seconds: queued -> first image admitted, queued -> first progress event, queued ->
  // succeeded (end to end), admitted -> succeeded.
  cache::HistogramCounts queue_wait{job_latency_buckets()}, first_step{job_latency_buckets()},
      latency{job_latency_buckets()}, run_time{job_latency_buckets()};
  // Per UNet call: images in it, and the call's seconds (the device's step time under load: a
  // call returns when the previous step is done); per VAE decode call, seconds and images.
  cache::HistogramCounts unet_batch_images{batch_size_buckets()},
      vae_decode{cache::fast_latency_buckets()}, vae_decode_images{batch_size_buckets()};
  // Per step: rows of padding CUDA graph buckets added; and the rows computed for images (one per
  // image, two with CFG), summed.
  cache::HistogramCounts unet_padded_rows{padding_row_buckets()};
  uint64_t unet_rows = 0;
  // UNet call seconds by batch bucket (the smallest of batch_buckets holding the call's images;
  // 0 past the largest): step times are only comparable within one.
  std::map<int, cache::HistogramCounts> unet_step;
  cache::CacheStats embedding_cache;
};

using EventCallback = std::function<void(const JobEvent&)>;

class Engine {
 public:
  // One worker per model (each model lives on its own device). Starts the worker threads.
  static std::unique_ptr<Engine> create(const EngineOptions& options,
                                        std::vector<std::shared_ptr<ModelRunner>> models,
                                        std::shared_ptr<cache::EmbeddingCache> cache);
  // The same over the pipeline's models (engine/pipeline_runner.cpp).
  static std::unique_ptr<Engine> create(const EngineOptions& options,
                                        std::vector<std::shared_ptr<pipeline::Model>> models,
                                        std::shared_ptr<cache::EmbeddingCache> cache);
  ~Engine();  // cancels what is left and joins the workers

  // Queues a validated request. Throws QueueFull, ShuttingDown, or std::invalid_argument for a
  // request the model cannot run (message names the field).
  JobSnapshot submit(JobRequest request);
  std::optional<JobSnapshot> get(const std::string& id) const;
  // Cancels a queued or running job (a running one stops at its next step). False when the job
  // is unknown or already final.
  bool cancel(const std::string& id);
  ImageResult image(const std::string& id, int index) const;

  // Calls `callback` with the job's current state as an event first (a late client catches up),
  // then with every later event. Returns 0 for an unknown job, else a token for unsubscribe.
  uint64_t subscribe(const std::string& id, EventCallback callback);
  // A job that asked cancel_on_disconnect is cancelled when its last subscriber leaves.
  // A callback already being delivered may still run after unsubscribe() returns: whatever it
  // captures must stay alive until then (the server's sessions hold themselves by shared_ptr).
  void unsubscribe(const std::string& id, uint64_t token);

  EngineStats stats() const;
  // At least one worker warmed up and the engine is not shutting down. A worker whose warm-up
  // failed takes no jobs; the others serve.
  bool ready() const;
  std::vector<WorkerStatus> workers() const;
  std::vector<DeviceMemory> device_memory() const;  // one per worker, any thread
  // The textual-inversion embeddings prompts may call by name, on every model loaded now and
  // later (a models folder's embeddings/, after each refresh).
  void set_textual_inversions(std::vector<pipeline::TextualInversionPtr> list);
  // Every model loaded on a worker now (the default's name is EngineOptions::default_model).
  std::vector<LoadedModel> loaded_models() const;
  // SHA-256 of the single-file checkpoint (A1111's model hash is its first 10 digits), computed
  // in the background after start; "" until then, and for a diffusers folder.
  std::string model_sha256() const;
  // Empty while warm-up goes well; else the first failure, "device: why".
  std::string warm_up_error() const;
  // True once every worker has either warmed up or failed to.
  bool warm_up_done() const;

  // Graceful shutdown: refuse new jobs (ShuttingDown), let queued and running jobs finish until
  // `deadline`, then cancel the rest. Returns when every worker is idle.
  void shutdown(std::chrono::steady_clock::time_point deadline);

  struct Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sdserve::engine
