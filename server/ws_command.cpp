#include "server/ws_command.h"

#include <nlohmann/json.hpp>

#include "config/safe_json.h"

namespace sdserve::server {
namespace {

using json = nlohmann::json;

constexpr const char* kUsage = "send {\"subscribe\": \"JOB_ID\"} or {\"unsubscribe\": \"JOB_ID\"}";

WsCommand error(WsCommand::Kind kind, std::string message) {
  WsCommand c;
  c.kind = kind;
  c.message = std::move(message);
  return c;
}

WsCommand parse(const std::string& text) {
  if (safe_json::nesting_depth(text) > kMaxWsCommandDepth)
    return error(WsCommand::kInvalidJson, "commands are JSON objects (this one nests deeper than " +
                                              std::to_string(kMaxWsCommandDepth) + " levels)");
  json cmd;
  try {
    cmd = safe_json::parse(text, kMaxWsCommandDepth);
  } catch (const safe_json::Error&) {
    return error(WsCommand::kInvalidJson, "commands are JSON objects");
  }
  if (!cmd.is_object() || cmd.size() != 1) return error(WsCommand::kInvalid, kUsage);
  const auto it = cmd.begin();
  WsCommand c;
  if (it.key() == "subscribe")
    c.kind = WsCommand::kSubscribe;
  else if (it.key() == "unsubscribe")
    c.kind = WsCommand::kUnsubscribe;
  else
    return error(WsCommand::kInvalid, kUsage);
  if (!it.value().is_string()) return error(WsCommand::kInvalid, kUsage);
  c.job_id = it.value().get<std::string>();
  if (c.job_id.size() > kMaxWsJobIdLength)
    return error(WsCommand::kInvalid,
                 "job ids are at most " + std::to_string(kMaxWsJobIdLength) + " characters");
  return c;
}

}  // namespace

WsCommand parse_ws_command(const std::string& text) noexcept {
  try {
    return parse(text);
  } catch (...) {  // bad_alloc while copying: still an answer, never an exception
    WsCommand c;
    c.kind = WsCommand::kInvalid;
    c.message = "bad command";  // short enough not to allocate
    return c;
  }
}

const char* ws_command_error_type(WsCommand::Kind kind) noexcept {
  switch (kind) {
    case WsCommand::kInvalidJson:
      return "invalid_json";
    case WsCommand::kInvalid:
      return "invalid_command";
    default:
      return "";
  }
}

}  // namespace sdserve::server
