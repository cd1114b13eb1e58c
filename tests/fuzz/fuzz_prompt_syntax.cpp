// Prompts in A1111's syntax (pipeline/prompt_syntax.h): parse_prompt_attention() then
// chunk_prompt() through the bundled tiny model's CLIP tokenizer (or
// $SDSERVE_FUZZ_TOKENIZER_DIR), on any bytes. Only RequestError may be thrown, naming the field.
// Properties: weights are finite; at most 16 chunks of at most 75 tokens; every token is one the
// tokenizer made; and text without syntax characters or BREAK gives exactly the tokenizer's
// tokens, in chunks of 75 (comma moves aside).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bundled_tokenizer.h"
#include "finding.h"
#include "pipeline/errors.h"
#include "pipeline/extra_networks.h"
#include "pipeline/io/tokenizer.h"
#include "pipeline/prompt_syntax.h"

using namespace sdserve::pipeline;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const ClipTokenizer& tok = bundled_tokenizer("fuzz_prompt_syntax");
  const std::string text(reinterpret_cast<const char*>(data), size);
  ChunkRules rules;
  rules.comma_token = tok.find_token(",</w>");
  const auto tokenize = [&tok](const std::string& t, size_t max) { return tok.tokenize(t, max); };
  std::vector<TokenChunk> chunks;
  try {  // A1111's <lora:...> tags: read, or refused naming the prompt
    for (const auto& t : lora_tags(text, "prompt"))
      if (t.name.empty() || !std::isfinite(t.te_weight) || !std::isfinite(t.unet_weight))
        finding("a LoRA tag without a name or with a weight that is not finite");
    if (strip_extra_networks(text).size() > text.size()) finding("stripping tags grew the text");
  } catch (const RequestError& e) {
    if (e.field() != "prompt") finding("an error naming '" + e.field() + "'");
  }
  try {
    const auto pieces = parse_prompt_attention(text, "prompt");
    if (pieces.empty()) finding("no pieces");
    for (const auto& p : pieces)
      if (!std::isfinite(p.weight)) finding("a weight that is not finite");
    chunks = chunk_prompt(pieces, tokenize, rules, "prompt");
  } catch (const RequestError& e) {
    if (e.field() != "prompt") finding("an error naming '" + e.field() + "'");
    return 0;
  }
  if (chunks.empty() || chunks.size() > rules.max_chunks) finding("chunk count out of range");
  for (const auto& c : chunks) {
    if (c.tokens.size() > rules.length) finding("a chunk over 75 tokens");
    if (c.tokens.size() != c.weights.size()) finding("tokens and weights differ in number");
    for (const int32_t id : c.tokens)
      if (id < 0 || static_cast<size_t>(id) >= tok.vocab_size()) finding("a token id out of range");
  }
  if (text.find_first_of("\\()[]:") == std::string::npos &&
      text.find("BREAK") == std::string::npos) {
    std::vector<int32_t> joined;
    for (const auto& c : chunks) {
      joined.insert(joined.end(), c.tokens.begin(), c.tokens.end());
      for (const float w : c.weights)
        if (w != 1.0f) finding("a weight without syntax");
    }
    if (joined != tok.tokenize(text)) finding("plain text does not keep the tokenizer's tokens");
  }
  return 0;
}
