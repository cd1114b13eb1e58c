#include "pipeline/log.h"

#include <mutex>

namespace sdserve::pipeline {
namespace {
std::mutex sink_mutex;
LogSink sink;  // guarded by sink_mutex
}  // namespace

void set_log_sink(LogSink s) {
  std::lock_guard<std::mutex> lock(sink_mutex);
  sink = std::move(s);
}

void log(LogLevel level, const std::string& message) {
  LogSink copy;
  {
    std::lock_guard<std::mutex> lock(sink_mutex);
    copy = sink;
  }
  if (copy) copy(level, message);
}

}  // namespace sdserve::pipeline
