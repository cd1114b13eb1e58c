#include "engine/warm_up.h"

#include <algorithm>
#include <cstdio>

namespace sdserve::engine {
namespace {

constexpr int kSmallestSize = 64;  // the smallest image a request may ask for

}  // namespace

std::vector<StepTiming> warm_up_probes(int native_size, const std::vector<int>& batch_sizes,
                                       bool gpu) {
  std::vector<StepTiming> out;
  if (!gpu)
    for (int size = kSmallestSize; size < native_size; size *= 2) out.push_back({size, 1});
  for (int batch : batch_sizes) out.push_back({native_size, batch});
  return out;
}

double predict_seconds(const StepTiming& from, int size, int batch) {
  const double pixels =
      static_cast<double>(size) * size / (static_cast<double>(from.size) * from.size);
  return from.seconds * pixels * pixels * batch / std::max(1, from.batch);
}

std::vector<StepTiming> native_step_times(const std::vector<StepTiming>& measured, int native_size,
                                          const std::vector<int>& batch_sizes) {
  std::vector<StepTiming> out;
  if (measured.empty()) return out;
  for (int batch : batch_sizes) {
    const auto it = std::find_if(measured.begin(), measured.end(), [&](const StepTiming& t) {
      return t.size == native_size && t.batch == batch;
    });
    if (it != measured.end())
      out.push_back(*it);
    else
      out.push_back({native_size, batch, predict_seconds(measured.back(), native_size, batch)});
  }
  return out;
}

std::string format_seconds(double seconds) {
  char buf[32];
  if (seconds < 1)
    std::snprintf(buf, sizeof buf, "%.1f ms", seconds * 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.2f s", seconds);
  return buf;
}

std::string describe(const StepTiming& t) {
  return std::to_string(t.size) + " px x" + std::to_string(t.batch) + ": " +
         format_seconds(t.seconds) + (t.measured ? "" : " (estimated)");
}

}  // namespace sdserve::engine
