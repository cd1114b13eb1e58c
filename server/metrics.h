// Prometheus metrics: one registry (the seam later issues add metrics to), the HTTP layer's own
// counters, and gauges/counters mirrored from the engine's stats on every scrape.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "pipeline/pipeline.h"
#include "server/gpu_monitor.h"

namespace prometheus {
class Registry;
class Counter;
class Gauge;
class Histogram;
template <typename T>
class Family;
}  // namespace prometheus

namespace sdserve::server {

class Metrics {
 public:
  // gpu_interval_s: how often NVML is sampled for the GPU families (0: never); max_queue: the
  // configured queue bound, exported so that dashboards and alerts can compare depth with it.
  explicit Metrics(double gpu_interval_s = 0, int max_queue = 0);
  ~Metrics();

  // A histogram mirrored from counts kept below the server: what was already added.
  struct Mirrored {
    std::vector<uint64_t> counts;
    double sum = 0;
  };

  prometheus::Registry& registry() { return *registry_; }

  // One answered HTTP request: `route` is the route's template ("/v1/jobs/{id}"), never the
  // raw path.
  void count_request(const std::string& route, int status, double seconds);
  // A job refused before it reached the engine (the engine counts its own refusals).
  void job_rejected(const std::string& reason);
  void connection_refused();  // past max_connections
  void websocket_opened();
  void websocket_closed();
  void events_dropped(uint64_t n);

  struct ScrapeInput {
    const engine::EngineStats* stats = nullptr;  // null before the model is loaded
    bool ready = false;
    std::vector<engine::WorkerStatus> workers;
    std::vector<engine::DeviceMemory> memory;
    const pipeline::ModelInfo* model = nullptr;
    int open_connections = 0;
    int models_loaded = 0;  // checkpoints loaded on the workers now, summed over devices
  };
  // Refreshes the engine-derived metrics and renders the Prometheus text exposition format.
  std::string scrape(const ScrapeInput& in);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* http_requests_;
  prometheus::Gauge* websockets_;
  prometheus::Counter* dropped_;
  prometheus::Gauge *ready_, *queue_depth_, *queue_oldest_age_, *running_jobs_, *active_images_,
      *result_bytes_;
  prometheus::Counter* jobs_submitted_;
  prometheus::Family<prometheus::Counter>*jobs_finished_, *jobs_rejected_;
  prometheus::Counter *unet_steps_, *images_, *unet_rows_;
  prometheus::Gauge* models_loaded_;
  prometheus::Family<prometheus::Counter>* model_loads_;
  prometheus::Counter *model_evictions_, *model_load_seconds_;
  prometheus::Family<prometheus::Histogram>* http_duration_;
  // Per job and per model call (engine stats), mirrored like the cache's histograms.
  prometheus::Histogram *queue_wait_, *first_step_, *latency_, *run_time_, *unet_batch_images_,
      *unet_padded_rows_, *vae_decode_, *vae_decode_images_;
  Mirrored queue_wait_seen_, first_step_seen_, latency_seen_, run_time_seen_,
      unet_batch_images_seen_, unet_padded_rows_seen_, vae_decode_seen_, vae_decode_images_seen_;
  prometheus::Family<prometheus::Histogram>* unet_step_;
  std::map<int, Mirrored> unet_step_seen_;  // by batch bucket
  prometheus::Gauge *images_per_second_, *iterations_per_second_;
  prometheus::Family<prometheus::Gauge>* queued_by_priority_;
  prometheus::Family<prometheus::Counter>* previews_;
  struct Progress {
    double t;  // seconds on the steady clock
    uint64_t images, image_steps;
  };
  std::deque<Progress> progress_;  // the rate window
  prometheus::Family<prometheus::Gauge>*worker_ready_, *model_info_, *torch_allocated_,
      *torch_reserved_;
  // GPU families: registered only when NVML is there.
  std::unique_ptr<GpuMonitor> gpus_;
  prometheus::Family<prometheus::Gauge>*gpu_utilization_ = nullptr, *gpu_memory_used_ = nullptr,
  *gpu_memory_total_ = nullptr, *gpu_power_ = nullptr, *gpu_temperature_ = nullptr,
  *gpu_sm_clock_ = nullptr, *gpu_throttled_ = nullptr;
  // The embedding cache (issue #9).
  prometheus::Family<prometheus::Counter>* cache_lookups_;
  prometheus::Gauge *cache_bytes_, *cache_entries_;
  prometheus::Family<prometheus::Gauge>* redis_up_family_;
  prometheus::Family<prometheus::Counter>* redis_errors_;
  prometheus::Counter* redis_corrupt_;
  prometheus::Histogram *redis_latency_, *text_encode_;
  Mirrored redis_latency_seen_, text_encode_seen_;
  // The process (server/process_stats.h).
  prometheus::Gauge *process_resident_, *process_open_fds_, *process_max_fds_, *process_start_;
  prometheus::Counter* process_cpu_;
  prometheus::Gauge* open_connections_;
  prometheus::Counter* connections_refused_;
  std::mutex scrape_mutex_;  // mirrored counters are advanced by deltas
};

}  // namespace sdserve::server
