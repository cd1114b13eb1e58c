// /v1/events text frames through server::parse_ws_command(), which is noexcept: any exception
// terminates (a finding), as does a sanitizer report. Properties: a command's job id is at most
// 128 bytes (an empty one is passed on: the session answers not_found), error kinds carry a
// message and no id, and the reply the session would build from the result serializes.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "finding.h"
#include "server/ws_command.h"

using sdserve::server::WsCommand;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const WsCommand c = sdserve::server::parse_ws_command(text);
  const std::string type = sdserve::server::ws_command_error_type(c.kind);
  switch (c.kind) {
    case WsCommand::kSubscribe:
    case WsCommand::kUnsubscribe:
      if (c.job_id.size() > sdserve::server::kMaxWsJobIdLength) finding("job id too long");
      if (!type.empty() || !c.message.empty()) finding("a command with an error");
      break;
    case WsCommand::kInvalidJson:
    case WsCommand::kInvalid:
      if (!c.job_id.empty()) finding("an error with a job id");
      if (c.message.empty() || type.empty()) finding("an error without a message or type");
      break;
    default:
      finding("kind out of range: " + std::to_string(static_cast<int>(c.kind)));
  }
  // What WsSession::send_control builds: must not throw (e.g. on invalid UTF-8 in the id).
  nlohmann::ordered_json reply = {{"type", type.empty() ? "subscribed" : "error"},
                                  {"job_id", c.job_id}};
  if (!type.empty()) reply["error"] = {{"type", type}, {"message", c.message}};
  try {
    (void)reply.dump();
  } catch (const nlohmann::json::exception& e) {
    finding(std::string("the reply does not serialize: ") + e.what());
  }
  return 0;
}
