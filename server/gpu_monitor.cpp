#include "server/gpu_monitor.h"

#include <dlfcn.h>
#include <spdlog/spdlog.h>

#include <chrono>

namespace sdserve::server {
namespace {

// The few NVML declarations used, as nvml.h has them (a stable C ABI); the header itself is
// not a build dependency.
using Device = void*;
struct Utilization {
  unsigned int gpu, memory;
};
struct Memory {
  unsigned long long total, free, used;
};
constexpr int kSuccess = 0;
constexpr int kTemperatureGpu = 0;
constexpr int kClockSm = 1;
// nvmlClocksEventReason* (formerly nvmlClocksThrottleReason*) bits.
constexpr unsigned long long kSwPowerCap = 0x4, kHwSlowdown = 0x8, kSwThermal = 0x20,
                             kHwThermal = 0x40, kHwPowerBrake = 0x80;

template <typename F>
F symbol(void* lib, const char* name) {
  return reinterpret_cast<F>(dlsym(lib, name));
}

}  // namespace

struct GpuMonitor::Nvml {
  void* lib = nullptr;
  int (*init)() = nullptr;
  int (*shutdown)() = nullptr;
  int (*count)(unsigned int*) = nullptr;
  int (*handle)(unsigned int, Device*) = nullptr;
  int (*name)(Device, char*, unsigned int) = nullptr;
  int (*utilization)(Device, Utilization*) = nullptr;
  int (*memory)(Device, Memory*) = nullptr;
  int (*power)(Device, unsigned int*) = nullptr;
  int (*temperature)(Device, int, unsigned int*) = nullptr;
  int (*clock)(Device, int, unsigned int*) = nullptr;
  int (*throttle)(Device, unsigned long long*) = nullptr;

  ~Nvml() {
    if (shutdown) shutdown();
    if (lib) dlclose(lib);
  }
};

GpuMonitor::GpuMonitor(double interval_s) {
  if (interval_s <= 0) return;
  auto nvml = std::make_unique<Nvml>();
  nvml->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!nvml->lib) {
    spdlog::info("no GPU metrics: NVML is not available ({})", dlerror());
    return;
  }
  nvml->init = symbol<int (*)()>(nvml->lib, "nvmlInit_v2");
  nvml->shutdown = symbol<int (*)()>(nvml->lib, "nvmlShutdown");
  nvml->count = symbol<int (*)(unsigned int*)>(nvml->lib, "nvmlDeviceGetCount_v2");
  nvml->handle = symbol<int (*)(unsigned int, Device*)>(nvml->lib, "nvmlDeviceGetHandleByIndex_v2");
  nvml->name = symbol<int (*)(Device, char*, unsigned int)>(nvml->lib, "nvmlDeviceGetName");
  nvml->utilization =
      symbol<int (*)(Device, Utilization*)>(nvml->lib, "nvmlDeviceGetUtilizationRates");
  nvml->memory = symbol<int (*)(Device, Memory*)>(nvml->lib, "nvmlDeviceGetMemoryInfo");
  nvml->power = symbol<int (*)(Device, unsigned int*)>(nvml->lib, "nvmlDeviceGetPowerUsage");
  nvml->temperature =
      symbol<int (*)(Device, int, unsigned int*)>(nvml->lib, "nvmlDeviceGetTemperature");
  nvml->clock = symbol<int (*)(Device, int, unsigned int*)>(nvml->lib, "nvmlDeviceGetClockInfo");
  // Renamed in CUDA 12.2's NVML; older drivers have only the first name.
  for (const char* name :
       {"nvmlDeviceGetCurrentClocksThrottleReasons", "nvmlDeviceGetCurrentClocksEventReasons"})
    if (!nvml->throttle)
      nvml->throttle = symbol<int (*)(Device, unsigned long long*)>(nvml->lib, name);
  if (!nvml->init || !nvml->count || !nvml->handle) {
    spdlog::info("no GPU metrics: NVML lacks the functions needed");
    nvml->shutdown = nullptr;
    return;
  }
  if (const int rc = nvml->init(); rc != kSuccess) {
    spdlog::info("no GPU metrics: NVML failed to initialise (error {})", rc);
    nvml->shutdown = nullptr;
    return;
  }
  nvml_ = std::move(nvml);
  sample();  // the first scrape already has values
  thread_ = std::thread([this, interval_s] { loop(interval_s); });
}

GpuMonitor::~GpuMonitor() {
  if (thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
}

std::vector<GpuSample> GpuMonitor::latest() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return samples_;
}

void GpuMonitor::loop(double interval_s) {
  const auto period = std::chrono::duration<double>(interval_s);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!cv_.wait_for(lock, period, [this] { return stop_; })) {
    lock.unlock();
    sample();
    lock.lock();
  }
}

void GpuMonitor::sample() {
  const Nvml& n = *nvml_;
  unsigned int count = 0;
  if (n.count(&count) != kSuccess) return;
  std::vector<GpuSample> out;
  for (unsigned int i = 0; i < count; ++i) {
    Device d = nullptr;
    if (n.handle(i, &d) != kSuccess) continue;
    GpuSample s;
    s.index = static_cast<int>(i);
    char name[96] = {};
    if (n.name && n.name(d, name, sizeof(name)) == kSuccess) s.name = name;
    Utilization u{};
    if (n.utilization && n.utilization(d, &u) == kSuccess) s.utilization = u.gpu / 100.0;
    Memory m{};
    if (n.memory && n.memory(d, &m) == kSuccess) {
      s.memory_used = static_cast<double>(m.used);
      s.memory_total = static_cast<double>(m.total);
    }
    unsigned int v = 0;
    if (n.power && n.power(d, &v) == kSuccess) s.power_watts = v / 1000.0;
    if (n.temperature && n.temperature(d, kTemperatureGpu, &v) == kSuccess)
      s.temperature_celsius = v;
    if (n.clock && n.clock(d, kClockSm, &v) == kSuccess) s.sm_clock_hertz = v * 1e6;
    unsigned long long reasons = 0;
    if (n.throttle && n.throttle(d, &reasons) == kSuccess) {
      s.thermal_throttled = (reasons & (kSwThermal | kHwThermal | kHwSlowdown)) != 0;
      s.power_throttled = (reasons & (kSwPowerCap | kHwPowerBrake)) != 0;
    }
    out.push_back(std::move(s));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  samples_ = std::move(out);
}

}  // namespace sdserve::server
