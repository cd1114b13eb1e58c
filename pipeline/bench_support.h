// What `sdserve bench` needs from the model code beyond the public API, and nothing else uses:
// per-step timings, device synchronisation and memory, the profiler range, and a full-size
// SD 1.5 with seeded random weights. Torch-free header.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pipeline/pipeline.h"

namespace sdserve::pipeline::bench_support {

// Where a step's time went (filled only while profiling: profiling synchronizes the device).
struct StepProfile {
  double prepare_ms = 0;  // scale_model_input, batching the inputs
  double unet_ms = 0;
  double sampler_ms = 0;  // guidance and every image's sampler update
  int rows = 0;           // UNet batch rows before padding
};

struct DeviceMemory {
  uint64_t allocated = 0, peak_allocated = 0, reserved = 0, peak_reserved = 0;  // bytes; 0 on CPU
};

void set_profiling(const Model& model, bool on);
StepProfile last_step_profile(const Model& model);
// Waits for the model's device to finish queued work (a no-op on the CPU).
void synchronize(const Model& model);
DeviceMemory memory(const Model& model, bool reset_peak = false);

// Opens / closes the CUDA profiler's capture range, so that an outside profiler started with
// `ncu --profile-from-start off` sees only the kernels in between. False without CUDA.
bool start_trace();
void stop_trace();

// The GPU's marketing name for "cuda:N"; the device string itself otherwise.
std::string device_name(const std::string& device);
std::string torch_version();
// The CUDA runtime torch was built with ("13.0"), or "none" for a CPU-only torch.
std::string cuda_version();

// Writes a diffusers folder with SD 1.5's architecture and seeded random fp16 weights.
void write_random_sd15(const std::string& dir, uint64_t seed);
// The same with SDXL base 1.0's architecture (two text encoders, 1024x1024 native).
void write_random_sdxl(const std::string& dir, uint64_t seed);

// Writes `count` LoRAs for `model` into `dir` (kohya's names, fp16, alpha = rank: scale 1) with
// seeded random factors of `rank` on what a typical LoRA adapts: every projection and
// feed-forward of the UNet's transformers (proj_in, proj_out included) and every projection of
// the text encoders. Returns their paths.
std::vector<std::string> write_random_loras(const Model& model, const std::string& dir, int count,
                                            int rank, uint64_t seed);

}  // namespace sdserve::pipeline::bench_support
