// Request bodies as the router handles them: server::parse_body() (the one body parser), then
// every route that takes a body, each given the same parsed body:
//   POST /v1/jobs, /v1/generate      job_request()
//   POST /sdapi/v1/txt2img           a1111::translate_txt2img(), then job_request() on the /v1
//                                    body it made (as submit_job() does), errors renamed()
//   POST /sdapi/v1/png-info          a1111::png_info()
// Documented: ApiError 400 (invalid_json or validation_error). Anything else escaping, or a
// sanitizer report, is a finding. Property: an accepted /v1 request, rendered by request_json()
// and parsed again, is accepted and renders the same.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "config/safe_json.h"
#include "finding.h"
#include "server/a1111.h"
#include "server/api_json.h"

using sdserve::server::ApiError;
using sdserve::server::BodyJson;
using sdserve::server::Json;
namespace server = sdserve::server;

namespace {

void check_refusal(const ApiError& e, const char* route) {
  if (e.status != 400 || (e.type != "invalid_json" && e.type != "validation_error"))
    finding(std::string(route) + ": unexpected ApiError " + std::to_string(e.status) + " " +
            e.type);
  server::error_body(e.type, e.what(), e.field);
}

// request_json() without its nulls (absent seed/timeout_s/preview), as a client would send it.
std::string resend_body(const Json& j) {
  Json body = Json::object();
  for (const auto& [k, v] : j.items())
    if (!v.is_null()) body[k] = v;
  return body.dump();
}

void v1_jobs(const BodyJson& doc, const sdserve::engine::RequestBounds& limits) {
  sdserve::engine::JobRequest r;
  try {
    r = server::job_request(doc, limits);
  } catch (const ApiError& e) {
    return check_refusal(e, "/v1/jobs");
  }
  const Json first = server::request_json(r);
  const std::string again = resend_body(first);
  try {
    const auto r2 = server::parse_job_request(again, limits);
    const Json second = server::request_json(r2);
    if (second != first)
      finding("request_json differs after a round trip:\n" + first.dump() + "\n" + second.dump());
  } catch (const ApiError& e) {
    finding("an accepted request, re-sent as " + again + ", is refused: " + e.what());
  }
}

void txt2img(const BodyJson& doc, const sdserve::engine::RequestBounds& limits) {
  try {
    const auto t = server::a1111::translate_txt2img(doc, nullptr);
    try {
      server::job_request(t.native, limits);
    } catch (const ApiError& e) {
      check_refusal(server::a1111::renamed(e), "/sdapi/v1/txt2img (as /v1)");
    }
    sdserve::safe_json::dump(t.echo);
  } catch (const ApiError& e) {
    check_refusal(e, "/sdapi/v1/txt2img");
  }
}

void png_info(const BodyJson& doc) {
  try {
    sdserve::safe_json::dump(server::a1111::png_info(doc));
  } catch (const ApiError& e) {
    check_refusal(e, "/sdapi/v1/png-info");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string body(reinterpret_cast<const char*>(data), size);
  const sdserve::engine::RequestBounds limits;
  BodyJson doc;
  try {
    doc = server::parse_body(body);
  } catch (const ApiError& e) {
    check_refusal(e, "parse_body");
    return 0;
  }
  v1_jobs(doc, limits);
  txt2img(doc, limits);
  png_info(doc);
  return 0;
}
