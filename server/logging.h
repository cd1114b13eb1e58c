// spdlog set-up, and the bridge that forwards the pipeline's messages to it. Lives apart from
// any torch code: spdlog's fmt 9 and torch 2.x's bundled fmt cannot meet in one translation unit.
#pragma once

#include <string>

namespace sdserve {

// level: trace|debug|info|warn|error; format: text|json. Throws std::invalid_argument.
void setup_logging(const std::string& level = "info", const std::string& format = "text");

}  // namespace sdserve
