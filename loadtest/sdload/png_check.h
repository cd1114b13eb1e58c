// Decoding a fetched image in full, to check that it is a valid PNG of the requested size.
#pragma once

#include <string>

namespace sdload {

struct PngCheck {
  bool ok = false;
  int width = 0;
  int height = 0;
  std::string error;  // why not ok
};

// Decodes every row (a truncated or corrupt stream fails, not just a bad header) and compares
// the size with `width` x `height`.
PngCheck check_png(const std::string& bytes, int width, int height);

}  // namespace sdload
