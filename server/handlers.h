// Routing and the endpoints that answer at once. The HTTP session owns the two that do not:
// POST /v1/generate (waits for its job) and the WebSocket upgrades.
#pragma once

#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>
#include <string>

#include "server/api_json.h"
#include "server/context.h"

namespace sdserve::server {

namespace http = boost::beast::http;
using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

struct Route {
  enum Kind {
    kNotFound,
    kHealthz,
    kReadyz,
    kMetrics,
    kModels,
    kSamplers,
    kJobs,       // /v1/jobs
    kJob,        // /v1/jobs/{id}
    kJobImage,   // /v1/jobs/{id}/images/{k}
    kJobEvents,  // /v1/jobs/{id}/events (WebSocket)
    kEvents,     // /v1/events (WebSocket)
    kGenerate,   // /v1/generate
    kPage,       // / (server/web/index.html)
    // AUTOMATIC1111's API (server/a1111.h)
    kSdTxt2Img,     // POST /sdapi/v1/txt2img (waits for its job, as /v1/generate)
    kSdImg2Img,     // POST /sdapi/v1/img2img (the same, from an init image)
    kSdSamplers,    // /sdapi/v1/samplers
    kSdSchedulers,  // /sdapi/v1/schedulers
    kSdModels,      // /sdapi/v1/sd-models
    kSdOptions,     // /sdapi/v1/options
    kSdProgress,    // /sdapi/v1/progress (the caller's jobs)
    kSdInterrupt,   // POST /sdapi/v1/interrupt (the caller's jobs)
    kSdPngInfo,     // POST /sdapi/v1/png-info
    // Models (server/model_routes.h)
    kModelsRefresh,         // POST /v1/models/refresh
    kSdVae,                 // /sdapi/v1/sd-vae
    kSdLoras,               // /sdapi/v1/loras
    kSdEmbeddings,          // /sdapi/v1/embeddings
    kSdRefreshCheckpoints,  // POST /sdapi/v1/refresh-checkpoints
    kSdRefreshLoras,        // POST /sdapi/v1/refresh-loras
    kSdRefreshVae,          // POST /sdapi/v1/refresh-vae
  } kind = kNotFound;
  std::string job_id;
  std::string image;  // {k} as written
  std::string query;  // after '?'
};

// An id token: 1-128 characters of [A-Za-z0-9._-] (job ids in paths, X-Request-Id).
bool valid_id(const std::string& id);
Route match_route(const std::string& target);
// "/v1/jobs/{id}": the route's template for metrics (bounded label values); "other" for none.
const char* route_template(Route::Kind kind);
// "GET, DELETE": the methods a route answers (for 405 and Allow).
std::string allowed_methods(Route::Kind kind);
bool method_allowed(Route::Kind kind, http::verb method);
std::string path_of(const std::string& target);  // target without the query

// CORS (config cors_allow_origins): adds Access-Control-Allow-Origin and friends to `res` when the
// request's Origin is allowed; nothing otherwise (browsers then keep the answer from the page).
void add_cors_headers(const Context& ctx, const Request& req, Response& res);
// OPTIONS on a route: 204 with Allow, plus the preflight's Access-Control-Allow-Methods /
// -Headers / -Max-Age when the Origin is allowed. No API key needed (browsers send none).
Response options_response(const Context& ctx, const Request& req, const Route& route);

// A query parameter, percent-decoded ("a%2Bb" -> "a+b"; '+' stays '+'); "" when absent.
std::string query_param(const std::string& query, const std::string& name);

// Throws ApiError 401 when API keys are configured and the request carries none of them.
void check_auth(const Context& ctx, const Request& req, const Route& route);

Response json_response(http::status status, const Json& body, const Request& req);
Response error_response(const ApiError& error, const Request& req);

// Whether a route reads a JSON body (POST /v1/jobs, /v1/generate, /sdapi/v1/txt2img,
// /sdapi/v1/png-info). The router parses it with parse_body() before the route runs and hands it
// over; routes never read req.body() themselves. Others ignore any body.
bool takes_body(Route::Kind kind);
// The body of a route that takes one, parsed: JSON through parse_body(), or, on POST /v1/jobs
// and /v1/generate, a multipart/form-data form (server/multipart.h) as the same JSON; null for
// routes that take none. Throws ApiError (400; 415 for a form on a JSON-only route).
BodyJson request_body(const Request& req, Route::Kind kind);
// Whether a route submits a job (its 400s count in sdserve_jobs_rejected_total{reason="invalid"}).
bool submits_job(Route::Kind kind);

// Everything but generate and the upgrades. `body`: the parsed body (null for routes that take
// none). `job_id` receives the job a request concerns (log).
Response handle_request(Context& ctx, const Request& req, const Route& route, const BodyJson& body,
                        std::string& job_id);

// Shared by POST /v1/jobs, /v1/generate and /sdapi/v1/txt2img: validate, submit, map engine
// exceptions. `body` is a /v1 job body (the request's own, or one translated from A1111's).
engine::JobSnapshot submit_job(Context& ctx, const Request& req, const BodyJson& body);

}  // namespace sdserve::server
