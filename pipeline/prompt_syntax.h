// AUTOMATIC1111's prompt syntax, torch-free: attention weights written into the prompt and
// prompts longer than the text encoder's context. The rules, as A1111's
// modules/prompt_parser.py (parse_prompt_attention) and modules/sd_hijack_clip.py (tokenize_line)
// apply them, are documented in docs/PROMPTS.md; the embedding side (weights applied to the
// encoder's output, mean restored) is in text_encoding.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace sdserve::pipeline {

// A run of prompt text and its weight, or a BREAK (the next text starts a new chunk).
struct PromptPiece {
  std::string text;
  double weight = 1.0;
  bool is_break = false;
};

// `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)`
// multiplies it by 1.3; brackets nest and multiply; unclosed ones close at the end; `\(`, `\)`,
// `\[`, `\]`, `\\` are literal characters; the word BREAK (upper case, on its own) starts a new
// chunk. Neighbouring runs of equal weight are merged, as A1111 does (they are then tokenized
// together). Throws RequestError(field) for a weight that is not a number, and when the brackets
// would cost more than a bounded amount of work (hostile input).
std::vector<PromptPiece> parse_prompt_attention(std::string_view text, const std::string& field);

// Up to `length` tokens (without start and end tokens) and their weights. A textual-inversion
// embedding's vectors take kEmbeddingToken places, from `offset` on.
constexpr int32_t kEmbeddingToken = -1;
struct EmbeddingAt {
  size_t offset = 0;  // in tokens
  size_t index = 0;   // FindEmbeddingFn's
};
struct TokenChunk {
  std::vector<int32_t> tokens;
  std::vector<float> weights;
  std::vector<EmbeddingAt> embeddings;
};

// The textual-inversion embedding whose name's tokens start at tokens[position] (A1111's
// EmbeddingDatabase.find_embedding_at_position: the longest name that matches), if any.
struct EmbeddingMatch {
  size_t index = 0;
  size_t name_tokens = 0;  // 0: none
  size_t vectors = 0;      // the places it takes in a chunk, 1..75
};
using FindEmbeddingFn =
    std::function<EmbeddingMatch(const std::vector<int32_t>& tokens, size_t position)>;

struct ChunkRules {
  size_t length = 75;           // tokens per chunk: the encoder's context less start and end
  size_t comma_backtrack = 20;  // a full chunk is cut after a comma at most this far back
  int32_t comma_token = -1;     // the tokenizer's id of "," (-1: none)
  size_t max_chunks = 16;       // more is refused (RequestError)
  // Textual-inversion embeddings (none when empty), and the most tokens one's name takes.
  FindEmbeddingFn find_embedding;
  size_t longest_name = 1;
};

// Ids of a text's tokens without start/end, at most `max_tokens` of them.
using TokenizeFn = std::function<std::vector<int32_t>(const std::string& text, size_t max_tokens)>;

// Tokenizes each piece on its own and fills chunks of rules.length tokens in order, as A1111's
// tokenize_line: a BREAK closes the current chunk; when a chunk is full and a comma lies at most
// comma_backtrack tokens back, the tokens after that comma move to the next chunk. An embedding's
// name (within one piece) becomes its vectors, which never straddle two chunks: when they do not
// fit, the chunk is closed first. Always at least one chunk. Throws RequestError(field) beyond
// rules.max_chunks.
std::vector<TokenChunk> chunk_prompt(const std::vector<PromptPiece>& pieces,
                                     const TokenizeFn& tokenize, const ChunkRules& rules,
                                     const std::string& field);

// Tokens as diffusers reads them (prompt_syntax "none"): embeddings' names become their vectors,
// and the result is cut at `length` tokens (through an embedding, as diffusers cuts).
TokenChunk literal_chunk(const std::vector<int32_t>& tokens, const FindEmbeddingFn& find_embedding,
                         size_t length);

}  // namespace sdserve::pipeline
