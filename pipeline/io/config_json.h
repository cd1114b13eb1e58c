// Reading diffusers' config.json files: absent and null keys take diffusers' default, as
// diffusers does for older configs; a value of the wrong type is a ModelError naming the file
// and the key.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "pipeline/errors.h"

namespace sdserve::pipeline {

// "<file>: unsupported <key> = <value> (<why>)"
[[noreturn]] inline void unsupported_config(const std::string& file, const std::string& key,
                                            const nlohmann::json& value, const std::string& why) {
  throw ModelError(file + ": unsupported " + key + " = " + value.dump() + " (" + why + ")");
}

template <typename T>
T config_value(const nlohmann::json& j, const std::string& key, T fallback,
               const std::string& file) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const nlohmann::json::exception&) {
    unsupported_config(file, key, *it, "wrong type");
  }
}

}  // namespace sdserve::pipeline
