#include "pipeline/prompt_syntax.h"

#include <utf8proc.h>

#include <algorithm>
#include <charconv>
#include <cmath>

#include "pipeline/errors.h"
#include "pipeline/pipeline.h"
#include "pipeline/validate.h"

namespace sdserve::pipeline {
namespace {

constexpr double kRoundMultiplier = 1.1;
constexpr double kSquareMultiplier = 1 / 1.1;
// Weight updates one prompt may cost: A1111 multiplies every piece after an opening bracket at
// each closing one, which is quadratic in hostile input ("(a" a million times). Real prompts need
// a few thousand.
constexpr size_t kMaxWeightUpdates = size_t{1} << 22;
// Pieces of distinct weight or BREAKs one prompt may have (a prompt encodes at most 1,200 tokens):
// past it, "(a" repeated over a megabyte built a piece per two bytes.
constexpr size_t kMaxPieces = size_t{1} << 16;

// The code point starting at s[i] (U+FFFD for malformed UTF-8) and its length.
utf8proc_int32_t code_point_at(std::string_view s, size_t i, size_t* length) {
  utf8proc_int32_t cp = 0;
  const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                  static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
  *length = n > 0 ? static_cast<size_t>(n) : 1;
  return n > 0 ? cp : 0xFFFD;
}

size_t previous_start(std::string_view s, size_t i) {
  do --i;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80);
  return i;
}

// Python's str.isspace() / \s, which A1111's patterns use.
bool is_space(utf8proc_int32_t cp) {
  if (cp < 0x80) return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20);
  if (cp == 0x85) return true;
  const auto c = utf8proc_category(cp);
  return c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL || c == UTF8PROC_CATEGORY_ZP;
}

// Python's \w: letters, numbers and the underscore.
bool is_word(utf8proc_int32_t cp) {
  if (cp == '_') return true;
  switch (utf8proc_category(cp)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      return false;
  }
}

bool space_at(std::string_view s, size_t i, size_t* length) {
  return i < s.size() && is_space(code_point_at(s, i, length));
}

// Appends plain text of weight 1. With `extend`, it joins the last piece when that is plain text
// of weight 1 (the caller knows that no bracket opened since): the pieces' weights come out the
// same, and text between syntax characters (":::", "\\(\\(") does not cost a piece per character.
void push_text(std::vector<PromptPiece>* out, std::string_view text, bool extend) {
  if (extend && !out->empty() && !out->back().is_break && out->back().weight == 1.0)
    out->back().text += text;
  else
    out->push_back({std::string(text), 1.0, false});
}

// Splits a run of plain text at each BREAK (a whole word, with the whitespace around it), as
// re.split(r"\s*\bBREAK\b\s*", text).
void split_breaks(std::string_view run, std::vector<PromptPiece>* out, bool extend) {
  size_t from = 0, search = 0;
  while (out->size() <= kMaxPieces) {  // past it the caller refuses the prompt
    const size_t at = run.find("BREAK", search);
    if (at == std::string_view::npos) break;
    size_t n = 0;
    const bool starts = at == 0 || !is_word(code_point_at(run, previous_start(run, at), &n));
    const size_t after = at + 5;
    const bool ends = after == run.size() || !is_word(code_point_at(run, after, &n));
    if (!starts || !ends) {
      search = at + 1;
      continue;
    }
    size_t left = at;
    while (left > from) {
      const size_t prev = previous_start(run, left);
      if (!is_space(code_point_at(run, prev, &n))) break;
      left = prev;
    }
    size_t right = after;
    while (space_at(run, right, &n)) right += n;
    push_text(out, run.substr(from, left - from), extend);
    out->push_back({"BREAK", 1.0, true});
    from = search = right;
  }
  push_text(out, run.substr(from), extend);
}

// At s[i] == ':': the length of `:\s*([+-]?[.\d]+)\s*\)` there (0 if it does not match), and
// the number's text.
size_t match_weight(std::string_view s, size_t i, std::string_view* number) {
  size_t j = i + 1, n = 0;
  while (space_at(s, j, &n)) j += n;
  const size_t start = j;
  if (j < s.size() && (s[j] == '+' || s[j] == '-')) ++j;
  const size_t digits = j;
  while (j < s.size() && (s[j] == '.' || (s[j] >= '0' && s[j] <= '9'))) ++j;
  if (j == digits) return 0;
  *number = s.substr(start, j - start);
  while (space_at(s, j, &n)) j += n;
  return j < s.size() && s[j] == ')' ? j + 1 - i : 0;
}

// Python's float() of [+-]?[.\d]+: at least one digit, at most one dot; finite.
double weight_value(std::string_view number, const std::string& field) {
  std::string_view body = number;
  double sign = 1;
  if (!body.empty() && (body[0] == '+' || body[0] == '-')) {
    sign = body[0] == '-' ? -1 : 1;
    body.remove_prefix(1);
  }
  double v = 0;
  const auto [end, ec] = std::from_chars(body.data(), body.data() + body.size(), v);
  if (ec != std::errc() || end != body.data() + body.size() || !std::isfinite(v))
    throw RequestError(field, field + ": the weight '" + std::string(number) +
                                  "' in '(text:weight)' is not a finite number");
  return sign * v;
}

}  // namespace

std::vector<PromptPiece> parse_prompt_attention(std::string_view text, const std::string& field) {
  std::vector<PromptPiece> res;
  std::vector<size_t> round, square;  // where each open bracket's range starts in `res`
  size_t updates = 0;
  const auto multiply_range = [&](size_t start, double multiplier) {
    updates += res.size() - start;
    if (updates > kMaxWeightUpdates)
      throw RequestError(field, field + " has more nested weighting brackets than sdserve " +
                                    "parses; use fewer, or prompt_syntax \"none\"");
    for (size_t p = start; p < res.size(); ++p) res[p].weight *= multiplier;
  };
  const auto too_many_pieces = [&] {
    throw RequestError(field, field + " has more weighted pieces and BREAKs than sdserve " +
                                  "parses; use fewer, or prompt_syntax \"none\"");
  };
  // Whether text may join the last piece: no bracket opened after it.
  const auto extend = [&] {
    return (round.empty() || round.back() < res.size()) &&
           (square.empty() || square.back() < res.size());
  };
  size_t i = 0;
  while (i < text.size()) {
    if (res.size() > kMaxPieces) too_many_pieces();
    const char c = text[i];
    // At a ':', the length of a ":1.2)" weight starting there (0: none).
    std::string_view number;
    const size_t weight_length = c == ':' ? match_weight(text, i, &number) : 0;
    if (c == '\\') {
      // \( \) \[ \] \\ are the character; a backslash before anything else is dropped.
      const bool escape = i + 1 < text.size() &&
                          std::string_view("()[]\\").find(text[i + 1]) != std::string_view::npos;
      push_text(&res, escape ? text.substr(i + 1, 1) : std::string_view(), extend());
      i += escape ? 2 : 1;
    } else if (c == '(') {
      round.push_back(res.size());
      ++i;
    } else if (c == '[') {
      square.push_back(res.size());
      ++i;
    } else if (weight_length > 0 && !round.empty()) {
      const size_t start = round.back();
      round.pop_back();
      multiply_range(start, weight_value(number, field));
      i += weight_length;
    } else if (c == ')' && !round.empty()) {
      const size_t start = round.back();
      round.pop_back();
      multiply_range(start, kRoundMultiplier);
      ++i;
    } else if (c == ']' && !square.empty()) {
      const size_t start = square.back();
      square.pop_back();
      multiply_range(start, kSquareMultiplier);
      ++i;
    } else {
      // Plain text: a run without \ ( ) [ ] :, or one of : ) ] that closes nothing (a ':' that
      // starts a weight with no open '(' counts as text up to that weight's ')', as in A1111),
      // with the plain text after it.
      size_t end = i + weight_length;
      if (weight_length == 0) {
        end = text.find_first_of("\\()[]:", c == ':' || c == ')' || c == ']' ? i + 1 : i);
        if (end == std::string_view::npos) end = text.size();
      }
      split_breaks(text.substr(i, end - i), &res, extend());
      i = end;
    }
  }
  if (res.size() > kMaxPieces) too_many_pieces();
  for (size_t start : round) multiply_range(start, kRoundMultiplier);
  for (size_t start : square) multiply_range(start, kSquareMultiplier);
  for (const auto& piece : res)
    if (!std::isfinite(piece.weight))
      throw RequestError(field, field + ": its nested brackets multiply a weight past any " +
                                    "number; use (text:weight) instead");
  if (res.empty()) res.push_back({"", 1.0, false});
  // Merge neighbours of equal weight (never across a BREAK).
  std::vector<PromptPiece> merged;
  for (auto& piece : res) {
    if (!merged.empty() && !piece.is_break && !merged.back().is_break &&
        merged.back().weight == piece.weight)
      merged.back().text += piece.text;
    else
      merged.push_back(std::move(piece));
  }
  return merged;
}

std::vector<TokenChunk> chunk_prompt(const std::vector<PromptPiece>& pieces,
                                     const TokenizeFn& tokenize, const ChunkRules& rules,
                                     const std::string& field) {
  std::vector<TokenChunk> chunks;
  TokenChunk chunk;
  long last_comma = -1;
  size_t tokens_seen = 0;
  const size_t max_tokens = rules.length * rules.max_chunks;
  const auto too_long = [&]() {
    return RequestError(field, field + " is longer than " + std::to_string(rules.max_chunks) +
                                   " chunks of " + std::to_string(rules.length) +
                                   " tokens (BREAK starts a chunk), which sdserve encodes at most");
  };
  const auto next_chunk = [&]() {
    if (chunks.size() == rules.max_chunks) throw too_long();
    chunks.push_back(std::move(chunk));
    chunk = TokenChunk();
    last_comma = -1;
  };
  // With embeddings, a name of up to longest_name tokens may take a single place: a piece needs
  // that many times the places left to be sure to fill them.
  const size_t per_place = rules.find_embedding ? std::max<size_t>(rules.longest_name, 1) : 1;
  for (const auto& piece : pieces) {
    if (piece.is_break) {
      next_chunk();
      continue;
    }
    const auto tokens = tokenize(piece.text, (max_tokens - tokens_seen + 1) * per_place);
    if (!rules.find_embedding) {
      tokens_seen += tokens.size();
      if (tokens_seen > max_tokens) throw too_long();
    }
    const auto weight = static_cast<float>(piece.weight);
    for (size_t position = 0; position < tokens.size();) {
      const int32_t token = tokens[position];
      if (token == rules.comma_token) {
        last_comma = static_cast<long>(chunk.tokens.size());
      } else if (rules.comma_backtrack != 0 && chunk.tokens.size() == rules.length &&
                 last_comma != -1 &&
                 chunk.tokens.size() - static_cast<size_t>(last_comma) <= rules.comma_backtrack) {
        // The words after the last comma move to the next chunk with their weights (and
        // embeddings: A1111 leaves an embedding's vectors behind, at the padding of the chunk
        // it closes, and its places in the next chunk read the token "!"; see docs/PROMPTS.md).
        const auto cut = static_cast<std::ptrdiff_t>(last_comma + 1);
        TokenChunk moved{{chunk.tokens.begin() + cut, chunk.tokens.end()},
                         {chunk.weights.begin() + cut, chunk.weights.end()},
                         {}};
        while (!chunk.embeddings.empty() &&
               chunk.embeddings.back().offset >= static_cast<size_t>(cut)) {
          auto e = chunk.embeddings.back();
          e.offset -= static_cast<size_t>(cut);
          moved.embeddings.insert(moved.embeddings.begin(), e);
          chunk.embeddings.pop_back();
        }
        chunk.tokens.resize(static_cast<size_t>(cut));
        chunk.weights.resize(static_cast<size_t>(cut));
        next_chunk();
        chunk = std::move(moved);
      }
      if (chunk.tokens.size() == rules.length) next_chunk();
      const auto match =
          rules.find_embedding ? rules.find_embedding(tokens, position) : EmbeddingMatch{};
      if (match.name_tokens == 0) {
        chunk.tokens.push_back(token);
        chunk.weights.push_back(weight);
        ++position;
        if (rules.find_embedding && ++tokens_seen > max_tokens) throw too_long();
        continue;
      }
      // An embedding's vectors stay in one chunk (A1111's tokenize_line).
      if (chunk.tokens.size() + match.vectors > rules.length) next_chunk();
      chunk.embeddings.push_back({chunk.tokens.size(), match.index});
      chunk.tokens.insert(chunk.tokens.end(), match.vectors, kEmbeddingToken);
      chunk.weights.insert(chunk.weights.end(), match.vectors, weight);
      position += match.name_tokens;
      tokens_seen += match.vectors;
      if (tokens_seen > max_tokens) throw too_long();
    }
  }
  if (!chunk.tokens.empty() || chunks.empty()) next_chunk();
  return chunks;
}

TokenChunk literal_chunk(const std::vector<int32_t>& tokens, const FindEmbeddingFn& find_embedding,
                         size_t length) {
  TokenChunk chunk;
  for (size_t position = 0; position < tokens.size() && chunk.tokens.size() < length;) {
    const auto match = find_embedding ? find_embedding(tokens, position) : EmbeddingMatch{};
    if (match.name_tokens == 0) {
      chunk.tokens.push_back(tokens[position++]);
      continue;
    }
    chunk.embeddings.push_back({chunk.tokens.size(), match.index});
    chunk.tokens.insert(chunk.tokens.end(), std::min(match.vectors, length - chunk.tokens.size()),
                        kEmbeddingToken);
    position += match.name_tokens;
  }
  chunk.weights.assign(chunk.tokens.size(), 1.0f);
  return chunk;
}

std::string prompt_syntax_name(PromptSyntax syntax) {
  return syntax == PromptSyntax::kNone ? "none" : "a1111";
}

PromptSyntax parse_prompt_syntax(const std::string& name) {
  if (name == "a1111") return PromptSyntax::kA1111;
  if (name == "none") return PromptSyntax::kNone;
  throw RequestError("prompt_syntax", rule("prompt_syntax"));
}

}  // namespace sdserve::pipeline
