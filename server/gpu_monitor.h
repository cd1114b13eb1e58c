// GPU gauges for /metrics through NVML, loaded at run time (dlopen of libnvidia-ml.so.1), so the
// binary builds and runs where there is no NVIDIA driver: there the monitor is unavailable, the
// GPU families are absent, and one log line says why. A thread samples every interval (not per
// scrape: NVML calls take milliseconds and a scrape should not).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace sdserve::server {

struct GpuSample {
  int index = 0;  // NVML's index (PCI bus order; CUDA_DEVICE_ORDER=PCI_BUS_ID matches it)
  std::string name;
  // Negative: NVML could not read it on this GPU.
  double utilization = -1;  // ratio of the last sample period with a kernel running
  double memory_used = -1, memory_total = -1;  // bytes
  double power_watts = -1, temperature_celsius = -1, sm_clock_hertz = -1;
  // Whether the clocks are held down right now, by heat (NVML's software or hardware thermal
  // slowdown, or the hardware slowdown signal) or by power (the power cap or the power brake).
  // Running at the power cap is normal under full load; thermal throttling is not.
  int thermal_throttled = -1, power_throttled = -1;
};

class GpuMonitor {
 public:
  // interval_s <= 0: no sampling and no NVML.
  explicit GpuMonitor(double interval_s);
  ~GpuMonitor();
  GpuMonitor(const GpuMonitor&) = delete;
  GpuMonitor& operator=(const GpuMonitor&) = delete;

  bool available() const { return nvml_ != nullptr; }
  std::vector<GpuSample> latest() const;

 private:
  struct Nvml;
  void sample();
  void loop(double interval_s);

  std::unique_ptr<Nvml> nvml_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;               // guarded by mutex_
  std::vector<GpuSample> samples_;  // guarded by mutex_
  std::thread thread_;
};

}  // namespace sdserve::server
