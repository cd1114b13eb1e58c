#include "config/values.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <sstream>

#include "config/safe_json.h"

namespace sdserve::config {

using detail::find_key;
using detail::json;
using detail::Key;
using detail::known_keys;
using detail::num;
using detail::Type;

namespace {

std::string range_text(const Key& k) {
  return (k.lo_exclusive ? "greater than " + num(k.lo) + " and at most "
                         : "between " + num(k.lo) + " and ") +
         num(k.hi);
}

[[noreturn]] void fail(const std::string& source, const Key& k, const std::string& what,
                       const json& got) {
  throw ConfigError(source + ": " + k.name + " " + what + ", got " + safe_json::describe(got));
}

bool in_range(const Key& k, double v) {
  return (k.lo_exclusive ? v > k.lo : v >= k.lo) && v <= k.hi;
}

void check_int(const Key& k, const json& v, const std::string& source, const json& whole) {
  const std::string what =
      k.type == Type::kIntList ? "must be a list of integers each " : "must be an integer ";
  if (!v.is_number_integer()) fail(source, k, what + range_text(k), whole);
  const double d = v.is_number_unsigned() ? static_cast<double>(v.get<uint64_t>())
                                          : static_cast<double>(v.get<int64_t>());
  if (!in_range(k, d)) fail(source, k, what + range_text(k), whole);
}

// Checks `v` against the key's type and range, then stores it.
void check_and_set(ServiceConfig& c, const Key& k, const json& v, const std::string& source) {
  switch (k.type) {
    case Type::kString:
      if (!v.is_string()) fail(source, k, "must be a string", v);
      if (!k.choices.empty() &&
          std::find(k.choices.begin(), k.choices.end(), v.get<std::string>()) == k.choices.end()) {
        std::string list;
        for (const auto& s : k.choices) list += (list.empty() ? "" : ", ") + s;
        fail(source, k, "must be one of " + list, v);
      }
      break;
    case Type::kInt:
      check_int(k, v, source, v);
      break;
    case Type::kNumber:
      if (!v.is_number() || !in_range(k, v.get<double>()))
        fail(source, k, "must be a number " + range_text(k), v);
      break;
    case Type::kBool:
      if (!v.is_boolean()) fail(source, k, "must be true or false", v);
      break;
    case Type::kIntList:
      if (!v.is_array() || v.empty())
        fail(source, k, "must be a non-empty list of integers " + range_text(k), v);
      for (const auto& e : v) check_int(k, e, source, v);
      break;
    case Type::kStringList:
      if (!v.is_array()) fail(source, k, "must be a list of strings", v);
      for (const auto& e : v)
        if (!e.is_string() || e.get<std::string>().empty())
          fail(source, k, "must be a list of non-empty strings", v);
      break;
  }
  k.set(c, v);
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::string item;
  std::istringstream in(s);
  while (std::getline(in, item, ','))
    if (!trim(item).empty()) out.push_back(trim(item));
  return out;
}

}  // namespace

json detail::from_text(const Key& k, const std::string& text) {
  const std::string t = trim(text);
  auto integer = [](const std::string& s) -> json {
    if (s.empty()) return json(s);
    size_t used = 0;
    try {
      if (s[0] == '-') {
        const long long v = std::stoll(s, &used);
        if (used == s.size()) return json(v);
      } else {
        const unsigned long long v = std::stoull(s, &used);
        if (used == s.size()) return json(static_cast<uint64_t>(v));
      }
    } catch (const std::exception&) {
    }
    return json(s);
  };
  switch (k.type) {
    case Type::kString:
      return json(text);
    case Type::kInt:
      return integer(t);
    case Type::kNumber: {
      size_t used = 0;
      try {
        const double v = std::stod(t, &used);
        if (used == t.size() && std::isfinite(v)) return json(v);
      } catch (const std::exception&) {
      }
      return json(text);
    }
    case Type::kBool: {
      std::string l = t;
      std::transform(l.begin(), l.end(), l.begin(),
                     [](unsigned char ch) { return std::tolower(ch); });
      if (l == "true" || l == "1" || l == "yes" || l == "on") return json(true);
      if (l == "false" || l == "0" || l == "no" || l == "off") return json(false);
      return json(text);
    }
    case Type::kIntList:
    case Type::kStringList: {
      if (!t.empty() && t[0] == '[') {
        try {
          return safe_json::parse(t);
        } catch (const safe_json::Error&) {
          return json(text);
        }
      }
      json arr = json::array();
      for (const auto& item : split_commas(t))
        arr.push_back(k.type == Type::kIntList ? integer(item) : json(item));
      return arr;
    }
  }
  return json(text);
}

void apply_json(ServiceConfig& config, const std::string& json_text, const std::string& source) {
  json doc;
  try {
    doc = safe_json::parse(json_text);
  } catch (const safe_json::Error& e) {
    throw ConfigError(source + ": not valid JSON (" + e.what() + ")");
  }
  if (!doc.is_object()) throw ConfigError(source + ": must be a JSON object of keys");
  for (const auto& [name, value] : doc.items()) {
    const Key* k = find_key(name);
    if (!k)
      throw ConfigError(source + ": unknown key '" + name + "' (known: " + known_keys() + ")");
    check_and_set(config, *k, value, source);
  }
}

void apply_value(ServiceConfig& config, const std::string& key, const std::string& value,
                 const std::string& source) {
  const Key* k = find_key(key);
  if (!k) throw ConfigError(source + ": unknown key '" + key + "' (known: " + known_keys() + ")");
  const json v = from_text(*k, value);
  // "," names no item: taken as an empty list it would silently mean "none" (for api_keys, a
  // service open to everyone). Only empty text (or "[]") is an empty list.
  const std::string text = trim(value);
  if (v.is_array() && v.empty() && !text.empty() && text[0] != '[')
    fail(source, *k,
         "holds no item after splitting on commas; leave it empty or unset for none, or name "
         "at least one",
         json(value));
  check_and_set(config, *k, v, source);
}

}  // namespace sdserve::config
