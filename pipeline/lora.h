// LoRA adapters (low-rank deltas to the UNet's and text encoders' weights) as the rest of the
// program sees them: torch-free.
//
// A Lora is a file read into host memory once; any number of requests and models share it. Using
// one: ImageSpec::loras (the UNet, per image: two images of a batch may use different sets) and
// the `loras` argument of Model::encode_text(s) (the text encoders, per call). A model converts a
// LoRA to its device and dtype at first use and keeps the result in a bounded cache
// (pipeline/lora_runtime.h). How it runs: docs in pipeline/lora_runtime.h (per-row low-rank terms
// in the batched forward, or merged into the weights when a whole call uses one set).
//
// Thread safety: a Lora is immutable after load(); share it freely.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sdserve::pipeline {

struct LoraInfo {
  std::string name;  // file name without extension
  std::string path;
  std::string format;  // "kohya" | "diffusers" (PEFT or older diffusers names)
  // "sd1" | "sd2" | "sdxl", from what the file names and its widths (cross-attention 768, 1024
  // or 2048; a second text encoder); "" when it cannot tell (checked against a model when used).
  std::string family;
  bool unet = false, text_encoder = false;  // what it adapts
  bool locon = false;                       // has adapters on convolutions wider than 1x1
  int rank = 0;                             // largest rank
  uint64_t bytes = 0;                       // file size
  int adapters = 0;                         // modules it adapts
};

class Lora {
 public:
  // Reads a .safetensors LoRA into host memory (in the file's dtype). Throws ModelError saying
  // what is wrong: pickled files (.pt, .ckpt, ...), formats that are not LoRA / LoCon (LoHa, LoKr,
  // DoRA, (IA)^3, GLoRA, full diffs) by name, unknown tensor names, no adapters, down and up
  // factors whose shapes do not pair, values that are not finite.
  static std::shared_ptr<const Lora> load(const std::string& path);
  ~Lora();
  Lora(const Lora&) = delete;
  Lora& operator=(const Lora&) = delete;

  const LoraInfo& info() const;
  // Unique in the process (caches key on it; a freed Lora's id is never reused).
  uint64_t id() const;

  struct Impl;  // pipeline/lora_impl.h
  const Impl& impl() const { return *impl_; }
  explicit Lora(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

// One LoRA of a set, with its weights (A1111's <lora:name:w>, or <lora:name:te:unet>).
struct LoraUse {
  std::shared_ptr<const Lora> lora;
  double unet_weight = 1.0;
  double te_weight = 1.0;
};

}  // namespace sdserve::pipeline
