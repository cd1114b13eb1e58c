// Request parameters: A1111's "parameters" text and random seeds (torch-free: the engine writes
// the text into every PNG).
#include <mutex>
#include <random>
#include <sstream>

#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"

namespace sdserve::pipeline {

std::string a1111_parameters(const GenerateRequest& request, uint64_t seed, const ModelInfo& model,
                             const std::string& model_hash) {
  std::ostringstream out;
  out << request.prompt << "\n";
  if (!request.negative_prompt.empty())
    out << "Negative prompt: " << request.negative_prompt << "\n";
  std::ostringstream cfg;
  cfg << request.image.guidance_scale;
  out << "Steps: " << request.image.steps << ", Sampler: " << display_name(request.image.sampler)
      << ", Schedule type: " << (request.image.scheduler == "karras" ? "Karras" : "Automatic")
      << ", CFG scale: " << cfg.str() << ", Seed: " << seed << ", Size: " << request.image.width
      << "x" << request.image.height;
  if (!model_hash.empty()) out << ", Model hash: " << model_hash;
  out << ", Model: " << model.name;
  const auto& hires = request.image.hires;
  if (request.image.init_image || hires) {
    std::ostringstream strength;
    strength << (hires ? hires->strength : request.image.strength);
    out << ", Denoising strength: " << strength.str();
  }
  if (request.image.mask && request.image.mask_blur >= 0)
    out << ", Mask blur: " << request.image.mask_blur;
  if (request.clip_skip > 1) out << ", Clip skip: " << request.clip_skip;
  if (hires) {
    // A1111's keys in its order; "Size" above stays the first pass's, as there.
    const ImageSpec second = second_pass_spec(request.image);
    const auto label = [](const std::string& s) { return s == "karras" ? "Karras" : "Automatic"; };
    if (second.sampler != request.image.sampler)
      out << ", Hires sampler: " << display_name(second.sampler);
    if (hires->width == 0 && hires->height == 0) {
      std::ostringstream scale;
      scale << hires->scale;
      out << ", Hires upscale: " << scale.str();
    } else {
      out << ", Hires resize: " << hires->width << "x" << hires->height;
    }
    if (hires->steps > 0) out << ", Hires steps: " << hires->steps;  // 0: A1111 leaves it out
    out << ", Hires upscaler: " << hires->upscaler;
    if (std::string(label(second.scheduler)) != label(request.image.scheduler))
      out << ", Hires schedule type: " << label(second.scheduler);
  }
  if (!request.lora_hashes.empty()) {
    // A1111 quotes a value holding ':' or ','.
    out << ", Lora hashes: \"";
    for (size_t i = 0; i < request.lora_hashes.size(); ++i)
      out << (i ? ", " : "") << request.lora_hashes[i].first << ": "
          << request.lora_hashes[i].second;
    out << "\"";
  }
  // A1111 notes a non-default emphasis when the prompts have brackets it would otherwise weight.
  const auto brackets = [](const std::string& s) {
    return s.find_first_of("([") != std::string::npos;
  };
  if (request.prompt_syntax == PromptSyntax::kNone &&
      (brackets(request.prompt) || brackets(request.negative_prompt)))
    out << ", Emphasis: None";
  out << ", Version: sdserve";
  return out.str();
}

uint64_t random_seed() {
  // 32 bits, as A1111 users are used to, so a reported seed can be typed into other tools.
  static std::mt19937_64 rng{std::random_device{}()};
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  return rng() & 0xffffffffull;
}

}  // namespace sdserve::pipeline
