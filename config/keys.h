// The key table behind config.h, internal to config/: each key's name, type, range, help and
// member of ServiceConfig. The file, environment and flag layers, --help and the start-up log all
// read it, so a key is added in one place.
#pragma once

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config/config.h"

namespace sdserve::config::detail {

using nlohmann::json;

enum class Type { kString, kInt, kNumber, kBool, kIntList, kStringList };

// How one key is checked, read and written. Values arrive as JSON (file) or text (env, flags);
// text is first turned into JSON by type, so both paths share one checker.
struct Key {
  std::string name;
  Type type;
  std::string help;
  double lo = 0, hi = 0;             // numeric range (ints, numbers, list elements)
  bool lo_exclusive = false;         // "> lo" instead of ">= lo"
  std::vector<std::string> choices;  // allowed strings; empty: any
  std::function<json(const ServiceConfig&)> get;
  std::function<void(ServiceConfig&, const json&)> set;
};

// Every key, in --help's order.
const std::vector<Key>& table();
const Key* find_key(const std::string& name);  // nullptr: not a key
std::string known_keys();                      // "host, port, ...", for error messages
std::string num(double v);                     // 600 rather than 600.000000

}  // namespace sdserve::config::detail
