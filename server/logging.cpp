#include "server/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <spdlog/pattern_formatter.h>

#include <memory>
#include <stdexcept>

#include "pipeline/log.h"

namespace sdserve {
namespace {

// %j: the message as the inside of a JSON string (quotes, backslashes and control characters
// escaped), so that JSON log lines stay parseable whatever a prompt contains.
class JsonMessageFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    static const char* hex = "0123456789abcdef";
    for (char c : msg.payload) {
      const auto u = static_cast<unsigned char>(c);
      if (c == '"' || c == '\\') {
        dest.push_back('\\');
        dest.push_back(c);
      } else if (u < 0x20) {
        const char esc[] = {'\\', 'u', '0', '0', hex[u >> 4], hex[u & 15]};
        dest.append(esc, esc + 6);
      } else {
        dest.push_back(c);
      }
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonMessageFlag>();
  }
};

}  // namespace

void setup_logging(const std::string& level, const std::string& format) {
  const auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off")
    throw std::invalid_argument("log level '" + level +
                                "' is unknown; use trace, debug, info, warn or error");
  if (!spdlog::get("sdserve")) spdlog::set_default_logger(spdlog::stderr_color_mt("sdserve"));
  spdlog::set_level(lvl);
  if (format == "json") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>();
    formatter->add_flag<JsonMessageFlag>('j').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%e%z","level":"%l","msg":"%j"})");
    spdlog::set_formatter(std::move(formatter));
  } else if (format == "text") {
    spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%-5l%$ %v");
  } else {
    throw std::invalid_argument("log format '" + format + "' is unknown; use text or json");
  }
  pipeline::set_log_sink([](pipeline::LogLevel l, const std::string& msg) {
    switch (l) {
      case pipeline::LogLevel::kDebug:
        spdlog::debug("{}", msg);
        break;
      case pipeline::LogLevel::kInfo:
        spdlog::info("{}", msg);
        break;
      case pipeline::LogLevel::kWarn:
        spdlog::warn("{}", msg);
        break;
      case pipeline::LogLevel::kError:
        spdlog::error("{}", msg);
        break;
    }
  });
}

}  // namespace sdserve
