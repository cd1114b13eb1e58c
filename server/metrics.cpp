#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

namespace sdserve::server {
namespace {

// Counters only go up: advance `c` to the engine's absolute value.
void advance(prometheus::Counter& c, uint64_t value) {
  const double delta = static_cast<double>(value) - c.Value();
  if (delta > 0) c.Increment(delta);
}

}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
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
  jobs_ = &BuildCounter()
               .Name("sdserve_jobs_total")
               .Help("Jobs by outcome (submitted, succeeded, failed, cancelled, expired)")
               .Register(r);
  unet_steps_ = &BuildCounter()
                     .Name("sdserve_unet_steps_total")
                     .Help("UNet batch evaluations")
                     .Register(r)
                     .Add({});
  images_ =
      &BuildCounter().Name("sdserve_images_total").Help("Images finished").Register(r).Add({});

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
  redis_up_ = &BuildGauge()
                   .Name("sdserve_redis_up")
                   .Help("1 while the shared embedding cache's Redis answers (0 also when unset)")
                   .Register(r)
                   .Add({});
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

void Metrics::count_request(int status) {
  http_requests_->Add({{"code", std::to_string(status)}}).Increment();
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

std::string Metrics::scrape(const engine::EngineStats* stats, bool ready) {
  std::lock_guard<std::mutex> lock(scrape_mutex_);
  ready_->Set(ready ? 1 : 0);
  if (stats) {
    queue_depth_->Set(stats->queued);
    running_jobs_->Set(stats->running_jobs);
    active_images_->Set(stats->active_images);
    result_bytes_->Set(static_cast<double>(stats->result_bytes));
    advance(jobs_->Add({{"status", "submitted"}}), stats->jobs_submitted);
    advance(jobs_->Add({{"status", "succeeded"}}), stats->jobs_succeeded);
    advance(jobs_->Add({{"status", "failed"}}), stats->jobs_failed);
    advance(jobs_->Add({{"status", "cancelled"}}), stats->jobs_cancelled);
    advance(jobs_->Add({{"status", "expired"}}), stats->jobs_expired);
    advance(*unet_steps_, stats->unet_steps);
    advance(*images_, stats->images_done);
    const auto& c = stats->embedding_cache;
    advance(cache_lookups_->Add({{"tier", "memory"}, {"result", "hit"}}), c.memory_hits);
    advance(cache_lookups_->Add({{"tier", "memory"}, {"result", "miss"}}), c.memory_misses);
    advance(cache_lookups_->Add({{"tier", "redis"}, {"result", "hit"}}), c.redis_hits);
    advance(cache_lookups_->Add({{"tier", "redis"}, {"result", "miss"}}), c.redis_misses);
    cache_bytes_->Set(static_cast<double>(c.bytes));
    cache_entries_->Set(static_cast<double>(c.entries));
    redis_up_->Set(c.redis_up ? 1 : 0);
    for (const auto& [kind, n] : c.redis_errors) advance(redis_errors_->Add({{"kind", kind}}), n);
    advance(*redis_corrupt_, c.redis_corrupt);
    mirror(*redis_latency_, c.redis_latency, redis_latency_seen_);
    mirror(*text_encode_, stats->text_encode, text_encode_seen_);
  }
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace sdserve::server
