// CLIP's byte-level BPE tokenizer, as transformers' CLIPTokenizer runs it for Stable Diffusion 1.x
// when ftfy is absent: BasicTokenizer-style cleanup (control characters dropped, CJK ideographs
// spaced, NFC, whitespace collapsed, lowercased, accents kept), CLIP's pre-tokenisation pattern,
// then BPE over the bytes_to_unicode alphabet with "</w>" closing each word. Torch-free.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace sdserve::pipeline {

class ClipTokenizer {
 public:
  // Reads vocab.json (token -> id) and merges.txt (a "#version" header, then one "a b" merge per
  // line, ranked by line order). Throws ModelError naming the file when either is missing or
  // malformed, or when the vocabulary lacks <|startoftext|> / <|endoftext|>. `max_length` is the
  // text encoder's context (tokenizer_config.json's model_max_length, 77 for SD 1.x).
  // `pad_token` (tokenizer_config.json's pad_token) pads to max_length; empty means
  // <|endoftext|>, as SD 1.x's tokenizer pads.
  static ClipTokenizer load(const std::string& vocab_json, const std::string& merges_txt,
                            int max_length = 77, const std::string& pad_token = "");

  static constexpr size_t kUnlimited = static_cast<size_t>(-1);

  // Ids of the text's BPE tokens without BOS/EOS, at most `max_tokens` of them. Time and memory
  // are bounded by the tokens asked for, not by the text: a 1 MB prompt or a 128 KB word costs
  // about what 77 tokens do. Unlimited, the whole text is tokenized in O(n log n).
  std::vector<int32_t> tokenize(const std::string& text, size_t max_tokens = kUnlimited) const;

  // BOS + at most max_length-2 tokens + EOS, padded with pad_id to max_length.
  std::vector<int32_t> encode(const std::string& text) const;
  // The same for tokens already made (at most max_length-2 of them).
  std::vector<int32_t> frame(const std::vector<int32_t>& tokens) const;

  // The id of a vocabulary entry ("," is ",</w>"), or -1 when the vocabulary lacks it.
  int32_t find_token(const std::string& token) const;

  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t pad_id() const { return pad_id_; }
  int max_length() const { return max_length_; }
  size_t vocab_size() const { return vocab_.size(); }
  // The highest id the vocabulary holds: a text encoder needs at least this many + 1 rows.
  int32_t max_id() const { return max_id_; }

 private:
  ClipTokenizer() = default;

  // BPE ids of one pre-token (already mapped to the byte alphabet), memoised.
  // A word longer than `max_symbols` code points is cut to them first.
  void bpe_word(const std::string& word, std::vector<int32_t>* out, size_t max_symbols) const;
  // `whole`: the word ends here ("</w>" closes it); false for a cut word.
  std::vector<int32_t> bpe_uncached(const std::string& word, bool whole) const;
  int32_t id_of(const std::string& token) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<std::string, int32_t> merge_ranks_;  // key: "left right"
  std::string byte_symbol_[256];                          // bytes_to_unicode, as UTF-8
  int32_t bos_id_ = 0, eos_id_ = 0, pad_id_ = 0, max_id_ = 0;
  int max_length_ = 0;
  int max_token_symbols_ = 1;  // the longest vocabulary entry, in code points

  // Prompts repeat words a lot; the cache is shared by concurrent const calls, hence the mutex
  // (behind a shared_ptr so the tokenizer stays copyable; copies share one cache).
  struct Cache {
    std::mutex mu;
    std::unordered_map<std::string, std::vector<int32_t>> words;
  };
  std::shared_ptr<Cache> cache_ = std::make_shared<Cache>();
};

}  // namespace sdserve::pipeline
