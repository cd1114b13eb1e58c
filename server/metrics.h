// Prometheus metrics: one registry (the seam later issues add metrics to), the HTTP layer's own
// counters, and gauges/counters mirrored from the engine's stats on every scrape.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"

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
  Metrics();
  ~Metrics();

  // A histogram mirrored from counts kept below the server: what was already added.
  struct Mirrored {
    std::vector<uint64_t> counts;
    double sum = 0;
  };

  prometheus::Registry& registry() { return *registry_; }

  void count_request(int status);
  void websocket_opened();
  void websocket_closed();
  void events_dropped(uint64_t n);

  // Refreshes the engine-derived metrics (stats may be null before the model is loaded) and
  // renders the Prometheus text exposition format.
  std::string scrape(const engine::EngineStats* stats, bool ready);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* http_requests_;
  prometheus::Gauge* websockets_;
  prometheus::Counter* dropped_;
  prometheus::Gauge *ready_, *queue_depth_, *running_jobs_, *active_images_, *result_bytes_;
  prometheus::Family<prometheus::Counter>* jobs_;
  prometheus::Counter *unet_steps_, *images_;
  // The embedding cache (issue #9).
  prometheus::Family<prometheus::Counter>* cache_lookups_;
  prometheus::Gauge *cache_bytes_, *cache_entries_, *redis_up_;
  prometheus::Family<prometheus::Counter>* redis_errors_;
  prometheus::Counter* redis_corrupt_;
  prometheus::Histogram *redis_latency_, *text_encode_;
  Mirrored redis_latency_seen_, text_encode_seen_;
  std::mutex scrape_mutex_;  // mirrored counters are advanced by deltas
};

}  // namespace sdserve::server
