// JSON from untrusted sources (request bodies, WebSocket commands, config files, model headers).
//
// nlohmann's parser and destructor are iterative, but dump(), copies and comparisons recurse: a
// 100k-deep array from a client or a hostile file would overflow the stack there. Everything that
// parses untrusted text goes through parse() (nesting bounded before parsing), and error messages
// quote values through describe() (short, never throws on invalid UTF-8).
//
// Header-only and dependency-free beyond nlohmann_json, so every layer may use it.
#pragma once

#include <algorithm>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace sdserve::safe_json {

// Deeper than any request, config or checkpoint header needs (they nest 3 levels at most).
constexpr int kMaxDepth = 64;

// Malformed or too deeply nested text; the message says which.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what, std::string field = "")
      : std::runtime_error(what), field_(std::move(field)) {}
  // For a number out of a double's range: the member it is the value of ("steps",
  // "preview.every"; array positions are not named); "" otherwise.
  const std::string& field() const { return field_; }

 private:
  std::string field_;
};

namespace detail {

// The parser's message, printable: it quotes the offending bytes, which may be invalid UTF-8,
// and the message may itself go into a JSON error body.
inline std::string printable(std::string what) {
  for (char& c : what)
    if (static_cast<unsigned char>(c) >= 0x80 || static_cast<unsigned char>(c) < 0x20) c = '?';
  return what;
}

// The member whose value a parse error is in, found by parsing `text` again and following the
// keys (only on the error path: the callback parser is slower).
template <class Json>
std::string member_at_error(std::string_view text) {
  std::vector<std::string> path;
  const auto follow = [&path](int depth, nlohmann::json::parse_event_t event, Json& parsed) {
    if (event == nlohmann::json::parse_event_t::key) {
      path.resize(depth > 0 ? static_cast<size_t>(depth - 1) : 0);
      path.push_back(parsed.template get<std::string>());
    } else if (event == nlohmann::json::parse_event_t::object_end) {
      path.resize(static_cast<size_t>(std::max(depth, 0)));
    }
    return true;
  };
  try {
    [[maybe_unused]] const Json parsed = Json::parse(text.begin(), text.end(), follow);
  } catch (const nlohmann::json::exception&) {
  }
  std::string field;
  for (const auto& key : path)
    if (!key.empty()) field += (field.empty() ? "" : ".") + key;
  return field;
}

}  // namespace detail

// What one linear scan of JSON text finds: its deepest nesting and its largest object.
struct Shape {
  int depth = 0;        // deepest nesting of arrays and objects
  size_t max_keys = 0;  // most members of one object (duplicates counted)
};

// The shape of `text` (brackets, colons inside strings do not count). Linear, no recursion, no
// allocation past the nesting it has seen; meaningful for valid JSON, harmless for invalid.
inline Shape shape(std::string_view text) {
  Shape out;
  // Per open container: the members counted so far (SIZE_MAX marks an array).
  constexpr size_t kArray = static_cast<size_t>(-1);
  std::string open;  // '{' or '[' per level
  std::basic_string<size_t> counts;
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
      counts.push_back(c == '{' ? 0 : kArray);
      if (static_cast<int>(counts.size()) > out.depth) out.depth = static_cast<int>(counts.size());
    } else if ((c == ']' || c == '}') && !counts.empty()) {
      counts.pop_back();
    } else if (c == ':' && !counts.empty() && counts.back() != kArray) {
      if (++counts.back() > out.max_keys) out.max_keys = counts.back();
    }
  }
  return out;
}

// The deepest nesting of arrays and objects in `text` (brackets inside strings do not count).
inline int nesting_depth(std::string_view text) {
  return shape(text).depth;
}

// Bounds on the text parse() accepts. max_keys bounds each object's members: nlohmann's
// ordered_json finds a key by a linear search, so building an object of n keys costs n^2, and
// 95,000 keys (855 KB) took 20 s; 0 means no bound (checkpoint headers hold thousands).
struct Limits {
  int max_depth = kMaxDepth;
  size_t max_keys = 0;
};

// Parses `text`, refusing what `limits` exclude before building anything. Throws Error.
template <class Json = nlohmann::json>
Json parse(std::string_view text, Limits limits) {
  // JSON text never holds a raw NUL; nlohmann's parser would stop there and accept what came
  // before, ignoring the rest.
  if (text.find('\0') != std::string_view::npos) throw Error("JSON text contains a NUL byte");
  const Shape s = shape(text);
  if (s.depth > limits.max_depth)
    throw Error("JSON nested deeper than " + std::to_string(limits.max_depth) + " levels");
  if (limits.max_keys > 0 && s.max_keys > limits.max_keys)
    throw Error("a JSON object has more than " + std::to_string(limits.max_keys) + " members");
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::out_of_range& e) {
    // A number past a double's range (1e400): valid JSON, so name the member it is for.
    throw Error(detail::printable(e.what()), detail::member_at_error<Json>(text));
  } catch (const nlohmann::json::exception& e) {
    throw Error(detail::printable(e.what()));
  }
}

// Parses `text`, refusing nesting deeper than `max_depth`. Throws Error.
template <class Json = nlohmann::json>
Json parse(std::string_view text, int max_depth = kMaxDepth) {
  return parse<Json>(text, Limits{max_depth, 0});
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
