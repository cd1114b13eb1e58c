// How many images a worker lets into its active set: the latency-aware admission policy.
//
// A bigger UNet batch gives more images per second but makes every image in it slower (on an
// H200 at 512x512 a step of 16 images takes 9x as long as a step of one, for 1.8x the
// throughput). Under light load a worker batches up to its *light-load batch*: the smallest
// batch size whose measured images/s is within `efficiency` of the best one (8 on the H200:
// 93% of the throughput of 16, at half its step time). When work piles up, a worker opens to
// max_batch until its queue drains: throughput under heavy load. docs/ARCHITECTURE.md
// (scheduling) has the reasoning and the simulation behind the defaults.
#pragma once

#include <vector>

namespace sdserve::engine {

struct AdmissionOptions {
  int max_batch = 8;
  // Light load: batch up to the smallest size within this fraction of the best images/s.
  double efficiency = 0.9;
  // Heavy load: the queued work reaches one light-load batch, or its oldest job has waited this
  // long. 0 admits up to max_batch whenever anything waits (pure throughput).
  double max_wait_s = 0.35;
};

// The smallest of `sizes` (ascending, each <= max_batch) whose images per second
// (size / seconds) is at least `efficiency` of the best; max_batch when nothing was measured.
int light_load_batch(const std::vector<int>& sizes, const std::vector<double>& seconds,
                     double efficiency, int max_batch);

// One worker's policy. Not thread-safe: the worker calls it with the engine's mutex held.
class AdmissionPolicy {
 public:
  AdmissionPolicy(const AdmissionOptions& options, int light_load_batch)
      : options_(options), light_(light_load_batch) {}
  // How many images the active set may hold this turn, given the images waiting in the queue
  // and how long its oldest job has waited.
  int cap(int queued_images, double oldest_wait_s);
  // After admitting: an empty queue ends heavy-load mode.
  void queue_drained() { open_ = false; }
  int light_load_batch() const { return light_; }
  bool open() const { return open_; }

 private:
  AdmissionOptions options_;
  int light_;
  bool open_ = false;
};

}  // namespace sdserve::engine
