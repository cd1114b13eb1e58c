// One value of one key, internal to config/: text from the environment or a flag becomes JSON
// of the key's type, so that it and the file's JSON go through one checker (values.cpp, behind
// apply_json and apply_value).
#pragma once

#include <string>

#include "config/keys.h"

namespace sdserve::config::detail {

// Unparseable text becomes a JSON string, which the checker then refuses naming the key's type.
json from_text(const Key& k, const std::string& text);

}  // namespace sdserve::config::detail
