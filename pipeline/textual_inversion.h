// Textual-inversion embeddings (A1111's embeddings/ folder), torch-free: a file of a few learned
// token vectors that a prompt calls by the embedding's name. Model::set_textual_inversions()
// hands a model the ones it may use; prompts then use them as A1111 does (docs/PROMPTS.md).
//
// Files are .safetensors only, in the layouts A1111 and diffusers read:
//  - "a1111":     one tensor "emb_params" or "string_to_param.*", (vectors, dim) or (dim)
//  - "diffusers": one tensor under any other name (the token, e.g. "<cat-toy>"), as diffusers'
//                 learned_embeds.safetensors
//  - "sdxl":      two tensors "clip_l" (vectors, 768) and "clip_g" (vectors, 1280)
// Pickled files (.pt, .bin, ...) are refused, as pickled checkpoints are.
//
// Thread safety: a TextualInversion is immutable once loaded; share it freely.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace sdserve::pipeline {

struct TextualInversionInfo {
  // The file name without its extension: the prompt word that calls it. A diffusers concept's
  // learned_embeds.safetensors takes its folder's name instead (every concept has that file name).
  std::string name;
  std::string path;
  std::string format;  // "a1111", "diffusers" or "sdxl" (above)
  int vectors = 0;     // tokens it takes in a prompt, 1..kMaxVectors
  // Each vector's size per text encoder: {768} (SD 1.x), {1024} (SD 2.x), {768, 1280} (SDXL's
  // clip_l and clip_g).
  std::vector<int> dims;
  std::string sha256;  // of the file (A1111's hash; the embedding cache's keys use it)
};

class TextualInversion {
 public:
  // A prompt chunk holds 75 tokens; an embedding never spans two (A1111), so it fits in one.
  static constexpr int kMaxVectors = 75;
  static constexpr int kMaxDim = 8192;
  static constexpr size_t kMaxFileBytes = size_t{16} << 20;

  // Reads and checks a .safetensors embedding; throws ModelError naming the file and what is
  // wrong with it (a pickle, not safetensors, no or several tensors, a shape or dtype that is
  // no embedding's, more than kMaxVectors vectors, values that are not finite).
  static std::shared_ptr<const TextualInversion> load(const std::string& path);

  const TextualInversionInfo& info() const { return info_; }
  // Encoder k's vectors (0: the only one, or SDXL's clip_l; 1: SDXL's clip_g), row-major
  // (info().vectors x info().dims[k]) float32.
  const std::vector<float>& vectors(size_t k) const { return vectors_.at(k); }

  TextualInversion(TextualInversionInfo info, std::vector<std::vector<float>> vectors);

 private:
  TextualInversionInfo info_;
  std::vector<std::vector<float>> vectors_;
};

using TextualInversionPtr = std::shared_ptr<const TextualInversion>;

// An embedding a model was given but cannot use, and why (its vectors' size is another model
// family's, its name has no tokens, another embedding has a name that tokenizes alike).
struct SkippedTextualInversion {
  TextualInversionInfo info;
  std::string reason;
};

}  // namespace sdserve::pipeline
