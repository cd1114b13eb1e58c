// Small helpers for matching checkpoint tensor names ("model.diffusion_model.input_blocks.1.").
#pragma once

#include <string>

namespace sdserve::pipeline {

inline bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A block index as it appears inside a name.
inline std::string idx(int i) {
  return std::to_string(i);
}

}  // namespace sdserve::pipeline
