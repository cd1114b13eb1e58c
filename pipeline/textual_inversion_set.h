// The textual-inversion embeddings one model may use (internal, torch-free): the usable ones,
// those skipped and why, and each tokenizer's view of their names, which A1111 matches against a
// prompt's tokens (EmbeddingDatabase: names looked up by their first token, the longest first).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pipeline/io/tokenizer.h"
#include "pipeline/pipeline.h"
#include "pipeline/prompt_syntax.h"
#include "pipeline/textual_inversion.h"

namespace sdserve::pipeline {

class TextualInversionSet {
 public:
  // `tokenizers[k]` reads prompts for text encoder k, whose vectors have `dims[k]` values (one
  // encoder, or SDXL's two). An embedding is usable when its dims are these and its name has
  // tokens that no other usable embedding's name has (names are taken in sorted order).
  TextualInversionSet(std::vector<TextualInversionPtr> list,
                      const std::vector<const ClipTokenizer*>& tokenizers,
                      const std::vector<int>& dims);

  bool empty() const { return usable_.empty(); }
  const std::vector<TextualInversionPtr>& usable() const { return usable_; }
  const std::vector<SkippedTextualInversion>& skipped() const { return skipped_; }

  // Chunk rules' embedding lookup for tokenizer k: matches index usable().
  FindEmbeddingFn finder(size_t k) const;
  size_t longest_name(size_t k) const { return longest_[k]; }

  // Gives the places of `chunk`'s embeddings (framed: its tokens start at ids[first]) the ids
  // `vocab` + row, where row counts the vectors of the embeddings `in` used before (in the
  // order of in->embeddings, which gains each embedding the first time it is used).
  void place(const TokenChunk& chunk, int32_t vocab, size_t first, TextInput* in) const;
  // For several prompts in one encoder call: appends encoder k's vectors of the embeddings `in`
  // uses to `table` (rows of dims[k] values) and moves in's ids past `vocab` to those rows.
  void append_rows(TextInput* in, size_t k, int32_t vocab, std::vector<float>* table) const;

 private:
  struct Name {
    std::vector<int32_t> ids;
    size_t index;
  };
  std::vector<TextualInversionPtr> usable_;
  std::vector<SkippedTextualInversion> skipped_;
  // Per tokenizer: names by their first token, the longest first.
  std::vector<std::map<int32_t, std::vector<Name>>> names_;
  std::vector<size_t> longest_;
  std::map<std::string, size_t> by_name_;
};

}  // namespace sdserve::pipeline
