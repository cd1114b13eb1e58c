// POST /v1/jobs and /v1/generate bodies through server::parse_job_request().
// Documented: ApiError (400, invalid_json or validation_error). Anything else escaping, or a
// sanitizer report, is a finding. Property: an accepted request, rendered by request_json() and
// parsed again, is accepted and renders the same.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "finding.h"
#include "server/api_json.h"

using sdserve::server::ApiError;
using sdserve::server::Json;

namespace {

// request_json() without its nulls (absent seed/timeout_s/preview), as a client would send it.
std::string resend_body(const Json& j) {
  Json body = Json::object();
  for (const auto& [k, v] : j.items())
    if (!v.is_null()) body[k] = v;
  return body.dump();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string body(reinterpret_cast<const char*>(data), size);
  sdserve::engine::RequestBounds limits;
  sdserve::engine::JobRequest r;
  try {
    r = sdserve::server::parse_job_request(body, limits);
  } catch (const ApiError& e) {
    if (e.status != 400 || (e.type != "invalid_json" && e.type != "validation_error"))
      finding("unexpected ApiError " + std::to_string(e.status) + " " + e.type);
    sdserve::server::error_body(e.type, e.what(), e.field);
    return 0;
  }
  const Json first = sdserve::server::request_json(r);
  const std::string again = resend_body(first);
  try {
    const auto r2 = sdserve::server::parse_job_request(again, limits);
    const Json second = sdserve::server::request_json(r2);
    if (second != first)
      finding("request_json differs after a round trip:\n" + first.dump() + "\n" + second.dump());
  } catch (const ApiError& e) {
    finding("an accepted request, re-sent as " + again + ", is refused: " + e.what());
  }
  return 0;
}
