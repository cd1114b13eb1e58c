// Prompts through pipeline::ClipTokenizer: tokenize() and encode() of the raw bytes (any bytes:
// invalid UTF-8 is documented to be skipped). The tokenizer is loaded once from the bundled
// models/tiny-sd15/tokenizer (or $SDSERVE_FUZZ_TOKENIZER_DIR). Nothing may throw. Properties:
// every id is in the vocabulary; a bounded tokenize(text, k) is the first k ids of the unbounded
// one (long words are cut before BPE when bounded); encode() is BOS + the first max_length-2 ids
// + EOS, padded to max_length (and, being a second pass, checks the word cache too).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bundled_tokenizer.h"
#include "finding.h"
#include "pipeline/errors.h"
#include "pipeline/io/tokenizer.h"

using sdserve::pipeline::ClipTokenizer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const ClipTokenizer& tok = bundled_tokenizer("fuzz_tokenizer");
  const std::string text(reinterpret_cast<const char*>(data), size);
  const std::vector<int32_t> tokens = tok.tokenize(text);
  const auto vocab = static_cast<int64_t>(tok.vocab_size());
  for (const int32_t id : tokens)
    if (id < 0 || id >= vocab)
      finding("token id " + std::to_string(id) + " outside the vocabulary");

  // A small bound, varying with the input, so that cut words are common.
  const size_t k = 1 + size % 16;
  const std::vector<int32_t> head = tok.tokenize(text, k);
  const size_t nk = std::min(tokens.size(), k);
  if (head.size() != nk || !std::equal(head.begin(), head.end(), tokens.begin()))
    finding("tokenize(text, " + std::to_string(k) + ") is not the first " + std::to_string(k) +
            " ids of tokenize(text)");

  const std::vector<int32_t> ids = tok.encode(text);
  if (ids.size() != static_cast<size_t>(tok.max_length())) finding("encode() has the wrong length");
  const size_t room = static_cast<size_t>(tok.max_length() - 2);
  const size_t n = std::min(tokens.size(), room);
  if (ids.front() != tok.bos_id()) finding("encode() does not start with BOS");
  for (size_t i = 0; i < n; ++i)
    if (ids[i + 1] != tokens[i]) finding("encode() differs from tokenize()");
  if (ids[n + 1] != tok.eos_id()) finding("encode() lacks EOS after the tokens");
  for (size_t i = n + 2; i < ids.size(); ++i)
    if (ids[i] != tok.pad_id()) finding("encode() is not padded with pad_id");
  return 0;
}
