#include "server/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <spdlog/pattern_formatter.h>

#include <cctype>
#include <memory>
#include <stdexcept>
#include <string_view>

#include "pipeline/log.h"

namespace sdserve {
namespace {

// The length of the valid UTF-8 sequence starting at s[i] (RFC 3629: no overlong forms, no
// surrogates, at most U+10FFFF), 0 when the bytes there are not one.
size_t utf8_length(std::string_view s, size_t i) {
  const auto at = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char c = at(0);
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (i + n > s.size() || at(1) < lo || at(1) > hi) return 0;
  for (size_t k = 2; k < n; ++k)
    if ((at(k) & 0xC0) != 0x80) return 0;
  return n;
}

// Quotes, backslashes and control characters escaped, invalid UTF-8 replaced by U+FFFD: the
// inside of a JSON string, whatever bytes a client put into a path, a header or a prompt.
void append_escaped(std::string_view s, spdlog::memory_buf_t& dest) {
  static const char* hex = "0123456789abcdef";
  for (size_t i = 0; i < s.size();) {
    const char c = s[i];
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      dest.push_back('\\');
      dest.push_back(c);
    } else if (u < 0x20) {
      const char esc[] = {'\\', 'u', '0', '0', hex[u >> 4], hex[u & 15]};
      dest.append(esc, esc + 6);
    } else if (u >= 0x80) {
      const size_t n = utf8_length(s, i);
      if (n == 0) {
        dest.append(std::string_view("\\ufffd"));
        ++i;
      } else {
        dest.append(s.substr(i, n));
        i += n;
      }
      continue;
    } else {
      dest.push_back(c);
    }
    ++i;
  }
}

// %j: the message as the inside of a JSON string, so that JSON log lines stay parseable
// whatever a prompt contains.
class JsonMessageFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    append_escaped(std::string_view(msg.payload.data(), msg.payload.size()), dest);
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonMessageFlag>();
  }
};

// The fields of the line being formatted on this thread (spdlog's default logger is
// synchronous: the formatter runs inside the logging call).
thread_local const std::vector<LogField>* t_fields = nullptr;
bool g_json = false;

// %F: the line's fields as JSON members, each preceded by a comma.
class JsonFieldsFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg&, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    if (!t_fields) return;
    for (const auto& f : *t_fields) {
      dest.append(std::string_view(",\""));
      append_escaped(f.key, dest);
      dest.append(std::string_view(f.number ? "\":" : "\":\""));
      append_escaped(f.value, dest);
      if (!f.number) dest.push_back('"');
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonFieldsFlag>();
  }
};

spdlog::level::level_enum to_spdlog(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug:
      return spdlog::level::debug;
    case LogLevel::kInfo:
      return spdlog::level::info;
    case LogLevel::kWarn:
      return spdlog::level::warn;
    case LogLevel::kError:
      break;
  }
  return spdlog::level::err;
}

// "msg\x1fk=v\x1fk=v" from code without spdlog: the message and its fields.
void log_split(LogLevel level, const std::string& line) {
  const auto first = line.find('\x1f');
  if (first == std::string::npos) return log_fields(level, line, {});
  std::vector<LogField> fields;
  size_t at = first;
  while (at != std::string::npos) {
    const auto next = line.find('\x1f', at + 1);
    const std::string part = line.substr(at + 1, next == std::string::npos ? next : next - at - 1);
    const auto eq = part.find('=');
    if (eq != std::string::npos && eq > 0) {
      LogField f{part.substr(0, eq), part.substr(eq + 1), false};
      f.number = !f.value.empty() &&
                 f.value.find_first_not_of("0123456789.-") == std::string::npos &&
                 std::isdigit(static_cast<unsigned char>(f.value.back()));
      fields.push_back(std::move(f));
    }
    at = next;
  }
  log_fields(level, line.substr(0, first), fields);
}

}  // namespace

void log_fields(LogLevel level, const std::string& message, const std::vector<LogField>& fields) {
  const auto lvl = to_spdlog(level);
  if (!spdlog::should_log(lvl)) return;
  if (g_json) {
    t_fields = &fields;
    spdlog::log(lvl, "{}", message);
    t_fields = nullptr;
    return;
  }
  std::string line = message;
  for (const auto& f : fields) {
    if (!f.text) continue;
    line += ' ';
    line += f.key;
    line += '=';
    line += f.value.empty() ? "-" : f.value;
  }
  spdlog::log(lvl, "{}", line);
}

void setup_logging(const std::string& level, const std::string& format) {
  const auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off")
    throw std::invalid_argument("log level '" + level +
                                "' is unknown; use trace, debug, info, warn or error");
  if (!spdlog::get("sdserve")) spdlog::set_default_logger(spdlog::stderr_color_mt("sdserve"));
  spdlog::set_level(lvl);
  if (format == "json") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>();
    formatter->add_flag<JsonMessageFlag>('j').add_flag<JsonFieldsFlag>('F').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%e%z","level":"%l","msg":"%j"%F})");
    spdlog::set_formatter(std::move(formatter));
    g_json = true;
  } else if (format == "text") {
    spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%-5l%$ %v");
    g_json = false;
  } else {
    throw std::invalid_argument("log format '" + format + "' is unknown; use text or json");
  }
  pipeline::set_log_sink([](pipeline::LogLevel l, const std::string& msg) {
    switch (l) {
      case pipeline::LogLevel::kDebug:
        return log_split(LogLevel::kDebug, msg);
      case pipeline::LogLevel::kInfo:
        return log_split(LogLevel::kInfo, msg);
      case pipeline::LogLevel::kWarn:
        return log_split(LogLevel::kWarn, msg);
      case pipeline::LogLevel::kError:
        return log_split(LogLevel::kError, msg);
    }
  });
}

}  // namespace sdserve
