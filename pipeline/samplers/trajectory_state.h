// Torch-side state behind the public Embedding and Trajectory handles (internal header).
#pragma once

#include <torch/torch.h>

#include <memory>
#include <optional>

#include "pipeline/pipeline.h"
#include "pipeline/samplers/sampler.h"

namespace sdserve::pipeline {

class Embedding {
 public:
  explicit Embedding(torch::Tensor hidden, torch::Tensor pooled = {})
      : hidden_(std::move(hidden)), pooled_(std::move(pooled)) {}
  // (1, 77 x chunks, D), compute dtype, on device.
  const torch::Tensor& hidden() const { return hidden_; }
  // SDXL: the second text encoder's pooled, projected embedding (1, P); undefined otherwise.
  const torch::Tensor& pooled() const { return pooled_; }

 private:
  torch::Tensor hidden_;
  torch::Tensor pooled_;
};

struct Trajectory::State {
  ImageSpec spec;
  std::unique_ptr<Sampler> sampler;
  at::Generator generator;  // CPU, seeded spec.seed: the initial noise and ancestral noise
  EmbeddingPtr cond;
  EmbeddingPtr uncond;   // null when guidance_scale <= 1
  torch::Tensor latent;  // (1, C, h, w) float32 on the device; samplers run in float32
  int evals_done = 0;    // the next evaluation's index in the sampler's whole schedule
  int first_eval = 0;    // image to image: the evaluations before it are skipped
  // The last evaluation's scaled model input and guided noise prediction (previews).
  torch::Tensor last_input;
  torch::Tensor last_eps;
  double last_timestep = 0;
  // Inpainting with a 4-channel UNet: the clean init latents, the noise they were noised with,
  // and the latent mask (1, 1, h, w; 1 = repaint); after each step the latents outside the mask
  // are the init latents at the next evaluation's noise level.
  torch::Tensor blend_latents, blend_noise, blend_mask;
  // Inpainting UNet: the mask and masked-picture latents (1, 5, h, w) each row's input ends with.
  torch::Tensor inpaint_condition;

  // --- Hires fix (pipeline/hires.cpp) ---
  // While the first pass runs: the second's settings, size and evaluations (begun in place when
  // the first ends). Evaluations of the passes already ended: a trajectory counts all of its own.
  struct SecondPass {
    ImageSpec spec;  // second_pass_spec()
    HiresSize size;
    std::string upscaler;
    int evals = 0;
  };
  std::optional<SecondPass> second_pass;
  int earlier_evals = 0;
};

}  // namespace sdserve::pipeline
