// Prompt encoding per family: SD 1.x / 2.x read one text encoder's last (or clip_skip-th) layer
// through the final layer norm; SDXL joins two encoders' un-normed hidden states and takes the
// pooled embedding from the second. Prompts in A1111's syntax are parsed and chunked
// (prompt_syntax.h) and their weights applied here. Also SDXL's size conditioning (time ids).
#include <algorithm>

#include "pipeline/errors.h"
#include "pipeline/extra_networks.h"
#include "pipeline/model_impl.h"
#include "pipeline/prompt_syntax.h"
#include "pipeline/textual_inversion_set.h"

namespace sdserve::pipeline {
namespace {

std::string field_of(TextRole role) {
  return role == TextRole::kNegative ? "negative_prompt" : "prompt";
}

// Several prompts' chunks as one encoder batch.
struct ChunkBatch {
  torch::Tensor ids;                  // (chunks, context) int64
  torch::Tensor weights;              // (chunks, context) float32
  std::vector<bool> weighted;         // per chunk: a weight other than 1
  std::vector<int64_t> first, count;  // per prompt: its chunks
  torch::Tensor extra;  // textual-inversion vectors, which ids past the vocabulary index
};

ChunkBatch chunk_batch(const Model::Impl& impl, const ClipTokenizer& tokenizer,
                       const std::vector<std::string>& prompts, PromptSyntax syntax, TextRole role,
                       const TextualInversionSet* embeddings) {
  ChunkBatch b;
  std::vector<int64_t> ids;
  std::vector<float> weights, extra;
  const auto context = static_cast<size_t>(tokenizer.max_length());
  const size_t k = &tokenizer == impl.tokenizer_2.get() ? 1 : 0;
  const auto& encoder = (k == 1 ? impl.text_encoder_2 : impl.text_encoder)->config();
  for (const auto& prompt : prompts) {
    auto in = impl.text_input(tokenizer, prompt, syntax, role, embeddings);
    if (embeddings)
      embeddings->append_rows(&in, k, static_cast<int32_t>(encoder.vocab_size), &extra);
    b.first.push_back(static_cast<int64_t>(ids.size() / context));
    b.count.push_back(static_cast<int64_t>(in.ids.size() / context));
    ids.insert(ids.end(), in.ids.begin(), in.ids.end());
    weights.insert(weights.end(), in.weights.begin(), in.weights.end());
    for (size_t c = 0; c < in.ids.size(); c += context)
      b.weighted.push_back(
          std::any_of(in.weights.begin() + static_cast<std::ptrdiff_t>(c),
                      in.weights.begin() + static_cast<std::ptrdiff_t>(c + context),
                      [](float w) { return w != 1.0f; }));
  }
  const auto rows = static_cast<int64_t>(ids.size() / context);
  b.ids = torch::tensor(ids, torch::kInt64).view({rows, -1});
  b.weights = torch::tensor(weights, torch::kFloat32).view({rows, -1});
  if (!extra.empty())
    b.extra = torch::tensor(extra, torch::kFloat32).view({-1, encoder.hidden_size});
  return b;
}

// A1111's emphasis ("Original", its default): each token's output vector times its weight, then
// the chunk rescaled so that its mean is what it was. Chunks without weights stay untouched (the
// same numbers A1111 gets: times 1, and a mean ratio of exactly 1).
torch::Tensor apply_weights(torch::Tensor hidden, const ChunkBatch& b, const std::string& field) {
  if (std::none_of(b.weighted.begin(), b.weighted.end(), [](bool w) { return w; })) return hidden;
  hidden = hidden.clone();
  const auto weights = b.weights.to(hidden.device());
  for (size_t c = 0; c < b.weighted.size(); ++c) {
    if (!b.weighted[c]) continue;
    const auto i = static_cast<int64_t>(c);
    auto z = hidden[i].to(torch::kFloat32);
    const auto mean = z.mean();
    z = z * weights[i].unsqueeze(-1);
    z = z * (mean / z.mean());
    if (!torch::isfinite(z).all().item<bool>())
      throw RequestError(field, field + ": its (text:weight) weights make the text embedding " +
                                    "infinite or undefined; use weights nearer 1");
    hidden[i].copy_(z);
  }
  return hidden;
}

// Prompt i's chunks side by side: (1, 77 x chunks, D).
torch::Tensor joined(const torch::Tensor& hidden, const ChunkBatch& b, size_t i) {
  return hidden.narrow(0, b.first[i], b.count[i]).reshape({1, -1, hidden.size(-1)});
}

}  // namespace

TextInput Model::Impl::text_input(const ClipTokenizer& t, const std::string& prompt,
                                  PromptSyntax syntax, TextRole role) const {
  return text_input(t, prompt, syntax, role, textual_inversion_set().get());
}

TextInput Model::Impl::text_input(const ClipTokenizer& t, const std::string& prompt,
                                  PromptSyntax syntax, TextRole role,
                                  const TextualInversionSet* embeddings) const {
  TextInput in;
  if (embeddings && embeddings->empty()) embeddings = nullptr;
  const size_t k = &t == tokenizer_2.get() ? 1 : 0;
  const auto vocab =
      static_cast<int32_t>((k == 1 ? text_encoder_2 : text_encoder)->config().vocab_size);
  if (syntax == PromptSyntax::kNone && embeddings) {
    const auto room = static_cast<size_t>(t.max_length() - 2);
    const auto chunk = literal_chunk(t.tokenize(prompt, room * embeddings->longest_name(k)),
                                     embeddings->finder(k), room);
    in.ids = t.frame(chunk.tokens);
    in.weights.assign(in.ids.size(), 1.0f);
    embeddings->place(chunk, vocab, 1, &in);
    return in;
  }
  if (syntax == PromptSyntax::kNone) {
    in.ids = t.encode(prompt);
    in.weights.assign(in.ids.size(), 1.0f);
    return in;
  }
  const auto field = field_of(role);
  ChunkRules rules;
  rules.length = static_cast<size_t>(t.max_length() - 2);
  rules.comma_token = t.find_token(",</w>");
  rules.max_chunks = kMaxPromptChunks;
  if (embeddings) {
    rules.find_embedding = embeddings->finder(k);
    rules.longest_name = embeddings->longest_name(k);
  }
  const auto tokenize = [&t](const std::string& text, size_t max_tokens) {
    return t.tokenize(text, max_tokens);
  };
  for (const auto& chunk :
       chunk_prompt(parse_prompt_attention(strip_extra_networks(prompt, nullptr, field), field),
                    tokenize, rules, field)) {
    const auto ids = t.frame(chunk.tokens);
    const size_t first = in.ids.size() + 1;  // after the start token
    in.ids.insert(in.ids.end(), ids.begin(), ids.end());
    if (embeddings) embeddings->place(chunk, vocab, first, &in);
    in.weights.push_back(1.0f);  // start
    in.weights.insert(in.weights.end(), chunk.weights.begin(), chunk.weights.end());
    in.weights.resize(in.ids.size(), 1.0f);  // end and padding
  }
  return in;
}

std::string family_display_name(const std::string& family) {
  if (family == "sd1") return "Stable Diffusion 1.x";
  if (family == "sd2") return "Stable Diffusion 2.x";
  if (family == "sdxl") return "Stable Diffusion XL";
  return family;
}

std::vector<Embedding> Model::Impl::encode_batch(const std::vector<std::string>& prompts,
                                                 int clip_skip, TextRole role, PromptSyntax syntax,
                                                 const LoraSet& loras) {
  const auto field = field_of(role);
  // LoRAs: every prompt of the call shares the set, so the per-row form is one group (two thin
  // GEMMs a module); merged only where asked (lora_mode merged), as merging a whole encoder
  // costs more than its low-rank terms.
  std::shared_ptr<const LoraCall> call;
  if (lora_mode == LoraMode::kMerged) {
    text_merged.apply(loras, LoraSide::kText);
  } else {
    text_merged.restore();
    if (!loras.empty()) call = text_packed.get({&loras}, LoraSide::kText, device);
  }
  LoraCallScope scope(call.get());
  std::vector<Embedding> out;
  const auto embeddings = textual_inversion_set();  // one set for the whole call
  const auto b = chunk_batch(*this, *tokenizer, prompts, syntax, role, embeddings.get());
  if (!text_encoder_2) {
    auto hidden = text_encoder->forward(b.ids, clip_skip - 1, b.extra);
    hidden = apply_weights(hidden, b, field).to(dtype);
    for (size_t i = 0; i < prompts.size(); ++i) out.emplace_back(joined(hidden, b, i));
    return out;
  }
  // SDXL, as diffusers' encode_prompt: each encoder's hidden state clip_skip layers before its
  // last (the penultimate by default), without the final layer norm; negatives ignore clip_skip.
  // With chunks (A1111's way) each encoder's chunks are weighted on their own, and the pooled
  // embedding is the first chunk's.
  const auto b2 = chunk_batch(*this, *tokenizer_2, prompts, syntax, role, embeddings.get());
  if (b2.first != b.first || b2.count != b.count)
    throw ModelError(
        "SDXL's two tokenizers split a prompt into different chunks; their "
        "vocabularies differ, which sdserve does not support");
  const int skip = role == TextRole::kNegative ? 1 : clip_skip;
  auto first = text_encoder->encode_unnormed(b.ids, skip, b.extra);
  auto second = text_encoder_2->encode_unnormed(b2.ids, skip, b2.extra);
  auto hidden =
      torch::cat({apply_weights(first.hidden, b, field), apply_weights(second.hidden, b2, field)},
                 -1)
          .to(dtype);
  const auto pooled = second.pooled.to(dtype);
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto h = joined(hidden, b, i);
    auto p = pooled.narrow(0, b.first[i], 1);
    if (role == TextRole::kNegative && force_zeros_for_empty_prompt && prompts[i].empty()) {
      // An empty negative prompt is no conditioning at all: zeros, not the encoding of "".
      h = torch::zeros_like(h);
      p = torch::zeros_like(p);
    }
    out.emplace_back(h, p);
  }
  return out;
}

std::vector<float> Model::Impl::time_ids(const ImageSpec& spec) const {
  // diffusers' defaults: original and target size are the image's, the crop (0, 0).
  auto or_size = [](int v, int fallback) { return static_cast<float>(v > 0 ? v : fallback); };
  return {or_size(spec.original_height, spec.height), or_size(spec.original_width, spec.width),
          static_cast<float>(spec.crop_top),          static_cast<float>(spec.crop_left),
          or_size(spec.target_height, spec.height),   or_size(spec.target_width, spec.width)};
}

}  // namespace sdserve::pipeline
