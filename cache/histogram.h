// Counts of observations in fixed buckets, for latency histograms measured in code that does not
// link Prometheus (the cache and the engine are leaves below the server); the server's /metrics
// mirrors them into prometheus-cpp histograms by deltas.
#pragma once

#include <cstdint>
#include <vector>

namespace sdserve::cache {

struct HistogramCounts {
  std::vector<double> bounds;    // upper bounds, ascending (Prometheus `le`, without +Inf)
  std::vector<uint64_t> counts;  // per bucket, not cumulative; one more than bounds (+Inf)
  double sum = 0;

  explicit HistogramCounts(std::vector<double> b = {})
      : bounds(std::move(b)), counts(bounds.size() + 1, 0) {}
  void observe(double v) {
    size_t i = 0;
    while (i < bounds.size() && v > bounds[i]) ++i;
    ++counts[i];
    sum += v;
  }
};

// Seconds from 0.5 ms to 10 s: Redis round trips and text encoding both live here.
inline std::vector<double> fast_latency_buckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10};
}

}  // namespace sdserve::cache
