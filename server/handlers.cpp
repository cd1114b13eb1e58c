#include "server/handlers.h"

#include <algorithm>
#include <boost/url/params_encoded_view.hpp>  // implementation: cache/redis_client.cpp
#include <boost/url/parse_query.hpp>
#include <cmath>
#include <optional>

#include "config/safe_json.h"
#include "pipeline/errors.h"
#include "pipeline/extra_networks.h"
#include "server/a1111.h"
#include "server/model_routes.h"
#include "server/multipart.h"
#include "server/web_page.h"

namespace sdserve::server {
namespace {

using json = Json;
namespace urls = boost::urls;

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 1;
  while (start <= path.size()) {
    const size_t end = path.find('/', start);
    parts.push_back(path.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return parts;
}

// Constant time in the key's length, so that timing does not reveal a key's prefix.
bool same_key(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= a[i] ^ b[i % std::max<size_t>(b.size(), 1)];
  return diff == 0 && !b.empty();
}

ApiError not_found_job(const std::string& id) {
  return ApiError(404, "not_found",
                  "job '" + id + "' not found (unknown, or forgotten after result_ttl_s)");
}

std::shared_ptr<engine::Engine> require_engine(Context& ctx) {
  auto e = ctx.engine();
  if (!e) {
    ApiError err(503, "not_ready", "the model is still loading; retry shortly (see /readyz)");
    err.retry_after_s = 5;
    throw err;
  }
  return e;
}

Response image_response(Context& ctx, const Request& req, const Route& route) {
  auto engine = require_engine(ctx);
  const std::string& k = route.image;
  if (k.empty() || k.size() > 4 || k.find_first_not_of("0123456789") != std::string::npos)
    throw ApiError(404, "not_found", "no image '" + k + "': images are numbered 0, 1, ...");
  const int index = std::stoi(k);
  const auto result = engine->image(route.job_id, index);
  switch (result.status) {
    case engine::ImageLookup::kOk: {
      Response res{http::status::ok, req.version()};
      res.set(http::field::content_type, "image/png");
      res.set(http::field::content_disposition,
              "inline; filename=\"" + route.job_id + "-" + k + ".png\"");
      res.set(http::field::cache_control, "private, max-age=3600, immutable");
      res.body().assign(result.png->begin(), result.png->end());
      return res;
    }
    case engine::ImageLookup::kUnknownJob:
      throw not_found_job(route.job_id);
    case engine::ImageLookup::kNotReady: {
      const auto job = engine->get(route.job_id);
      throw ApiError(409, "not_ready",
                     "image " + k + " of job '" + route.job_id + "' is not ready (job " +
                         (job ? engine::to_string(job->status) : std::string("unknown")) +
                         "); images exist once the job has succeeded");
    }
    case engine::ImageLookup::kNoSuchImage: {
      const auto job = engine->get(route.job_id);
      throw ApiError(404, "not_found",
                     "job '" + route.job_id + "' has no image " + k + " (it has " +
                         std::to_string(job ? job->request.num_images : 0) + ")");
    }
    case engine::ImageLookup::kEvicted:
      throw ApiError(410, "gone",
                     "the images of job '" + route.job_id +
                         "' were evicted from the result store (result_ttl_s / "
                         "result_max_mb); submit the request again with the same seed");
  }
  throw ApiError(500, "internal", "unexpected image lookup result");
}

// {"phase", "elapsed_s", "budget_s", "measured": [{"size", "batch", "step_s"}], "estimated": [...]}
Json warm_up_json(const engine::WarmUpStatus& w) {
  const auto rounded = [](double s) { return std::round(s * 1e4) / 1e4; };
  Json measured = Json::array(), estimated = Json::array();
  for (const auto& t : w.steps)
    (t.measured ? measured : estimated)
        .push_back({{"size", t.size}, {"batch", t.batch}, {"step_s", rounded(t.seconds)}});
  return {{"phase", w.phase},
          {"elapsed_s", rounded(w.elapsed_s)},
          {"budget_s", w.budget_s},
          {"measured", measured},
          {"estimated", estimated}};
}

}  // namespace

std::string query_param(const std::string& query, const std::string& name) {
  auto parsed = urls::parse_query(query);
  if (!parsed) return "";
  // Percent-decoding only: browsers encode '+' as %2B, and a key typed into a URL keeps its '+'.
  for (const auto& p : urls::params_encoded_view(*parsed)) {
    if (p.key.decode() == name && p.has_value) return p.value.decode();
  }
  return "";
}

void add_cors_headers(const Context& ctx, const Request& req, Response& res) {
  const auto& allowed = ctx.config().cors_allow_origins;
  const auto origin = req[http::field::origin];
  if (allowed.empty() || origin.empty()) return;
  const bool any = std::find(allowed.begin(), allowed.end(), "*") != allowed.end();
  if (!any && std::find(allowed.begin(), allowed.end(), std::string(origin)) == allowed.end())
    return;
  res.set(http::field::access_control_allow_origin, any ? std::string("*") : std::string(origin));
  if (!any) res.set(http::field::vary, "Origin");
  res.set(http::field::access_control_expose_headers,
          "X-Job-Id, X-Seed, X-Request-Id, Retry-After, Location");
}

Response options_response(const Context& ctx, const Request& req, const Route& route) {
  Response res{http::status::no_content, req.version()};
  const std::string methods = allowed_methods(route.kind) + ", OPTIONS";
  res.set(http::field::allow, methods);
  add_cors_headers(ctx, req, res);
  if (res.find(http::field::access_control_allow_origin) != res.end()) {
    res.set(http::field::access_control_allow_methods, methods);
    res.set(http::field::access_control_allow_headers,
            "Authorization, Content-Type, Accept, X-Request-Id");
    res.set(http::field::access_control_max_age, "600");
  }
  return res;
}

bool valid_id(const std::string& id) {
  return !id.empty() && id.size() <= 128 && std::all_of(id.begin(), id.end(), [](unsigned char c) {
    return std::isalnum(c) || c == '-' || c == '_' || c == '.';
  });
}

std::string path_of(const std::string& target) {
  return target.substr(0, target.find('?'));
}

Route match_route(const std::string& target) {
  Route r;
  const auto q = target.find('?');
  if (q != std::string::npos) r.query = target.substr(q + 1);
  const std::string path = path_of(target);
  if (path == "/" || path == "/index.html")
    r.kind = Route::kPage;
  else if (path == "/healthz")
    r.kind = Route::kHealthz;
  else if (path == "/readyz")
    r.kind = Route::kReadyz;
  else if (path == "/metrics")
    r.kind = Route::kMetrics;
  else if (path == "/v1/models")
    r.kind = Route::kModels;
  else if (path == "/v1/samplers")
    r.kind = Route::kSamplers;
  else if (path == "/v1/jobs")
    r.kind = Route::kJobs;
  else if (path == "/v1/events")
    r.kind = Route::kEvents;
  else if (path == "/v1/generate")
    r.kind = Route::kGenerate;
  else if (path == "/sdapi/v1/txt2img")
    r.kind = Route::kSdTxt2Img;
  else if (path == "/sdapi/v1/img2img")
    r.kind = Route::kSdImg2Img;
  else if (path == "/sdapi/v1/samplers")
    r.kind = Route::kSdSamplers;
  else if (path == "/sdapi/v1/schedulers")
    r.kind = Route::kSdSchedulers;
  else if (path == "/sdapi/v1/sd-models")
    r.kind = Route::kSdModels;
  else if (path == "/sdapi/v1/options")
    r.kind = Route::kSdOptions;
  else if (path == "/sdapi/v1/progress")
    r.kind = Route::kSdProgress;
  else if (path == "/sdapi/v1/interrupt")
    r.kind = Route::kSdInterrupt;
  else if (path == "/sdapi/v1/png-info")
    r.kind = Route::kSdPngInfo;
  else if (path == "/v1/models/refresh")
    r.kind = Route::kModelsRefresh;
  else if (path == "/sdapi/v1/sd-vae")
    r.kind = Route::kSdVae;
  else if (path == "/sdapi/v1/loras")
    r.kind = Route::kSdLoras;
  else if (path == "/sdapi/v1/embeddings")
    r.kind = Route::kSdEmbeddings;
  else if (path == "/sdapi/v1/refresh-checkpoints")
    r.kind = Route::kSdRefreshCheckpoints;
  else if (path == "/sdapi/v1/refresh-loras")
    r.kind = Route::kSdRefreshLoras;
  else if (path == "/sdapi/v1/refresh-vae")
    r.kind = Route::kSdRefreshVae;
  else if (path.rfind("/v1/jobs/", 0) == 0) {
    const auto parts = split_path(path);  // v1, jobs, id, ...
    if (parts.size() >= 3 && valid_id(parts[2])) {
      r.job_id = parts[2];
      if (parts.size() == 3)
        r.kind = Route::kJob;
      else if (parts.size() == 4 && parts[3] == "events")
        r.kind = Route::kJobEvents;
      else if (parts.size() == 5 && parts[3] == "images") {
        r.kind = Route::kJobImage;
        r.image = parts[4];
      }
    }
  }
  return r;
}

const char* route_template(Route::Kind kind) {
  switch (kind) {
    case Route::kHealthz:
      return "/healthz";
    case Route::kReadyz:
      return "/readyz";
    case Route::kMetrics:
      return "/metrics";
    case Route::kModels:
      return "/v1/models";
    case Route::kSamplers:
      return "/v1/samplers";
    case Route::kJobs:
      return "/v1/jobs";
    case Route::kJob:
      return "/v1/jobs/{id}";
    case Route::kJobImage:
      return "/v1/jobs/{id}/images/{k}";
    case Route::kJobEvents:
      return "/v1/jobs/{id}/events";
    case Route::kEvents:
      return "/v1/events";
    case Route::kGenerate:
      return "/v1/generate";
    case Route::kPage:
      return "/";
    case Route::kSdTxt2Img:
      return "/sdapi/v1/txt2img";
    case Route::kSdImg2Img:
      return "/sdapi/v1/img2img";
    case Route::kSdSamplers:
      return "/sdapi/v1/samplers";
    case Route::kSdSchedulers:
      return "/sdapi/v1/schedulers";
    case Route::kSdModels:
      return "/sdapi/v1/sd-models";
    case Route::kSdOptions:
      return "/sdapi/v1/options";
    case Route::kModelsRefresh:
      return "/v1/models/refresh";
    case Route::kSdVae:
      return "/sdapi/v1/sd-vae";
    case Route::kSdLoras:
      return "/sdapi/v1/loras";
    case Route::kSdEmbeddings:
      return "/sdapi/v1/embeddings";
    case Route::kSdRefreshCheckpoints:
      return "/sdapi/v1/refresh-checkpoints";
    case Route::kSdRefreshLoras:
      return "/sdapi/v1/refresh-loras";
    case Route::kSdRefreshVae:
      return "/sdapi/v1/refresh-vae";
    case Route::kSdProgress:
      return "/sdapi/v1/progress";
    case Route::kSdInterrupt:
      return "/sdapi/v1/interrupt";
    case Route::kSdPngInfo:
      return "/sdapi/v1/png-info";
    case Route::kNotFound:
      break;
  }
  return "other";
}

std::string allowed_methods(Route::Kind kind) {
  switch (kind) {
    case Route::kJobs:
    case Route::kGenerate:
    case Route::kSdTxt2Img:
    case Route::kSdImg2Img:
    case Route::kSdInterrupt:
    case Route::kSdPngInfo:
    case Route::kModelsRefresh:
    case Route::kSdRefreshCheckpoints:
    case Route::kSdRefreshLoras:
    case Route::kSdRefreshVae:
      return "POST";
    case Route::kSdOptions:
      return "GET, POST";
    case Route::kJob:
      return "GET, DELETE";
    case Route::kNotFound:
      return "";
    default:
      return "GET";
  }
}

bool method_allowed(Route::Kind kind, http::verb method) {
  switch (kind) {
    case Route::kJobs:
    case Route::kGenerate:
    case Route::kSdTxt2Img:
    case Route::kSdImg2Img:
    case Route::kSdInterrupt:
    case Route::kSdPngInfo:
    case Route::kModelsRefresh:
    case Route::kSdRefreshCheckpoints:
    case Route::kSdRefreshLoras:
    case Route::kSdRefreshVae:
      return method == http::verb::post;
    case Route::kSdOptions:
      return method == http::verb::get || method == http::verb::post;
    case Route::kJob:
      return method == http::verb::get || method == http::verb::delete_;
    default:
      return method == http::verb::get;
  }
}

void check_auth(const Context& ctx, const Request& req, const Route& route) {
  const auto& keys = ctx.config().api_keys;
  if (keys.empty()) return;
  // The page asks for the key itself; probes must work without one.
  if (route.kind == Route::kHealthz || route.kind == Route::kReadyz || route.kind == Route::kPage)
    return;
  if (route.kind == Route::kMetrics && !ctx.config().metrics_auth) return;
  std::string presented;
  const auto auth = req[http::field::authorization];
  if (auth.size() > 7 && (auth.substr(0, 7) == "Bearer " || auth.substr(0, 7) == "bearer "))
    presented = std::string(auth.substr(7));
  // Browsers cannot set headers on a WebSocket: the upgrades also take ?api_key=.
  if (presented.empty() && (route.kind == Route::kJobEvents || route.kind == Route::kEvents))
    presented = query_param(route.query, "api_key");
  bool ok = false;
  for (const auto& k : keys) ok |= same_key(presented, k);
  if (!ok)
    throw ApiError(401, "unauthorized",
                   presented.empty() ? "an API key is required: send 'Authorization: Bearer KEY'"
                                     : "the API key is not valid");
}

Response json_response(http::status status, const json& body, const Request& req) {
  Response res{status, req.version()};
  res.set(http::field::content_type, "application/json");
  // Text read back from a PNG (png-info) may be invalid UTF-8: U+FFFD, never an exception.
  res.body() = safe_json::dump(body);
  return res;
}

Response error_response(const ApiError& e, const Request& req) {
  Response res{static_cast<http::status>(e.status), req.version()};
  res.set(http::field::content_type, "application/json");
  if (e.retry_after_s >= 0)
    res.set(http::field::retry_after,
            std::to_string(static_cast<long>(std::ceil(std::max(1.0, e.retry_after_s)))));
  if (e.status == 401) res.set(http::field::www_authenticate, "Bearer");
  res.body() = error_body(e.type, e.what(), e.field);
  return res;
}

bool takes_body(Route::Kind kind) {
  return kind == Route::kJobs || kind == Route::kGenerate || kind == Route::kSdTxt2Img ||
         kind == Route::kSdImg2Img || kind == Route::kSdPngInfo;
}

BodyJson request_body(const Request& req, Route::Kind kind) {
  const bool sets_options = kind == Route::kSdOptions && req.method() == http::verb::post;
  if (!takes_body(kind) && !sets_options) return BodyJson();
  const auto content_type = req[http::field::content_type];
  if (!multipart::is_form(content_type)) return parse_body(req.body());
  if (kind != Route::kJobs && kind != Route::kGenerate)
    throw ApiError(415, "unsupported_media_type",
                   "this route takes a JSON body; multipart/form-data is taken by POST /v1/jobs "
                   "and POST /v1/generate");
  return multipart::form_body(content_type, req.body());
}

bool submits_job(Route::Kind kind) {
  return kind == Route::kJobs || kind == Route::kGenerate || kind == Route::kSdTxt2Img ||
         kind == Route::kSdImg2Img;
}

engine::JobSnapshot submit_job(Context& ctx, const Request& req, const BodyJson& body) {
  if (ctx.shutting_down()) {
    throw ApiError(503, "shutting_down", "the server is shutting down and takes no new jobs");
  }
  auto engine = require_engine(ctx);
  // The checkpoint first: its native size and text layers are the request's bounds.
  std::string model_name;
  if (body.is_object() && body.contains("model") && body["model"].is_string())
    model_name = ctx.resolve_model(body["model"].get<std::string>(), "model");
  engine::RequestBounds bounds;
  bounds.max_timeout_s = ctx.config().max_timeout_s;
  bounds.max_run_s = ctx.config().max_run_s;
  if (const auto info = ctx.model_info(model_name)) {
    bounds.text_layers = info->text_layers;
    bounds.native_size = info->native_size;
  }
  // A wrong type or a value out of range throws ApiError 400, which the router counts.
  engine::JobRequest request = job_request(body, bounds);
  request.model = model_name;
  ctx.resolve_loras(&request);
  request.request_id = std::string(req["X-Request-Id"]);  // the session set or checked it
  try {
    return engine->submit(std::move(request));
  } catch (const engine::QueueFull& e) {
    ApiError err(429, "queue_full", e.what());
    err.retry_after_s = e.retry_after_s;
    throw err;
  } catch (const engine::ShuttingDown& e) {
    throw ApiError(503, "shutting_down", e.what());
  } catch (const engine::Unavailable& e) {
    throw ApiError(503, "unavailable", e.what());
  } catch (const pipeline::RequestError& e) {
    throw ApiError(400, "validation_error", e.what(), e.field());
  }
}

Response handle_request(Context& ctx, const Request& req, const Route& route, const BodyJson& body,
                        std::string& job_id) {
  switch (route.kind) {
    case Route::kHealthz:
      return json_response(http::status::ok, {{"status", "ok"}}, req);
    case Route::kReadyz: {
      const auto e = ctx.engine();
      if (ctx.shutting_down())
        return json_response(http::status::service_unavailable, {{"status", "shutting_down"}}, req);
      if (!e)
        return json_response(http::status::service_unavailable,
                             {{"status", "loading"}, {"phase", "loading_model"}}, req);
      // Each device's worker, so an operator sees which GPU failed its warm-up, and how far
      // each warm-up is.
      Json workers = Json::array();
      bool any_warming = false;
      for (const auto& w : e->workers()) {
        Json one = {{"device", w.device}, {"state", w.state}};
        if (w.light_load_batch > 0) one["light_load_batch"] = w.light_load_batch;
        if (!w.error.empty()) one["error"] = w.error;
        one["warm_up"] = warm_up_json(w.warm_up);
        workers.push_back(one);
        any_warming = any_warming || w.state == "warming_up";
      }
      if (e->ready())
        return json_response(http::status::ok, {{"status", "ready"}, {"workers", workers}}, req);
      return json_response(
          http::status::service_unavailable,
          {{"status", any_warming ? "loading" : "unavailable"}, {"workers", workers}}, req);
    }
    case Route::kMetrics: {
      const auto e = ctx.engine();
      const auto model = ctx.model();
      std::optional<engine::EngineStats> stats;
      Metrics::ScrapeInput in;
      if (e) {
        stats = e->stats();
        in.stats = &*stats;
        in.ready = e->ready();
        in.workers = e->workers();
        in.memory = e->device_memory();
        in.models_loaded = static_cast<int>(e->loaded_models().size());
      }
      if (model) in.model = &model->info();
      in.open_connections = ctx.open_connections.load();
      Response res{http::status::ok, req.version()};
      res.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      res.body() = ctx.metrics().scrape(in);
      return res;
    }
    case Route::kModels:
      require_engine(ctx);
      return json_response(http::status::ok, models_json(ctx), req);
    case Route::kModelsRefresh:
      refresh_models(ctx);
      return json_response(http::status::ok, models_json(ctx), req);
    case Route::kSdRefreshCheckpoints:
    case Route::kSdRefreshLoras:
    case Route::kSdRefreshVae: {
      const engine::ModelKind kind =
          route.kind == Route::kSdRefreshCheckpoints ? engine::ModelKind::kCheckpoint
          : route.kind == Route::kSdRefreshLoras     ? engine::ModelKind::kLora
                                                     : engine::ModelKind::kVae;
      refresh_models(ctx, &kind);
      return json_response(http::status::ok, nullptr, req);
    }
    case Route::kSdVae:
      return json_response(http::status::ok, a1111::sd_vae(ctx), req);
    case Route::kSdLoras:
      return json_response(http::status::ok, a1111::loras(ctx), req);
    case Route::kSdEmbeddings:
      return json_response(http::status::ok, a1111::embeddings(ctx), req);
    case Route::kSamplers:
      return json_response(http::status::ok, samplers_json(), req);
    case Route::kJobs: {
      const auto snap = submit_job(ctx, req, body);
      job_id = snap.id;
      Response res = json_response(http::status::accepted, job_json(snap), req);
      res.set(http::field::location, job_path(snap.id));
      return res;
    }
    case Route::kJob: {
      job_id = route.job_id;
      auto engine = require_engine(ctx);
      if (req.method() == http::verb::delete_) {
        if (!engine->cancel(route.job_id)) {
          const auto job = engine->get(route.job_id);
          if (!job) throw not_found_job(route.job_id);
          throw ApiError(409, "conflict",
                         "job '" + route.job_id + "' is already " + engine::to_string(job->status));
        }
      }
      const auto job = engine->get(route.job_id);
      if (!job) throw not_found_job(route.job_id);
      Json body = job_json(*job);
      // A running job stops at its next step: the snapshot may still say "running".
      if (req.method() == http::verb::delete_) body["cancel_requested"] = true;
      return json_response(http::status::ok, body, req);
    }
    case Route::kJobImage:
      job_id = route.job_id;
      return image_response(ctx, req, route);
    case Route::kJobEvents:
    case Route::kEvents: {
      ApiError err(426, "upgrade_required",
                   "this endpoint is a WebSocket: connect with 'Upgrade: websocket'");
      Response res = error_response(err, req);
      res.set(http::field::upgrade, "websocket");
      return res;
    }
    case Route::kPage: {
      Response res{http::status::ok, req.version()};
      res.set(http::field::content_type, "text/html; charset=utf-8");
      res.set(http::field::cache_control, "no-cache");
      // Everything the page needs is in it or behind this origin (and blob: URLs it makes, and
      // data: URLs of the picture a user picks for img2img).
      res.set("Content-Security-Policy",
              "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
              "img-src 'self' blob: data:; connect-src 'self' ws: wss:");
      res.body() = std::string(web_page());
      return res;
    }
    case Route::kSdSamplers:
      return json_response(http::status::ok, a1111::samplers(), req);
    case Route::kSdSchedulers:
      return json_response(http::status::ok, a1111::schedulers(), req);
    case Route::kSdModels:
      return json_response(http::status::ok, a1111::sd_models(ctx), req);
    case Route::kSdPngInfo:
      return json_response(http::status::ok, a1111::png_info(body), req);
    case Route::kGenerate:
    case Route::kSdTxt2Img:
    case Route::kSdImg2Img:
    case Route::kSdProgress:
    case Route::kSdInterrupt:
    case Route::kSdOptions:  // per caller: HttpSession
    case Route::kNotFound:
      break;
  }
  throw ApiError(404, "not_found", "no such endpoint: " + path_of(std::string(req.target())));
}

}  // namespace sdserve::server
