#include "engine/admission.h"

#include <algorithm>

namespace sdserve::engine {

int light_load_batch(const std::vector<int>& sizes, const std::vector<double>& seconds,
                     double efficiency, int max_batch) {
  if (sizes.empty() || sizes.size() != seconds.size()) return max_batch;
  double best = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (!(seconds[i] > 0)) return max_batch;  // unmeasured (or a broken clock): no cap
    best = std::max(best, sizes[i] / seconds[i]);
  }
  for (size_t i = 0; i < sizes.size(); ++i)
    if (sizes[i] / seconds[i] >= efficiency * best) return std::min(sizes[i], max_batch);
  return max_batch;
}

int AdmissionPolicy::cap(int queued_images, double oldest_wait_s) {
  if (queued_images > 0 && (queued_images >= light_ || oldest_wait_s >= options_.max_wait_s))
    open_ = true;
  return open_ ? options_.max_batch : std::min(light_, options_.max_batch);
}

}  // namespace sdserve::engine
