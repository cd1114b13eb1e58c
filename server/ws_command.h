// Parsing of the commands a client sends on /v1/events: {"subscribe": "ID"} or
// {"unsubscribe": "ID"}. Pure (no Beast, no engine), so it is unit- and fuzz-testable.
#pragma once

#include <cstddef>
#include <string>

namespace sdserve::server {

// Job ids longer than this are refused (kInvalid) and never echoed back.
constexpr std::size_t kMaxWsJobIdLength = 128;
// Commands nesting arrays/objects deeper than this are refused before parsing (kInvalidJson).
constexpr int kMaxWsCommandDepth = 64;

struct WsCommand {
  enum Kind { kSubscribe, kUnsubscribe, kInvalidJson, kInvalid } kind = kInvalid;
  std::string job_id;   // kSubscribe / kUnsubscribe only: 1..kMaxWsJobIdLength bytes, valid UTF-8
  std::string message;  // kInvalidJson / kInvalid only: user-facing, never contains the text sent
};

// One text frame as a command: exactly one key, "subscribe" or "unsubscribe", whose value is a
// string. Never throws.
WsCommand parse_ws_command(const std::string& text) noexcept;

// The error type for the client's {"error": {"type": ...}}: "invalid_json" or "invalid_command";
// "" for kSubscribe / kUnsubscribe.
const char* ws_command_error_type(WsCommand::Kind kind) noexcept;

}  // namespace sdserve::server
