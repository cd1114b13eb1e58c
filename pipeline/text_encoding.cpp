// Prompt encoding per family: SD 1.x / 2.x read one text encoder's last (or clip_skip-th) layer
// through the final layer norm; SDXL joins two encoders' un-normed hidden states and takes the
// pooled embedding from the second. Also SDXL's size conditioning (time ids).
#include <algorithm>

#include "pipeline/model_impl.h"

namespace sdserve::pipeline {
namespace {

torch::Tensor token_ids(const ClipTokenizer& tokenizer, const std::vector<std::string>& prompts) {
  std::vector<int64_t> ids;
  for (const auto& p : prompts) {
    const auto one = tokenizer.encode(p);
    ids.insert(ids.end(), one.begin(), one.end());
  }
  return torch::tensor(ids, torch::kInt64).view({static_cast<int64_t>(prompts.size()), -1});
}

}  // namespace

std::string family_display_name(const std::string& family) {
  if (family == "sd1") return "Stable Diffusion 1.x";
  if (family == "sd2") return "Stable Diffusion 2.x";
  if (family == "sdxl") return "Stable Diffusion XL";
  return family;
}

Embedding Model::Impl::encode_batch(const std::vector<std::string>& prompts, int clip_skip,
                                    TextRole role) {
  if (!text_encoder_2) {
    auto ids = token_ids(*tokenizer, prompts);
    return Embedding(text_encoder->forward(ids, clip_skip - 1).to(dtype));
  }
  // SDXL, as diffusers' encode_prompt: each encoder's hidden state clip_skip layers before its
  // last (the penultimate by default), without the final layer norm; negatives ignore clip_skip.
  const int skip = role == TextRole::kNegative ? 1 : clip_skip;
  auto first = text_encoder->encode_unnormed(token_ids(*tokenizer, prompts), skip);
  auto second = text_encoder_2->encode_unnormed(token_ids(*tokenizer_2, prompts), skip);
  auto hidden = torch::cat({first.hidden, second.hidden}, -1).to(dtype);
  auto pooled = second.pooled.to(dtype);
  if (role == TextRole::kNegative && force_zeros_for_empty_prompt) {
    // An empty negative prompt is no conditioning at all: zeros, not the encoding of "".
    for (size_t i = 0; i < prompts.size(); ++i) {
      if (!prompts[i].empty()) continue;
      hidden[static_cast<int64_t>(i)].zero_();
      pooled[static_cast<int64_t>(i)].zero_();
    }
  }
  return Embedding(hidden, pooled);
}

std::vector<float> Model::Impl::time_ids(const ImageSpec& spec) const {
  // diffusers' defaults: original and target size are the image's, the crop (0, 0).
  auto or_size = [](int v, int fallback) { return static_cast<float>(v > 0 ? v : fallback); };
  return {or_size(spec.original_height, spec.height), or_size(spec.original_width, spec.width),
          static_cast<float>(spec.crop_top),          static_cast<float>(spec.crop_left),
          or_size(spec.target_height, spec.height),   or_size(spec.target_width, spec.width)};
}

}  // namespace sdserve::pipeline
