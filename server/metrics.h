// Prometheus metrics: one registry (the seam later issues add metrics to), the HTTP layer's own
// counters, and gauges/counters mirrored from the engine's stats on every scrape.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "engine/engine.h"

namespace prometheus {
class Registry;
class Counter;
class Gauge;
template <typename T>
class Family;
}  // namespace prometheus

namespace sdserve::server {

class Metrics {
 public:
  Metrics();
  ~Metrics();

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
  std::mutex scrape_mutex_;  // mirrored counters are advanced by deltas
};

}  // namespace sdserve::server
