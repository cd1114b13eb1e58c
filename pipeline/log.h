// The pipeline's only way to say something: a process-wide sink the application installs.
// Pipeline code must not include spdlog/fmt (they clash with torch 2.x's bundled fmt), so the
// executable forwards these messages to spdlog from a translation unit without torch.
#pragma once

#include <functional>
#include <string>

namespace sdserve::pipeline {

enum class LogLevel { kDebug, kInfo, kWarn, kError };
using LogSink = std::function<void(LogLevel, const std::string&)>;

// Thread-safe. Without a sink, messages go nowhere.
void set_log_sink(LogSink sink);
void log(LogLevel level, const std::string& message);

}  // namespace sdserve::pipeline
