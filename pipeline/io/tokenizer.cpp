#include "pipeline/io/tokenizer.h"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>

#include "config/safe_json.h"
#include "pipeline/errors.h"
#include "pipeline/io/file_io.h"

namespace sdserve::pipeline {
namespace {

constexpr const char* kBosToken = "<|startoftext|>";
constexpr const char* kEosToken = "<|endoftext|>";
constexpr const char* kEndOfWord = "</w>";
// The word cache is a convenience, not a store: reset it rather than let a long-running service
// grow it without bound.
constexpr size_t kMaxCachedWords = 1 << 16;
constexpr size_t kMaxCachedWordBytes = 256;
// Prompts are cleaned in chunks of about this many bytes, cut after whitespace; a run without
// whitespace is cut here regardless (it is then far past any context).
constexpr size_t kChunkBytes = 4096, kMaxChunkBytes = 64 << 10;

bool is_ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

// Where the chunk that starts at `begin` ends: after the first whitespace past kChunkBytes, or
// at a character boundary kMaxChunkBytes on.
size_t chunk_end(const std::string& text, size_t begin) {
  if (text.size() - begin <= kChunkBytes) return text.size();
  size_t i = begin + kChunkBytes;
  const size_t hard = std::min(text.size(), begin + kMaxChunkBytes);
  while (i < hard && !is_ascii_space(text[i])) ++i;
  if (i < hard) return i + 1;
  if (hard == text.size()) return hard;
  while (i > begin + 1 && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80) --i;
  return i;
}

bool cps_longer_than(const std::string& utf8, size_t n) {
  if (utf8.size() <= n) return false;
  size_t count = 0;
  for (const unsigned char c : utf8)
    if ((c & 0xC0) != 0x80 && ++count > n) return true;
  return false;
}

using Codepoints = std::vector<utf8proc_int32_t>;

Codepoints decode_utf8(const std::string& s) {
  Codepoints out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(s.size());
  while (left > 0) {
    utf8proc_int32_t cp = 0;
    utf8proc_ssize_t n = utf8proc_iterate(p, left, &cp);
    if (n <= 0) {
      // Invalid UTF-8 decodes to U+FFFD in Python, which the cleanup drops: skip the byte.
      ++p;
      --left;
      continue;
    }
    out.push_back(cp);
    p += n;
    left -= n;
  }
  return out;
}

void append_utf8(utf8proc_int32_t cp, std::string* out) {
  utf8proc_uint8_t buf[4];
  utf8proc_ssize_t n = utf8proc_encode_char(cp, buf);
  out->append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

std::string encode_utf8(const Codepoints& cps, size_t begin, size_t end) {
  std::string out;
  for (size_t i = begin; i < end; ++i) append_utf8(cps[i], &out);
  return out;
}

utf8proc_category_t category(utf8proc_int32_t cp) {
  return utf8proc_category(cp);
}

bool is_letter(utf8proc_int32_t cp) {
  auto c = category(cp);
  return c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO;
}
bool is_number(utf8proc_int32_t cp) {
  auto c = category(cp);
  return c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO;
}
bool is_control(utf8proc_int32_t cp) {  // Python's unicodedata category "C*"
  auto c = category(cp);
  return c == UTF8PROC_CATEGORY_CN || (c >= UTF8PROC_CATEGORY_CC && c <= UTF8PROC_CATEGORY_CO);
}
// Python's str.isspace(): the characters str.split() separates on.
bool is_py_space(utf8proc_int32_t cp) {
  if ((cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85) return true;
  auto c = category(cp);
  return c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL || c == UTF8PROC_CATEGORY_ZP;
}
// CJK Unified Ideographs and their extensions / compatibility blocks, as BERT's cleanup lists them.
bool is_cjk(utf8proc_int32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
         (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
         (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

// For Python's final-sigma rule: "cased" and "case-ignorable" approximated from categories plus
// the Word_Break MidLetter / MidNumLet / Single_Quote characters.
bool is_cased(utf8proc_int32_t cp) {
  auto c = category(cp);
  return c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT;
}
bool is_case_ignorable(utf8proc_int32_t cp) {
  switch (cp) {
    case 0x27:
    case 0x2E:
    case 0x3A:
    case 0xB7:
    case 0x387:
    case 0x55F:
    case 0x5F4:
    case 0x2018:
    case 0x2019:
    case 0x2024:
    case 0x2027:
    case 0xFE13:
    case 0xFE52:
    case 0xFE55:
    case 0xFF07:
    case 0xFF0E:
    case 0xFF1A:
      return true;
    default:
      break;
  }
  auto c = category(cp);
  return c == UTF8PROC_CATEGORY_MN || c == UTF8PROC_CATEGORY_ME || c == UTF8PROC_CATEGORY_CF ||
         c == UTF8PROC_CATEGORY_LM || c == UTF8PROC_CATEGORY_SK;
}

// Python's str.lower(): simple mappings plus the two that differ (U+0130 expands to "i" + U+0307;
// capital sigma becomes final sigma at the end of a word).
Codepoints py_lower(const Codepoints& in) {
  Codepoints out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    const auto cp = in[i];
    if (cp == 0x130) {
      out.push_back(0x69);
      out.push_back(0x307);
    } else if (cp == 0x3A3) {
      size_t j = i;
      while (j > 0 && is_case_ignorable(in[j - 1])) --j;
      bool final_sigma = j > 0 && is_cased(in[j - 1]);
      if (final_sigma) {
        size_t k = i + 1;
        while (k < in.size() && is_case_ignorable(in[k])) ++k;
        final_sigma = k == in.size() || !is_cased(in[k]);
      }
      out.push_back(final_sigma ? 0x3C2 : 0x3C3);
    } else {
      out.push_back(utf8proc_tolower(cp));
    }
  }
  return out;
}

Codepoints nfc(const Codepoints& in) {
  const std::string s = encode_utf8(in, 0, in.size());
  utf8proc_uint8_t* mapped = nullptr;
  utf8proc_ssize_t n = utf8proc_map(
      reinterpret_cast<const utf8proc_uint8_t*>(s.data()), static_cast<utf8proc_ssize_t>(s.size()),
      &mapped, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) return in;  // cannot happen on valid, NUL-free input; keep the text unnormalised
  std::string out(reinterpret_cast<const char*>(mapped), static_cast<size_t>(n));
  std::free(mapped);
  return decode_utf8(out);
}

// BasicTokenizer(strip_accents=False, do_split_on_punc=False) followed by " ".join: drops NUL,
// U+FFFD and control characters, spaces CJK ideographs, NFC-normalises, lowercases and leaves
// exactly one space between whitespace-separated words.
Codepoints clean_text(const std::string& text) {
  Codepoints spaced;
  for (auto cp : decode_utf8(text)) {
    if (cp == 0 || cp == 0xFFFD) continue;
    if (cp == 0x09 || cp == 0x0A || cp == 0x0D || category(cp) == UTF8PROC_CATEGORY_ZS) {
      spaced.push_back(0x20);
    } else if (is_control(cp)) {
      continue;
    } else if (is_cjk(cp)) {
      spaced.insert(spaced.end(), {0x20, cp, 0x20});
    } else {
      spaced.push_back(cp);
    }
  }
  const Codepoints lowered = py_lower(nfc(spaced));
  Codepoints out;
  bool pending_space = false;
  for (auto cp : lowered) {
    if (is_py_space(cp)) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out.push_back(0x20);
    pending_space = false;
    out.push_back(cp);
  }
  return out;
}

// Matches CLIP's pattern (case-insensitively) at `pos`; returns the match length, 0 if none:
//   <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
size_t match_at(const Codepoints& t, size_t pos, bool* special) {
  *special = false;
  auto literal = [&](const char* lit) -> size_t {
    size_t n = 0;
    for (; lit[n] != '\0'; ++n) {
      if (pos + n >= t.size()) return 0;
      const auto c = t[pos + n];
      const auto want = static_cast<utf8proc_int32_t>(lit[n]);
      // The text is lowercase already; U+017F (long s) case-folds to 's' under IGNORECASE.
      if (c != want && !(want == 's' && c == 0x17F)) return 0;
    }
    return n;
  };
  for (const char* lit : {kBosToken, kEosToken}) {
    if (size_t n = literal(lit)) {
      *special = true;
      return n;
    }
  }
  for (const char* lit : {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"}) {
    if (size_t n = literal(lit)) return n;
  }
  const auto cp = t[pos];
  size_t end = pos;
  if (is_letter(cp)) {
    while (end < t.size() && is_letter(t[end])) ++end;
    return end - pos;
  }
  if (is_number(cp)) return 1;
  auto other = [](utf8proc_int32_t c) { return c != 0x20 && !is_letter(c) && !is_number(c); };
  while (end < t.size() && other(t[end])) ++end;
  return end - pos;  // 0 at a space, which no alternative matches
}

std::string read_file(const std::string& path, const char* what) {
  constexpr std::size_t kMaxTokenizerFileBytes = 64 << 20;  // CLIP's are 1-2 MB
  try {
    return read_regular_file(path, kMaxTokenizerFileBytes);
  } catch (const ModelError& e) {
    throw ModelError("tokenizer " + std::string(what) + " not usable: " + e.what());
  }
}

}  // namespace

ClipTokenizer ClipTokenizer::load(const std::string& vocab_json, const std::string& merges_txt,
                                  int max_length, const std::string& pad_token) {
  if (max_length < 2) {
    throw ModelError("tokenizer max length must be at least 2, got " + std::to_string(max_length));
  }
  ClipTokenizer tok;
  tok.max_length_ = max_length;

  const std::string vocab_text = read_file(vocab_json, "vocabulary");
  nlohmann::json vocab;
  try {
    vocab = safe_json::parse(vocab_text);
  } catch (const safe_json::Error& e) {
    throw ModelError("tokenizer vocabulary " + vocab_json + " is not valid JSON: " + e.what());
  }
  if (!vocab.is_object() || vocab.empty()) {
    throw ModelError("tokenizer vocabulary " + vocab_json +
                     " must be a non-empty JSON object of token -> id");
  }
  tok.vocab_.reserve(vocab.size());
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      throw ModelError("tokenizer vocabulary " + vocab_json + ": token \"" + token +
                       "\" has no valid integer id");
    }
    tok.vocab_.emplace(token, static_cast<int32_t>(id.get<int64_t>()));
  }
  for (const char* special : {kBosToken, kEosToken}) {
    if (!tok.vocab_.count(special)) {
      throw ModelError("tokenizer vocabulary " + vocab_json + " lacks the special token " +
                       special + " (not a CLIP vocabulary?)");
    }
  }
  for (const auto& [token, id] : tok.vocab_) {
    tok.max_token_symbols_ =
        std::max(tok.max_token_symbols_, static_cast<int>(decode_utf8(token).size()));
    tok.max_id_ = std::max(tok.max_id_, id);
  }
  tok.bos_id_ = tok.vocab_.at(kBosToken);
  tok.eos_id_ = tok.vocab_.at(kEosToken);
  // SD 1.x's tokenizer pads with <|endoftext|>; SD 2.x's and SDXL's second one with "!".
  const std::string pad = pad_token.empty() ? std::string(kEosToken) : pad_token;
  const auto pad_it = tok.vocab_.find(pad);
  if (pad_it == tok.vocab_.end())
    throw ModelError("tokenizer vocabulary " + vocab_json + " lacks the padding token \"" + pad +
                     "\" its tokenizer config names");
  tok.pad_id_ = pad_it->second;

  const std::string merges_text = read_file(merges_txt, "merges");
  std::istringstream lines(merges_text);
  std::string line;
  std::vector<std::string> rows;
  while (std::getline(lines, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    rows.push_back(line);
  }
  while (!rows.empty() && rows.back().find_first_not_of(" \t") == std::string::npos) {
    rows.pop_back();
  }
  // The first line is the "#version: 0.2" header; ranks are the order of the remaining lines.
  size_t first = !rows.empty() && rows[0].rfind("#", 0) == 0 ? 1 : 0;
  int32_t rank = 0;
  for (size_t i = first; i < rows.size(); ++i) {
    std::istringstream fields(rows[i]);
    std::string a, b, extra;
    if (!(fields >> a >> b) || (fields >> extra)) {
      throw ModelError("tokenizer merges " + merges_txt + " line " + std::to_string(i + 1) +
                       " is not a pair of symbols: \"" + rows[i] + "\"");
    }
    tok.merge_ranks_.emplace(a + " " + b, rank++);  // a repeated pair keeps its first rank
  }
  if (tok.merge_ranks_.empty()) {
    throw ModelError("tokenizer merges " + merges_txt + " contains no merges");
  }

  // bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other bytes take the
  // code points from U+0100 on, in byte order, so no BPE symbol is whitespace or a control.
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable =
        (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    std::string sym;
    append_utf8(printable ? b : next++, &sym);
    tok.byte_symbol_[b] = sym;
  }
  return tok;
}

int32_t ClipTokenizer::id_of(const std::string& token) const {
  auto it = vocab_.find(token);
  return it != vocab_.end() ? it->second : eos_id_;  // unk is <|endoftext|>
}

std::vector<int32_t> ClipTokenizer::bpe_uncached(const std::string& word, bool whole) const {
  // Symbols start as the word's code points (one per byte of the original text), in a linked
  // list so that a merge is O(1); candidate pairs wait in a heap by rank. Each round takes every
  // occurrence of the lowest-ranked pair, left to right, exactly as the reference's "merge all
  // occurrences of the best pair" loop does, in O(n log n) instead of O(n^2) per word.
  const Codepoints cps = decode_utf8(word);
  if (cps.empty()) return {};
  struct Node {
    std::string symbol;
    int prev, next;
    bool alive = true;
  };
  std::vector<Node> nodes;
  nodes.reserve(cps.size());
  for (size_t i = 0; i < cps.size(); ++i)
    nodes.push_back({encode_utf8(cps, i, i + 1), static_cast<int>(i) - 1,
                     i + 1 < cps.size() ? static_cast<int>(i) + 1 : -1});
  if (whole) nodes.back().symbol += kEndOfWord;

  constexpr int32_t kNone = std::numeric_limits<int32_t>::max();
  auto rank_at = [&](int i) -> int32_t {
    const int j = nodes[i].next;
    if (j < 0) return kNone;
    const auto it = merge_ranks_.find(nodes[i].symbol + " " + nodes[j].symbol);
    return it == merge_ranks_.end() ? kNone : it->second;
  };
  using Candidate = std::pair<int32_t, int>;  // (rank, position of the pair's left symbol)
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  for (int i = 0; i + 1 < static_cast<int>(nodes.size()); ++i)
    if (const int32_t r = rank_at(i); r != kNone) heap.emplace(r, i);

  std::vector<int> round;
  while (!heap.empty()) {
    const int32_t rank = heap.top().first;
    round.clear();
    while (!heap.empty() && heap.top().first == rank) {
      round.push_back(heap.top().second);
      heap.pop();
    }
    // Pairs formed by this round's merges never have this round's rank (a merged symbol is
    // longer than either half), so they wait for later rounds, as in the reference.
    for (const int i : round) {
      if (!nodes[i].alive || rank_at(i) != rank) continue;  // stale or overlapping
      const int j = nodes[i].next;
      nodes[i].symbol += nodes[j].symbol;
      nodes[j].alive = false;
      nodes[i].next = nodes[j].next;
      if (nodes[i].next >= 0) nodes[nodes[i].next].prev = i;
      if (nodes[i].prev >= 0)
        if (const int32_t r = rank_at(nodes[i].prev); r != kNone) heap.emplace(r, nodes[i].prev);
      if (const int32_t r = rank_at(i); r != kNone) heap.emplace(r, i);
    }
  }
  std::vector<int32_t> ids;
  for (int i = 0; i >= 0; i = nodes[i].next) ids.push_back(id_of(nodes[i].symbol));
  return ids;
}

void ClipTokenizer::bpe_word(const std::string& word, std::vector<int32_t>* out,
                             size_t max_symbols) const {
  // A word far longer than any context only needs its beginning: BPE merges are local, and the
  // symbols kept leave a margin of many tokens past the last one a caller can keep.
  if (cps_longer_than(word, max_symbols)) {
    std::string head;
    size_t n = 0;
    for (size_t i = 0; i < word.size() && n < max_symbols; ++n) {
      size_t len = 1;
      while (i + len < word.size() && (static_cast<unsigned char>(word[i + len]) & 0xC0) == 0x80)
        ++len;
      head.append(word, i, len);
      i += len;
    }
    const auto ids = bpe_uncached(head, false);
    out->insert(out->end(), ids.begin(), ids.end());
    return;
  }
  {
    std::lock_guard<std::mutex> lock(cache_->mu);
    auto it = cache_->words.find(word);
    if (it != cache_->words.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids = bpe_uncached(word, true);
  out->insert(out->end(), ids.begin(), ids.end());
  if (word.size() > kMaxCachedWordBytes) return;
  std::lock_guard<std::mutex> lock(cache_->mu);
  if (cache_->words.size() >= kMaxCachedWords) cache_->words.clear();
  cache_->words.emplace(word, std::move(ids));
}

std::vector<int32_t> ClipTokenizer::tokenize(const std::string& text, size_t max_tokens) const {
  // The text is cleaned and split chunk by chunk (cut after whitespace, which no cleanup rule
  // looks across), so a bounded call stops reading a long prompt once it has enough tokens.
  const size_t max_symbols = max_tokens == kUnlimited
                                 ? std::numeric_limits<size_t>::max()
                                 : 2 * (max_tokens + 1) * static_cast<size_t>(max_token_symbols_);
  std::vector<int32_t> ids;
  for (size_t begin = 0; begin < text.size() && ids.size() < max_tokens;) {
    const size_t end = chunk_end(text, begin);
    const Codepoints t = clean_text(text.substr(begin, end - begin));
    begin = end;
    for (size_t pos = 0; pos < t.size() && ids.size() < max_tokens;) {
      bool special = false;
      const size_t n = match_at(t, pos, &special);
      if (n == 0) {
        ++pos;
        continue;
      }
      const std::string piece = encode_utf8(t, pos, pos + n);
      pos += n;
      if (special) {  // typed <|startoftext|> / <|endoftext|> map to their ids, as in transformers
        ids.push_back(id_of(piece));
        continue;
      }
      std::string word;
      for (unsigned char byte : piece) word += byte_symbol_[byte];
      bpe_word(word, &ids, max_symbols);
    }
  }
  if (ids.size() > max_tokens) ids.resize(max_tokens);
  return ids;
}

std::vector<int32_t> ClipTokenizer::encode(const std::string& text) const {
  return frame(tokenize(text, static_cast<size_t>(max_length_ - 2)));
}

std::vector<int32_t> ClipTokenizer::frame(const std::vector<int32_t>& tokens) const {
  const size_t room = static_cast<size_t>(max_length_ - 2);
  std::vector<int32_t> ids;
  ids.reserve(static_cast<size_t>(max_length_));
  ids.push_back(bos_id_);
  ids.insert(ids.end(), tokens.begin(), tokens.begin() + std::min(tokens.size(), room));
  ids.push_back(eos_id_);
  ids.resize(static_cast<size_t>(max_length_), pad_id_);
  return ids;
}

int32_t ClipTokenizer::find_token(const std::string& token) const {
  auto it = vocab_.find(token);
  return it != vocab_.end() ? it->second : -1;
}

}  // namespace sdserve::pipeline
