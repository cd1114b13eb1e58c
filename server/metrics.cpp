#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <chrono>
#include <map>

#include "pipeline/bench_support.h"
#include "server/process_stats.h"

namespace sdserve::server {
namespace {

// Counters only go up: advance `c` to the engine's absolute value.
void advance(prometheus::Counter& c, uint64_t value) {
  const double delta = static_cast<double>(value) - c.Value();
  if (delta > 0) c.Increment(delta);
}

}  // namespace

namespace {
double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Metrics::Metrics(double gpu_interval_s, int max_queue)
    : registry_(std::make_shared<prometheus::Registry>()) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  auto& r = *registry_;
  http_requests_ = &BuildCounter()
                        .Name("sdserve_http_requests_total")
                        .Help("HTTP requests answered, by status code")
                        .Register(r);
  websockets_ = &BuildGauge()
                     .Name("sdserve_websocket_connections")
                     .Help("Open WebSocket connections")
                     .Register(r)
                     .Add({});
  dropped_ = &BuildCounter()
                  .Name("sdserve_websocket_events_dropped_total")
                  .Help("Progress/preview events dropped for slow WebSocket readers")
                  .Register(r)
                  .Add({});
  ready_ = &BuildGauge()
                .Name("sdserve_ready")
                .Help("1 once the model is loaded and warm")
                .Register(r)
                .Add({});
  queue_depth_ = &BuildGauge()
                      .Name("sdserve_queue_depth")
                      .Help("Jobs waiting in the queue")
                      .Register(r)
                      .Add({});
  queue_oldest_age_ = &BuildGauge()
                           .Name("sdserve_queue_oldest_job_age_seconds")
                           .Help(
                               "How long the oldest job still waiting to start has waited (0 "
                               "with none waiting)")
                           .Register(r)
                           .Add({});
  running_jobs_ =
      &BuildGauge().Name("sdserve_running_jobs").Help("Jobs being denoised").Register(r).Add({});
  active_images_ = &BuildGauge()
                        .Name("sdserve_active_images")
                        .Help("Images in the workers' batches")
                        .Register(r)
                        .Add({});
  result_bytes_ = &BuildGauge()
                       .Name("sdserve_result_store_bytes")
                       .Help("PNG bytes held for finished jobs")
                       .Register(r)
                       .Add({});
  jobs_submitted_ = &BuildCounter()
                         .Name("sdserve_jobs_submitted_total")
                         .Help("Jobs accepted into the queue")
                         .Register(r)
                         .Add({});
  jobs_finished_ =
      &BuildCounter()
           .Name("sdserve_jobs_finished_total")
           .Help("Jobs ended, by status (succeeded, failed, cancelled, expired, timed_out)")
           .Register(r);
  jobs_rejected_ = &BuildCounter()
                        .Name("sdserve_jobs_rejected_total")
                        .Help(
                            "Jobs refused at submission, by reason (queue_full, invalid, "
                            "unavailable)")
                        .Register(r);
  auto histogram = [&](const char* name, const char* help, const std::vector<double>& bounds) {
    return &prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add({}, bounds);
  };
  const auto job_buckets = engine::job_latency_buckets();
  queue_wait_ = histogram("sdserve_job_queue_wait_seconds",
                          "Per job: queued until its first image was admitted", job_buckets);
  first_step_ = histogram("sdserve_job_first_step_seconds",
                          "Per job: queued until its first progress event", job_buckets);
  latency_ = histogram("sdserve_job_latency_seconds",
                       "Per succeeded job: queued until its last image was stored (end to end)",
                       job_buckets);
  run_time_ =
      histogram("sdserve_job_run_seconds",
                "Per succeeded job: first image admitted until the last was stored", job_buckets);
  unet_batch_images_ =
      histogram("sdserve_unet_batch_images", "Images per UNet call", engine::batch_size_buckets());
  unet_padded_rows_ =
      histogram("sdserve_unet_padded_rows",
                "Rows of padding per UNet step: CUDA graphs round a step's rows (one "
                "per image, two with CFG) up to a batch bucket; 0 on the CPU",
                engine::padding_row_buckets());
  unet_rows_ = &BuildCounter()
                    .Name("sdserve_unet_rows_total")
                    .Help(
                        "UNet rows computed for images (one per image per step, two with CFG), "
                        "padding not included")
                    .Register(r)
                    .Add({});
  unet_step_ = &prometheus::BuildHistogram()
                    .Name("sdserve_unet_step_seconds")
                    .Help("UNet calls by batch bucket (under load: the device's step time)")
                    .Register(r);
  vae_decode_ =
      histogram("sdserve_vae_decode_seconds", "VAE decode calls", cache::fast_latency_buckets());
  vae_decode_images_ = histogram("sdserve_vae_decode_images", "Images per VAE decode call",
                                 engine::batch_size_buckets());
  images_per_second_ = &BuildGauge()
                            .Name("sdserve_images_per_second")
                            .Help("Images finished per second over the last minute")
                            .Register(r)
                            .Add({});
  iterations_per_second_ = &BuildGauge()
                                .Name("sdserve_iterations_per_second")
                                .Help(
                                    "Denoising steps per second, summed over the images, over "
                                    "the last minute")
                                .Register(r)
                                .Add({});
  queued_by_priority_ = &BuildGauge()
                             .Name("sdserve_queued_jobs")
                             .Help("Jobs waiting to start, by priority (high, normal, low)")
                             .Register(r);
  previews_ = &BuildCounter()
                   .Name("sdserve_previews_total")
                   .Help(
                       "Step previews: sent to subscribers, or dropped (the encoder fell "
                       "behind, or a newer one was sent)")
                   .Register(r);
  http_duration_ = &prometheus::BuildHistogram()
                        .Name("sdserve_http_request_duration_seconds")
                        .Help(
                            "HTTP requests, header read to response queued, by route "
                            "template and status class")
                        .Register(r);
  worker_ready_ = &BuildGauge()
                       .Name("sdserve_worker_ready")
                       .Help("Per device: 1 when its worker has warmed up and takes jobs")
                       .Register(r);
  // The process families other exporters give (client_golang's names), read from /proc.
  auto process_gauge = [&](const char* name, const char* help) {
    return &BuildGauge().Name(name).Help(help).Register(r).Add({});
  };
  process_resident_ =
      process_gauge("process_resident_memory_bytes", "Resident memory size in bytes");
  process_open_fds_ = process_gauge("process_open_fds", "Number of open file descriptors");
  process_max_fds_ = process_gauge("process_max_fds", "Maximum number of open file descriptors");
  process_start_ = process_gauge("process_start_time_seconds",
                                 "Start time of the process since the Unix epoch in seconds");
  process_cpu_ = &BuildCounter()
                      .Name("process_cpu_seconds_total")
                      .Help("Total user and system CPU time spent in seconds")
                      .Register(r)
                      .Add({});
  open_connections_ = &BuildGauge()
                           .Name("sdserve_open_connections")
                           .Help("Open HTTP and WebSocket connections (at most max_connections)")
                           .Register(r)
                           .Add({});
  connections_refused_ =
      &BuildCounter()
           .Name("sdserve_connections_refused_total")
           .Help("Connections answered 503 and closed: max_connections were open")
           .Register(r)
           .Add({});
  BuildGauge()
      .Name("sdserve_max_queue")
      .Help("The configured bound of waiting jobs (max_queue)")
      .Register(r)
      .Add({})
      .Set(max_queue);
  BuildGauge()
      .Name("sdserve_build_info")
      .Help("Always 1; the labels say what was built")
      .Register(r)
      .Add({{"version", SDSERVE_VERSION},
            {"torch", pipeline::bench_support::torch_version()},
            {"cuda", pipeline::bench_support::cuda_version()}})
      .Set(1);
  model_info_ = &BuildGauge()
                     .Name("sdserve_model_info")
                     .Help("Always 1 once the model is loaded; the labels describe it")
                     .Register(r);
  torch_allocated_ = &BuildGauge()
                          .Name("sdserve_torch_allocated_bytes")
                          .Help("Per device: bytes torch's allocator has handed out")
                          .Register(r);
  torch_reserved_ = &BuildGauge()
                         .Name("sdserve_torch_reserved_bytes")
                         .Help("Per device: bytes torch's allocator holds from the driver")
                         .Register(r);
  gpus_ = std::make_unique<GpuMonitor>(gpu_interval_s);
  if (gpus_->available()) {
    auto gpu_gauge = [&](const char* name, const char* help) {
      return &BuildGauge().Name(name).Help(help).Register(r);
    };
    gpu_utilization_ = gpu_gauge("sdserve_gpu_utilization_ratio",
                                 "Per GPU (NVML): share of the last sample period with a kernel "
                                 "running");
    gpu_memory_used_ = gpu_gauge("sdserve_gpu_memory_used_bytes", "Per GPU (NVML): memory used");
    gpu_memory_total_ =
        gpu_gauge("sdserve_gpu_memory_total_bytes", "Per GPU (NVML): memory installed");
    gpu_power_ = gpu_gauge("sdserve_gpu_power_watts", "Per GPU (NVML): power draw");
    gpu_temperature_ =
        gpu_gauge("sdserve_gpu_temperature_celsius", "Per GPU (NVML): core temperature");
    gpu_sm_clock_ = gpu_gauge("sdserve_gpu_sm_clock_hertz", "Per GPU (NVML): SM clock");
    gpu_throttled_ = gpu_gauge("sdserve_gpu_clocks_throttled",
                               "Per GPU (NVML): 1 while the clocks are held down, by cause "
                               "(thermal: heat or hardware slowdown; power: power cap or brake)");
  }
  unet_steps_ = &BuildCounter()
                     .Name("sdserve_unet_steps_total")
                     .Help("UNet batch evaluations")
                     .Register(r)
                     .Add({});
  images_ =
      &BuildCounter().Name("sdserve_images_total").Help("Images finished").Register(r).Add({});
  models_loaded_ = &prometheus::BuildGauge()
                        .Name("sdserve_models_loaded")
                        .Help("Checkpoints loaded on the workers, summed over devices")
                        .Register(r)
                        .Add({});
  model_loads_ = &BuildCounter()
                      .Name("sdserve_model_loads_total")
                      .Help(
                          "Checkpoints loaded on first use (result: ok | failed), beyond the "
                          "default loaded at start")
                      .Register(r);
  model_evictions_ = &BuildCounter()
                          .Name("sdserve_model_evictions_total")
                          .Help("Checkpoints evicted to make room (model_memory_mb)")
                          .Register(r)
                          .Add({});
  model_load_seconds_ = &BuildCounter()
                             .Name("sdserve_model_load_seconds_total")
                             .Help("Seconds spent loading checkpoints on first use")
                             .Register(r)
                             .Add({});

  cache_lookups_ = &BuildCounter()
                        .Name("sdserve_embedding_cache_lookups_total")
                        .Help("Prompt embedding lookups by tier (memory, redis) and result")
                        .Register(r);
  cache_bytes_ = &BuildGauge()
                      .Name("sdserve_embedding_cache_bytes")
                      .Help("Bytes of prompt embeddings in the in-process cache")
                      .Register(r)
                      .Add({});
  cache_entries_ = &BuildGauge()
                        .Name("sdserve_embedding_cache_entries")
                        .Help("Prompt embeddings in the in-process cache")
                        .Register(r)
                        .Add({});
  // No series at all without a Redis configured, so that an alert on 0 means a real outage.
  redis_up_family_ = &BuildGauge()
                          .Name("sdserve_redis_up")
                          .Help(
                              "1 while the shared embedding cache's Redis answers, 0 while it "
                              "does not (absent when no redis_url is set)")
                          .Register(r);
  redis_errors_ = &BuildCounter()
                       .Name("sdserve_redis_errors_total")
                       .Help("Redis failures by kind (connect, timeout, io, protocol, reply)")
                       .Register(r);
  redis_corrupt_ = &BuildCounter()
                        .Name("sdserve_redis_corrupt_values_total")
                        .Help("Values in Redis that were not a valid embedding (ignored)")
                        .Register(r)
                        .Add({});
  redis_latency_ = &prometheus::BuildHistogram()
                        .Name("sdserve_redis_latency_seconds")
                        .Help("Redis command round trips")
                        .Register(r)
                        .Add({}, cache::fast_latency_buckets());
  text_encode_ = &prometheus::BuildHistogram()
                      .Name("sdserve_text_encode_seconds")
                      .Help("Text-encoder calls (the cache's misses, batched)")
                      .Register(r)
                      .Add({}, cache::fast_latency_buckets());
  // The rate window starts at zero work now, so the first scrape reports the rate since start
  // rather than nothing; later scrapes slide it to the last minute.
  progress_.push_back({steady_seconds(), 0, 0});
}

namespace {

// Adds to `h` what `now` holds beyond `seen` (counts only grow).
void mirror(prometheus::Histogram& h, const cache::HistogramCounts& now, Metrics::Mirrored& seen) {
  if (seen.counts.size() != now.counts.size()) seen.counts.assign(now.counts.size(), 0);
  std::vector<double> delta(now.counts.size());
  bool any = false;
  for (size_t i = 0; i < now.counts.size(); ++i) {
    delta[i] = static_cast<double>(now.counts[i] - seen.counts[i]);
    any = any || delta[i] > 0;
  }
  if (!any) return;
  h.ObserveMultiple(delta, now.sum - seen.sum);
  seen.counts = now.counts;
  seen.sum = now.sum;
}

}  // namespace

Metrics::~Metrics() = default;

void Metrics::count_request(const std::string& route, int status, double seconds) {
  http_requests_->Add({{"code", std::to_string(status)}}).Increment();
  static const std::vector<double> bounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                             0.5,   1,      2.5,   5,    10,    30,   60,  300};
  http_duration_->Add({{"route", route}, {"code", std::to_string(status / 100) + "xx"}}, bounds)
      .Observe(seconds);
}
void Metrics::job_rejected(const std::string& reason) {
  jobs_rejected_->Add({{"reason", reason}}).Increment();
}
void Metrics::connection_refused() {
  connections_refused_->Increment();
}

void Metrics::websocket_opened() {
  websockets_->Increment();
}
void Metrics::websocket_closed() {
  websockets_->Decrement();
}
void Metrics::events_dropped(uint64_t n) {
  dropped_->Increment(static_cast<double>(n));
}

std::string Metrics::scrape(const ScrapeInput& in) {
  std::lock_guard<std::mutex> lock(scrape_mutex_);
  const ProcessStats p = read_process_stats();
  const auto set = [](prometheus::Gauge* g, double v) {
    if (v >= 0) g->Set(v);
  };
  set(process_resident_, p.resident_bytes);
  set(process_open_fds_, p.open_fds);
  set(process_max_fds_, p.max_fds);
  set(process_start_, p.start_time_s);
  if (p.cpu_seconds > process_cpu_->Value())
    process_cpu_->Increment(p.cpu_seconds - process_cpu_->Value());
  open_connections_->Set(in.open_connections);
  ready_->Set(in.ready ? 1 : 0);
  for (const auto& w : in.workers)
    worker_ready_->Add({{"device", w.device}}).Set(w.state == "ready" ? 1 : 0);
  for (const auto& m : in.memory) {
    torch_allocated_->Add({{"device", m.device}}).Set(static_cast<double>(m.allocated));
    torch_reserved_->Add({{"device", m.device}}).Set(static_cast<double>(m.reserved));
  }
  if (in.model) {
    const auto& i = *in.model;
    model_info_
        ->Add(
            {{"name", i.name}, {"family", i.family}, {"dtype", i.precision}, {"device", i.device}})
        .Set(1);
  }
  if (gpus_->available()) {
    for (const auto& g : gpus_->latest()) {
      const std::map<std::string, std::string> labels = {{"gpu", std::to_string(g.index)},
                                                         {"name", g.name}};
      auto set = [&](prometheus::Family<prometheus::Gauge>* f, double v) {
        if (v >= 0) f->Add(labels).Set(v);
      };
      set(gpu_utilization_, g.utilization);
      set(gpu_memory_used_, g.memory_used);
      set(gpu_memory_total_, g.memory_total);
      set(gpu_power_, g.power_watts);
      set(gpu_temperature_, g.temperature_celsius);
      set(gpu_sm_clock_, g.sm_clock_hertz);
      for (const auto& [cause, value] :
           {std::pair{"thermal", g.thermal_throttled}, std::pair{"power", g.power_throttled}}) {
        if (value < 0) continue;
        auto with_cause = labels;
        with_cause["cause"] = cause;
        gpu_throttled_->Add(with_cause).Set(value);
      }
    }
  }
  if (const engine::EngineStats* stats = in.stats) {
    queue_depth_->Set(stats->queued);
    queue_oldest_age_->Set(stats->oldest_queued_s);
    running_jobs_->Set(stats->running_jobs);
    active_images_->Set(stats->active_images);
    result_bytes_->Set(static_cast<double>(stats->result_bytes));
    advance(*jobs_submitted_, stats->jobs_submitted);
    advance(jobs_finished_->Add({{"status", "succeeded"}}), stats->jobs_succeeded);
    advance(jobs_finished_->Add({{"status", "failed"}}), stats->jobs_failed);
    advance(jobs_finished_->Add({{"status", "cancelled"}}), stats->jobs_cancelled);
    advance(jobs_finished_->Add({{"status", "expired"}}), stats->jobs_expired);
    advance(jobs_finished_->Add({{"status", "timed_out"}}), stats->jobs_timed_out);
    advance(jobs_rejected_->Add({{"reason", "queue_full"}}), stats->jobs_rejected_queue_full);
    advance(jobs_rejected_->Add({{"reason", "unavailable"}}), stats->jobs_rejected_unavailable);
    for (int level = 0; level < 3; ++level) {
      queued_by_priority_
          ->Add({{"priority", engine::to_string(static_cast<engine::Priority>(level))}})
          .Set(stats->queued_by_priority[level]);
    }
    advance(previews_->Add({{"result", "sent"}}), stats->previews_sent);
    models_loaded_->Set(in.models_loaded);
    advance(model_loads_->Add({{"result", "ok"}}), stats->models.loads);
    advance(model_loads_->Add({{"result", "failed"}}), stats->models.load_failures);
    advance(*model_evictions_, stats->models.evictions);
    if (stats->models.load_seconds > model_load_seconds_->Value())
      model_load_seconds_->Increment(stats->models.load_seconds - model_load_seconds_->Value());
    advance(previews_->Add({{"result", "dropped"}}), stats->previews_dropped);
    mirror(*queue_wait_, stats->queue_wait, queue_wait_seen_);
    mirror(*first_step_, stats->first_step, first_step_seen_);
    mirror(*latency_, stats->latency, latency_seen_);
    mirror(*run_time_, stats->run_time, run_time_seen_);
    mirror(*unet_batch_images_, stats->unet_batch_images, unet_batch_images_seen_);
    mirror(*unet_padded_rows_, stats->unet_padded_rows, unet_padded_rows_seen_);
    advance(*unet_rows_, stats->unet_rows);
    for (const auto& [bucket, counts] : stats->unet_step) {
      mirror(unet_step_->Add({{"bucket", std::to_string(bucket)}}, cache::fast_latency_buckets()),
             counts, unet_step_seen_[bucket]);
    }
    mirror(*vae_decode_, stats->vae_decode, vae_decode_seen_);
    mirror(*vae_decode_images_, stats->vae_decode_images, vae_decode_images_seen_);
    // Rates over the last minute of scrapes (since start on the first).
    const double now = steady_seconds();
    progress_.push_back({now, stats->images_done, stats->image_steps});
    while (progress_.size() > 2 && now - progress_[1].t >= 60) progress_.pop_front();
    const auto& first = progress_.front();
    const double dt = now - first.t;
    images_per_second_->Set(dt > 0 ? static_cast<double>(stats->images_done - first.images) / dt
                                   : 0);
    iterations_per_second_->Set(
        dt > 0 ? static_cast<double>(stats->image_steps - first.image_steps) / dt : 0);
    advance(*unet_steps_, stats->unet_steps);
    advance(*images_, stats->images_done);
    const auto& c = stats->embedding_cache;
    advance(cache_lookups_->Add({{"tier", "memory"}, {"result", "hit"}}), c.memory_hits);
    advance(cache_lookups_->Add({{"tier", "memory"}, {"result", "miss"}}), c.memory_misses);
    advance(cache_lookups_->Add({{"tier", "redis"}, {"result", "hit"}}), c.redis_hits);
    advance(cache_lookups_->Add({{"tier", "redis"}, {"result", "miss"}}), c.redis_misses);
    cache_bytes_->Set(static_cast<double>(c.bytes));
    cache_entries_->Set(static_cast<double>(c.entries));
    if (c.redis_configured) redis_up_family_->Add({}).Set(c.redis_up ? 1 : 0);
    for (const auto& [kind, n] : c.redis_errors) advance(redis_errors_->Add({{"kind", kind}}), n);
    advance(*redis_corrupt_, c.redis_corrupt);
    mirror(*redis_latency_, c.redis_latency, redis_latency_seen_);
    mirror(*text_encode_, stats->text_encode, text_encode_seen_);
  }
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace sdserve::server
