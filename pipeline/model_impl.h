// The loaded model's torch state (internal header; tests use it to reach float tensors).
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <mutex>

#include "pipeline/bench_support.h"
#include "pipeline/io/tensor_io.h"
#include "pipeline/io/tokenizer.h"
#include "pipeline/lora_runtime.h"
#include "pipeline/nn/clip.h"
#include "pipeline/nn/unet.h"
#include "pipeline/nn/vae.h"
#include "pipeline/pipeline.h"
#include "pipeline/runtime/unet_runner.h"
#include "pipeline/samplers/sampler.h"
#include "pipeline/samplers/trajectory_state.h"

namespace sdserve::pipeline {

class TextualInversionSet;  // textual_inversion_set.h

// A digest of the text encoder's config and weights (ModelInfo::text_fingerprint).
std::string text_encoder_fingerprint(const ClipTextModel& encoder, const std::string& config);

struct Model::Impl {
  ModelInfo info;
  torch::Device device{torch::kCPU};
  torch::Dtype dtype = torch::kFloat32;
  std::unique_ptr<ClipTokenizer> tokenizer;
  ClipTextModel text_encoder{nullptr};
  // SDXL: the second tokenizer and text encoder (OpenCLIP-G, with text_projection); the prompt
  // embedding is both encoders' hidden states side by side, the pooled one the second's.
  std::unique_ptr<ClipTokenizer> tokenizer_2;
  ClipTextModel text_encoder_2{nullptr};
  bool force_zeros_for_empty_prompt = false;
  UNet unet{nullptr};
  std::unique_ptr<UNetRunner> unet_runner;
  bool profiling = false;
  bench_support::StepProfile last_profile;
  Model::StepRows last_step_rows;
  Vae vae{nullptr};
  // Images one VAE call decodes on a GPU (decode_float); the CPU decodes one at a time.
  static constexpr int64_t kDecodeChunk = 8;
  // When `vae` decodes in fp16 although its config asks for float32 (force_upcast): a decode
  // with inf/NaN is redone by a float32 copy, loaded from these weights at the first overflow,
  // and every later decode uses that copy.
  bool vae_overflow_check = false;
  VaeConfig vae_config;
  WeightSource vae_weights;  // keeps the checkpoint's mapping open while checking
  bool vae_channels_last = false;
  std::mutex vae_fp32_mutex;
  Vae vae_fp32{nullptr};  // guarded by vae_fp32_mutex until vae_overflowed is set
  std::atomic<bool> vae_overflowed{false};
  double vae_scaling_factor = 0.18215;
  SchedulerConfig scheduler;
  std::vector<double> alphas_cumprod;  // for previews' predicted clean latent
  // CUDA: a cudaStream_t for decode() alone (not from torch's pool, which CUDA graph capture
  // draws on), destroyed with the model. Type-erased like step_done.
  std::shared_ptr<void> decode_stream;
  // CUDA: the same for encode_texts(), which the engine calls on a thread of its own.
  std::shared_ptr<void> text_stream;
  // CUDA: an at::cuda::CUDAEvent recorded after each step (type-erased: this header is also
  // compiled without SDSERVE_WITH_CUDA).
  std::shared_ptr<void> step_done;

  // LoRAs (pipeline/lora_runtime.h): the adaptable modules, the LoRAs converted for this model,
  // how they run, and each side's merged weights and last per-row packing (the UNet's used by
  // step()'s thread, the text encoders' by encode_texts()'s).
  LoraTargets lora_targets;
  std::unique_ptr<LoraCache> lora_cache;
  LoraMode lora_mode = LoraMode::kAuto;
  MergedLoras unet_merged, text_merged;
  LoraPacking unet_packed, text_packed;

  // Decoded images as float (B, 3, H, W) in [0, 1] on the CPU (parity tests compare these).
  torch::Tensor decode_float(const std::vector<Trajectory*>& batch);
  // The VAE's output (B, 3, H, W) in [-1, 1] as float32 on the model's device, for latents
  // already divided by the scaling factor.
  torch::Tensor vae_decode(const torch::Tensor& z);
  torch::Tensor predicted_x0(const Trajectory::State& s) const;
  // The text encoders' output for each prompt: (1, 77 x chunks, D) and, for SDXL, (1, P).
  // `loras`: the text encoders' set (empty: none).
  std::vector<Embedding> encode_batch(const std::vector<std::string>& prompts, int clip_skip,
                                      TextRole role, PromptSyntax syntax,
                                      const LoraSet& loras = {});
  // What tokenizer `t` (1: the first, 2: SDXL's second) makes of a prompt.
  TextInput text_input(const ClipTokenizer& t, const std::string& prompt, PromptSyntax syntax,
                       TextRole role) const;
  // The same with the textual-inversion embeddings of `embeddings` (null: none).
  TextInput text_input(const ClipTokenizer& t, const std::string& prompt, PromptSyntax syntax,
                       TextRole role, const TextualInversionSet* embeddings) const;
  // Textual-inversion embeddings prompts may call (Model::set_textual_inversions), swapped whole
  // so that an encode keeps the set it started with.
  mutable std::mutex textual_inversions_mutex;
  std::shared_ptr<const TextualInversionSet> textual_inversions;  // guarded by the mutex
  std::shared_ptr<const TextualInversionSet> textual_inversion_set() const;
  // SDXL's time ids for one image: original (h, w), crop (top, left), target (h, w).
  std::vector<float> time_ids(const ImageSpec& spec) const;
};

}  // namespace sdserve::pipeline
