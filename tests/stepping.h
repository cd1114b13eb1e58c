// Batches of trajectories stepped as the engine steps them, for tests that compare a batch with
// its members run alone.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"

namespace sdserve::test {

// The final latents (on the CPU) of one trajectory per prompt, all stepped together in one batch
// to the end of `spec`, each with the empty negative prompt.
inline std::vector<torch::Tensor> latents_stepped_together(
    const pipeline::Model& model, const pipeline::ImageSpec& spec,
    const std::vector<std::string>& prompts) {
  const auto uncond = model.encode_text("");
  std::vector<std::unique_ptr<pipeline::Trajectory>> owned;
  std::vector<pipeline::Trajectory*> batch;
  for (const auto& p : prompts) {
    owned.push_back(model.begin(spec, model.encode_text(p), uncond));
    batch.push_back(owned.back().get());
  }
  while (!batch[0]->done()) model.step(batch);
  std::vector<torch::Tensor> latents;
  for (auto* t : batch) latents.push_back(t->state().latent.cpu().clone());
  return latents;
}

// A prompt of two 75-token chunks: 100 words, a comma after every third.
inline std::string two_chunk_prompt() {
  std::string words;
  for (int i = 0; i < 100; ++i) words += i % 3 ? "red " : "cube, ";
  return words;
}

}  // namespace sdserve::test
