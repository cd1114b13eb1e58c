// The worker's warm-up, on its thread before the first turn: a short generation, the decoder
// thread's first decodes, then UNet steps timed for the admission policy within
// warm_up_budget_s (engine/warm_up.h). /readyz shows its phase and what it measured; shutdown
// stops it between model calls.
#include <algorithm>
#include <chrono>
#include <future>

#include "engine/worker.h"
#include "pipeline/log.h"

namespace sdserve::engine {
namespace {

// On the CPU the warm-up generation and decodes only prove that the model runs (there are no
// kernels to select or graphs to capture), so they use the smallest size a request may ask for.
constexpr int kCpuWarmUpSize = 64;

double seconds_since(SteadyClock::time_point t) {
  return std::chrono::duration<double>(SteadyClock::now() - t).count();
}

}  // namespace

bool Worker::stop_requested() {
  std::lock_guard<std::mutex> lock(engine_.mutex);
  return engine_.cancel_all || engine_.threads_exit;
}

bool Worker::warm_up_phase(const char* phase) {
  std::lock_guard<std::mutex> lock(engine_.mutex);
  auto& w = engine_.worker_status[index_].warm_up;
  if (engine_.cancel_all || engine_.threads_exit) {
    w.phase = "stopped";
    w.over = true;
    w.elapsed_s = seconds_since(w.started);
    pipeline::log(pipeline::LogLevel::kInfo,
                  device_ + " warm-up stopped by shutdown after " + format_seconds(w.elapsed_s));
    return false;
  }
  w.phase = phase;
  return true;
}

bool Worker::warm_up() {
  const auto start = SteadyClock::now();
  const auto& o = engine_.options;
  const int native = model_.info().native_size;
  warm_up_size_ = gpu_ ? native : std::min(native, kCpuWarmUpSize);
  std::vector<int> sizes;
  for (int bucket : o.batch_buckets)
    if (bucket <= o.max_batch) sizes.push_back(bucket);
  {
    std::lock_guard<std::mutex> lock(engine_.mutex);
    auto& w = engine_.worker_status[index_].warm_up;
    w.started = start;
    w.budget_s = o.warm_up_budget_s;
  }
  std::vector<StepTiming> measured;
  try {
    if (!warm_up_phase("generating")) return false;
    model_.warm_up(warm_up_size_);
    if (!warm_up_phase("decoder")) return false;
    // The decoder thread warms up too: PyTorch keeps cuDNN's autotuned convolution plans per
    // thread, and the first decode of each batch size on a thread autotunes (~2 s at 512x512
    // on an H200, which made the first minute of serving slow).
    auto decoder_warm = std::make_shared<std::promise<void>>();
    auto warmed = decoder_warm->get_future();
    decoder_ = std::thread([this, decoder_warm] { decoder_loop(decoder_warm); });
    warmed.get();  // rethrows what the decoder's warm-up threw
    if (!warm_up_phase("timing")) return false;
    pipeline::log(pipeline::LogLevel::kInfo,
                  device_ + " warm-up: timing UNet steps for the admission policy, cheapest " +
                      "first, until " + format_seconds(o.warm_up_budget_s) +
                      " after it began (warm_up_budget_s)");
    if (!time_steps(sizes, start, &measured)) return false;
  } catch (const std::exception& e) {
    // A worker that cannot run a two-step generation would fail every job: it takes none, and
    // the service does not report ready.
    pipeline::log(pipeline::LogLevel::kError,
                  "warm-up failed on " + device_ + ", which takes no jobs: " + e.what());
    std::lock_guard<std::mutex> lock(engine_.mutex);
    auto& w = engine_.worker_status[index_];
    w.state = "failed";
    w.error = public_error(e.what());
    w.warm_up.phase = "failed";
    w.warm_up.over = true;
    w.warm_up.elapsed_s = seconds_since(start);
    engine_.work_cv.notify_all();
    return false;
  }
  const auto steps = native_step_times(measured, native, sizes);
  std::vector<double> seconds;
  std::string by_batch, smaller;
  for (const auto& t : steps) {
    seconds.push_back(t.seconds);
    by_batch += (by_batch.empty() ? "" : ", ") + std::to_string(t.batch) + ": " +
                format_seconds(t.seconds) + (t.measured ? "" : " (estimated)");
  }
  for (const auto& t : measured)
    if (t.size != native) smaller += (smaller.empty() ? "" : ", ") + describe(t);
  const int light = light_load_batch(sizes, seconds, o.light_load_efficiency, o.max_batch);
  admission_ =
      AdmissionPolicy({o.max_batch, o.light_load_efficiency, o.light_load_max_wait_s}, light);
  const double elapsed = seconds_since(start);
  pipeline::log(pipeline::LogLevel::kInfo,
                device_ + " ready after " + format_seconds(elapsed) + "; UNet step at " +
                    std::to_string(native) + " px by batch size {" + by_batch + "}" +
                    (smaller.empty() ? "" : "; timed at smaller sizes: " + smaller) +
                    "; light-load batch " + std::to_string(light) + " of max_batch " +
                    std::to_string(o.max_batch));
  std::lock_guard<std::mutex> lock(engine_.mutex);
  auto& w = engine_.worker_status[index_];
  w.state = "ready";
  w.light_load_batch = light;
  w.warm_up.phase = "done";
  w.warm_up.over = true;
  w.warm_up.elapsed_s = elapsed;
  for (const auto& t : steps)
    if (!t.measured) w.warm_up.steps.push_back(t);
  return true;
}

bool Worker::time_steps(const std::vector<int>& batch_sizes, SteadyClock::time_point start,
                        std::vector<StepTiming>* measured) {
  const double budget = engine_.options.warm_up_budget_s;
  const int calls = gpu_ ? 3 : 1;  // on a GPU: the capture and two timed (time_step())
  for (StepTiming probe : warm_up_probes(model_.info().native_size, batch_sizes, gpu_)) {
    // A UNet call the memory budget cannot hold is never run (the probes grow).
    if (memory_.budget() > 0 &&
        memory_.unet_bytes(model_, probe.size, probe.size, 2 * probe.batch) > memory_.budget())
      break;
    // The first step is always timed: the estimates need one.
    if (!measured->empty() &&
        seconds_since(start) + calls * predict_seconds(measured->back(), probe.size, probe.batch) >
            budget)
      break;
    if (!warm_up_phase("timing")) return false;
    probe.seconds = model_.time_step(probe.size, probe.batch);
    probe.measured = true;
    measured->push_back(probe);
    pipeline::log(pipeline::LogLevel::kDebug,
                  device_ + " warm-up: UNet step " + describe(probe) + " (measured)");
    std::lock_guard<std::mutex> lock(engine_.mutex);
    engine_.worker_status[index_].warm_up.steps = *measured;
  }
  return true;
}

}  // namespace sdserve::engine
