// JSON from untrusted sources (request bodies, WebSocket commands, config files, model headers).
//
// nlohmann's parser and destructor are iterative, but dump(), copies and comparisons recurse: a
// 100k-deep array from a client or a hostile file would overflow the stack there. Everything that
// parses untrusted text goes through parse() (nesting bounded before parsing), and error messages
// quote values through describe() (short, never throws on invalid UTF-8).
//
// Header-only and dependency-free beyond nlohmann_json, so every layer may use it.
#pragma once

#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <string_view>

namespace sdserve::safe_json {

// Deeper than any request, config or checkpoint header needs (they nest 3 levels at most).
constexpr int kMaxDepth = 64;

// Malformed or too deeply nested text; the message says which.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The deepest nesting of arrays and objects in `text` (brackets inside strings do not count).
// Linear, no recursion; meaningful for valid JSON, harmless for invalid.
inline int nesting_depth(std::string_view text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) deepest = depth;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

// Parses `text`, refusing nesting deeper than `max_depth`. Throws Error.
template <class Json = nlohmann::json>
Json parse(std::string_view text, int max_depth = kMaxDepth) {
  // JSON text never holds a raw NUL; nlohmann's parser would stop there and accept what came
  // before, ignoring the rest.
  if (text.find('\0') != std::string_view::npos) throw Error("JSON text contains a NUL byte");
  if (nesting_depth(text) > max_depth)
    throw Error("JSON nested deeper than " + std::to_string(max_depth) + " levels");
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    // The parser quotes the offending bytes, which may be invalid UTF-8: keep the message
    // printable so that it can itself go into a JSON error body.
    std::string what = e.what();
    for (char& c : what)
      if (static_cast<unsigned char>(c) >= 0x80 || static_cast<unsigned char>(c) < 0x20) c = '?';
    throw Error(what);
  }
}

// A value as JSON text for an error message: at most `max_chars` characters, invalid UTF-8
// replaced, large containers summarised. Never throws on a value parse() returned.
template <class Json>
std::string describe(const Json& v, size_t max_chars = 60) {
  std::string s;
  if (v.is_array() && v.size() > 16)
    s = "an array of " + std::to_string(v.size()) + " items";
  else if (v.is_object() && v.size() > 16)
    s = "an object of " + std::to_string(v.size()) + " keys";
  else if (v.is_string() && v.template get_ref<const std::string&>().size() > 4 * max_chars)
    s = Json(v.template get_ref<const std::string&>().substr(0, 4 * max_chars))
            .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  else
    s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > max_chars) {
    // Cut on a UTF-8 character boundary.
    size_t cut = max_chars - 3;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
    s = s.substr(0, cut) + "...";
  }
  return s;
}

// Serialises a value built from user text (prompts, ids, messages) without throwing on invalid
// UTF-8: such bytes become U+FFFD.
template <class Json>
std::string dump(const Json& v) {
  return v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace sdserve::safe_json
