// The benchmark behind `sdserve bench`: full-size SD 1.5 (seeded random weights written to a
// diffusers folder first, so start-up includes reading real-size weights) or a given model,
// timed per phase and end to end. Torch-free header.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "pipeline/pipeline.h"

namespace sdserve::bench {

struct BenchOptions {
  std::string model;  // empty: random-weight SD 1.5 (or SDXL) written under work_dir
  bool sdxl = false;  // the random model has SDXL base's architecture
  std::string work_dir = "/tmp/sdserve-bench";
  pipeline::LoadOptions load;
  int width = 512, height = 512, steps = 30;
  double guidance_scale = 7.5;
  std::string sampler = "euler";
  // > 0: image to image at this strength, from a generated picture of width x height (the
  // VAE encode is in every timing; the last int(steps x strength) steps run).
  double strength = 0;
  // With strength: every other image of a batch is text to image (the same batch, each row at
  // its own timestep): what sharing UNet calls between the two kinds costs or saves.
  bool mixed = false;
  // > 0: this many random LoRAs of rank lora_rank (pipeline::bench_support::write_random_loras,
  // under work_dir), image k of every batch with LoRA k mod loras (UNet and text encoders, weight
  // 1): rows with different LoRAs in one UNet call. load.lora_mode says how they run ("merged":
  // one UNet call per LoRA, as tools without per-row LoRAs do).
  int loras = 0;
  int lora_rank = 16;
  std::vector<int> batches = {1, 2, 4, 8, 16, 32};
  int repeats = 3;  // timed runs per batch size (the median is reported)
  // CUDA: when > 0, after the timings, one step at this batch size (and its VAE decode) inside
  // the CUDA profiler range, for `ncu --profile-from-start off`.
  int profile_batch = 0;
  std::chrono::steady_clock::time_point process_start = std::chrono::steady_clock::now();
};

struct BenchBatch {
  int batch = 0;
  double seconds = 0;  // one request of `batch` images: encode + steps + VAE decode
  double images_per_s = 0;
  double it_per_s = 0;       // denoising steps per second (of the whole batch)
  double unet_step_ms = 0;   // one UNet call (profiled run)
  double vae_decode_ms = 0;  // the whole batch
  uint64_t peak_allocated = 0, peak_reserved = 0;
};

struct BenchReport {
  std::string device, device_name, precision, torch_version, model;
  int width = 0, height = 0, steps = 0;
  double guidance_scale = 0;
  std::string sampler;
  double strength = 0;           // 0: text to image
  bool mixed = false;            // half the batch text to image
  int loras = 0, lora_rank = 0;  // distinct LoRAs over each batch's images, their rank
  std::string lora_mode;
  double write_model_s = 0;             // random weights generated and written (not start-up)
  double load_s = 0;                    // Model::load
  double startup_to_first_image_s = 0;  // process start -> first image decoded
  // batch-1 phases, milliseconds (medians)
  double tokenize_ms = 0, text_encode_ms = 0, unet_step_ms = 0, sampler_step_ms = 0,
         vae_decode_ms = 0, png_encode_ms = 0;
  double batch1_seconds_per_image = 0, batch1_it_per_s = 0;
  std::vector<BenchBatch> batches;

  std::string to_json() const;
  std::string to_table() const;
};

BenchReport run_bench(const BenchOptions& options,
                      const std::function<void(const std::string&)>& progress = {});

}  // namespace sdserve::bench
