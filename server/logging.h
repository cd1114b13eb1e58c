// spdlog set-up, and the bridge that forwards the pipeline's messages to it. Lives apart from
// any torch code: spdlog's fmt 9 and torch 2.x's bundled fmt cannot meet in one translation unit.
#pragma once

#include <string>
#include <vector>

namespace sdserve {

// level: trace|debug|info|warn|error; format: text|json. Throws std::invalid_argument.
void setup_logging(const std::string& level = "info", const std::string& format = "text");

// A log line with named fields: in text mode "message key=value ...", in JSON mode each field
// its own member beside "msg" (numbers unquoted). Code without spdlog (the engine, through
// pipeline::log) appends fields to a message as "\x1fkey=value" each; the sink splits them off.
struct LogField {
  std::string key, value;
  bool number = false;  // emit unquoted in JSON
  bool text = true;     // also in text mode (false: the message already says it)
};
enum class LogLevel { kDebug, kInfo, kWarn, kError };
void log_fields(LogLevel level, const std::string& message, const std::vector<LogField>& fields);

}  // namespace sdserve
