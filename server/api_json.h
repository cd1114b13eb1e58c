// The API's JSON: request parsing (every error names its field) and how jobs, models and
// samplers are rendered. No networking here, so it is testable on its own.
#pragma once

#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <string_view>

#include "engine/job.h"

namespace sdserve::pipeline {
struct ModelInfo;
}

namespace sdserve::server {

// Responses keep their keys in the order written ("id" first), unlike nlohmann::json.
using Json = nlohmann::ordered_json;

// An error the client sees: {"error": {"type", "message", "field"}} with an HTTP status.
struct ApiError : std::runtime_error {
  ApiError(int status, std::string type, const std::string& message, std::string field = "")
      : std::runtime_error(message),
        status(status),
        type(std::move(type)),
        field(std::move(field)) {}
  int status;
  std::string type;           // invalid_json, validation_error, unauthorized, not_found, ...
  std::string field;          // the offending request field, "" when none
  double retry_after_s = -1;  // sets Retry-After when >= 0
};

std::string error_body(const std::string& type, const std::string& message,
                       const std::string& field = "");

// A parsed request body: keys in a sorted map, so a lookup costs log(keys), never a scan.
using BodyJson = nlohmann::json;
// Members one object of a request body may have. A txt2img body has about 40 fields and the
// largest nested object (A1111's override_settings) a few dozen; more is refused before the
// object is built.
constexpr size_t kMaxBodyKeys = 256;

// The one parser of request bodies: the router calls it for every route that takes a body and
// hands the result to the route, which never sees the text. Nesting (safe_json::kMaxDepth) and
// members per object (kMaxBodyKeys) are checked by one linear scan before anything is built, so
// a body costs linear time and bounded stack whatever it holds. Throws ApiError 400
// invalid_json.
BodyJson parse_body(std::string_view body);

// The body of POST /v1/jobs and POST /v1/generate as a JobRequest, checked by
// engine::validate(). Throws ApiError (400): type invalid_json for a body that is not an object,
// validation_error naming the field otherwise. An absent or -1 seed is replaced by a random one
// here, so that it can be reported at once.
engine::JobRequest job_request(const BodyJson& doc, const engine::RequestBounds& bounds);
// parse_body() then job_request() (tests and fuzzing).
engine::JobRequest parse_job_request(const std::string& body, const engine::RequestBounds& bounds);
// The request fields in order (for messages and docs).
const std::vector<std::string>& request_fields();

std::string job_path(const std::string& id);  // "/v1/jobs/ID"
Json request_json(const engine::JobRequest& r);
Json job_json(const engine::JobSnapshot& job);
// One engine event as its WebSocket text frame ({"type": ..., "job_id": ..., ...}); a preview's
// image follows it as a binary frame. Final events carry `timings` in the job's REST shape.
Json event_json(const engine::JobEvent& event);
// {"queued", "started", "finished": ISO-8601 or null, "queue_s", "run_s": seconds or null}
Json timings_json(const engine::JobTimes& times);
Json model_json(const pipeline::ModelInfo& info);
Json samplers_json();
std::string iso8601(engine::WallClock::time_point t);  // "2026-01-02T03:04:05.678Z"
std::string base64(const std::vector<uint8_t>& bytes);

}  // namespace sdserve::server
