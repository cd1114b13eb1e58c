#include "server/http_session.h"

#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <random>

#include <spdlog/spdlog.h>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/websocket.hpp>

#include "server/browser_guard.h"
#include "server/logging.h"
#include "server/model_routes.h"
#include "server/ws_session.h"

namespace sdserve::server {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using json = nlohmann::ordered_json;
using tcp = asio::ip::tcp;

constexpr size_t kMaxDrainBytes = 64 << 20;  // read and dropped after a 413 before closing
constexpr auto kDrainTime = std::chrono::seconds(5);

bool quiet_error(const beast::error_code& ec) {
  return ec == http::error::end_of_stream || ec == http::error::partial_message ||
         ec == beast::error::timeout || ec == asio::error::operation_aborted ||
         ec == asio::error::connection_reset || ec == asio::error::eof ||
         ec == asio::error::broken_pipe;
}

}  // namespace

// The read buffer is bounded too: a request's header block (and a chunked body's trailer, which
// the parser only takes whole) must fit, and nothing larger ever gets near Beast's 64 KiB limit
// on one field, past which it throws instead of reporting an error.
HttpSession::HttpSession(tcp::socket&& socket, std::shared_ptr<Context> ctx)
    : stream_(std::move(socket)),
      ctx_(std::move(ctx)),
      counted_(ctx_->open_connections),
      buffer_(static_cast<size_t>(std::min(ctx_->config().max_header_bytes, 61440)) + 4096) {}

HttpSession::~HttpSession() {
  end_request();
}

void HttpSession::run() {
  asio::dispatch(stream_.get_executor(),
                 beast::bind_front_handler(&HttpSession::do_read, shared_from_this()));
}

void HttpSession::do_read() {
  const auto& cfg = ctx_->config();
  parser_.emplace();
  parser_->header_limit(static_cast<uint32_t>(cfg.max_header_bytes));
  parser_->body_limit(static_cast<uint64_t>(cfg.max_body_bytes));
  req_ = {};
  job_id_.clear();
  waiting_.reset();
  stream_.expires_after(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(cfg.read_timeout_s)));
  http::async_read_header(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
}

void HttpSession::on_header(beast::error_code ec) {
  if (ec) return on_read_error(ec);
  started_ = std::chrono::steady_clock::now();
  if (!in_flight_) {
    in_flight_ = true;
    ++ctx_->requests_in_flight;
  }
  const auto& h = parser_->get();
  if (parser_->is_done()) return on_request();
  if (beast::iequals(h[http::field::expect], "100-continue")) {
    auto cont =
        std::make_shared<http::response<http::empty_body>>(http::status::continue_, h.version());
    http::async_write(
        stream_, *cont, [self = shared_from_this(), cont](beast::error_code ec, size_t) {
          if (ec) return self->close();
          http::async_read(self->stream_, self->buffer_, *self->parser_,
                           [self](beast::error_code ec, size_t) { self->on_body(ec); });
        });
    return;
  }
  http::async_read(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](beast::error_code ec, size_t) { self->on_body(ec); });
}

void HttpSession::on_body(beast::error_code ec) {
  if (ec) return on_read_error(ec);
  on_request();
}

void HttpSession::on_read_error(beast::error_code ec) {
  request_id_.clear();  // this request never got one; not the previous request's
  route_kind_ = Route::kNotFound;
  // Whatever of the header arrived, for the response's version and the log line.
  if (quiet_error(ec)) return close();
  if (parser_) {
    const auto& h = parser_->get();
    req_.version(h.version() ? h.version() : 11);
    if (h.method() != http::verb::unknown) req_.method(h.method());
    req_.target(h.target());
    route_kind_ = match_route(std::string(req_.target())).kind;
  }
  if (ec == http::error::body_limit) {
    if (!in_flight_) {
      in_flight_ = true;
      ++ctx_->requests_in_flight;
      started_ = std::chrono::steady_clock::now();
    }
    return send(
        error_response(ApiError(413, "payload_too_large",
                                "the request body is larger than max_body_bytes (" +
                                    std::to_string(ctx_->config().max_body_bytes) + " bytes)"),
                       req_),
        true);
  }
  if (!in_flight_) {
    in_flight_ = true;
    ++ctx_->requests_in_flight;
    started_ = std::chrono::steady_clock::now();
  }
  if (ec == http::error::header_limit || ec == http::error::buffer_overflow)
    return send(
        error_response(ApiError(431, "header_too_large",
                                "the request headers are larger than max_header_bytes (" +
                                    std::to_string(ctx_->config().max_header_bytes) + " bytes)"),
                       req_),
        true);
  send(
      error_response(ApiError(400, "bad_request", "malformed HTTP request: " + ec.message()), req_),
      true);
}

void HttpSession::on_request() {
  req_ = parser_->release();
  // Honour the client's X-Request-Id when it is a sane token, else make one: it goes back in
  // the response, into the log line, and into a submitted job (its JSON and its log lines).
  request_id_ = std::string(req_["X-Request-Id"]);
  if (!valid_id(request_id_)) {
    request_id_ = engine::random_id();
    req_.set("X-Request-Id", request_id_);
  }
  const Route route = match_route(std::string(req_.target()));
  route_kind_ = route.kind;
  try {
    dispatch(route);
  } catch (const ApiError& e) {
    // A job refused before the queue (bad JSON, a wrong type or value, an unsupported A1111
    // feature), whichever API it came through; the engine counts queue_full and unavailable.
    if (e.status == 400 && submits_job(route.kind)) ctx_->metrics().job_rejected("invalid");
    send(error_response(e, req_));
  } catch (const std::exception& e) {
    spdlog::error("{} {}: {}", std::string(req_.method_string()), std::string(req_.target()),
                  e.what());
    send(error_response(ApiError(500, "internal", std::string("internal error: ") + e.what()),
                        req_));
  }
}

void HttpSession::dispatch(const Route& route) {
  // Before anything else, keys included: what a web page may do through its user's browser.
  check_host(ctx_->config(), req_);
  check_origin(ctx_->config(), req_);
  if (route.kind == Route::kNotFound)
    throw ApiError(404, "not_found", "no such endpoint: " + path_of(std::string(req_.target())));
  if (req_.method() == http::verb::options) return send(options_response(*ctx_, req_, route));
  check_auth(*ctx_, req_, route);
  if (!method_allowed(route.kind, req_.method())) {
    Response res =
        error_response(ApiError(405, "method_not_allowed",
                                std::string(req_.method_string()) + " is not allowed here; use " +
                                    allowed_methods(route.kind)),
                       req_);
    res.set(http::field::allow, allowed_methods(route.kind));
    return send(std::move(res));
  }
  if ((route.kind == Route::kJobEvents || route.kind == Route::kEvents) &&
      websocket::is_upgrade(req_)) {
    auto engine = ctx_->engine();
    if (!engine) {
      ApiError err(503, "not_ready", "the model is still loading; retry shortly");
      err.retry_after_s = 5;
      throw err;
    }
    job_id_ = route.job_id;
    if (route.kind == Route::kJobEvents && !engine->get(route.job_id))
      throw ApiError(404, "not_found", "job '" + route.job_id + "' not found");
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_)
            .count();
    log_request(std::string(req_.method_string()), path_of(std::string(req_.target())), route.kind,
                101, ms, 0);
    ctx_->metrics().count_request(route_template(route.kind), 101, ms / 1000);
    end_request();
    stream_.expires_never();
    auto ws = std::make_shared<WsSession>(
        stream_.release_socket(), ctx_,
        route.kind == Route::kJobEvents ? WsSession::Mode::kJob : WsSession::Mode::kMulti,
        route.job_id);
    ws->run(std::move(req_));
    return;
  }
  // The one place a body is parsed (bounded): routes get the result, never the text.
  const BodyJson body = request_body(req_, route.kind);
  if (route.kind == Route::kGenerate) return start_generate(req_, body);
  if (route.kind == Route::kSdTxt2Img || route.kind == Route::kSdImg2Img)
    return start_txt2img(req_, body, route.kind == Route::kSdImg2Img);
  if (route.kind == Route::kSdProgress) {
    const auto engine = ctx_->engine();
    return send(
        json_response(http::status::ok, ctx_->a1111().progress(caller(), engine.get()), req_));
  }
  if (route.kind == Route::kSdOptions) {
    return send(json_response(http::status::ok,
                              req_.method() == http::verb::post
                                  ? a1111::set_options(*ctx_, caller(), body)
                                  : a1111::options(*ctx_, caller()),
                              req_));
  }
  if (route.kind == Route::kSdInterrupt) {
    // The caller's queued and running jobs stop (their txt2img calls answer with no images).
    if (const auto engine = ctx_->engine()) {
      for (const auto& id : ctx_->a1111().active_jobs(caller(), engine.get())) engine->cancel(id);
    }
    return send(json_response(http::status::ok, Json::object(), req_));
  }
  send(handle_request(*ctx_, req_, route, body, job_id_));
}

void HttpSession::start_generate(const Request& req, const BodyJson& body) {
  const engine::JobSnapshot snap = submit_job(*ctx_, req, body);
  Waiting w;
  const auto accept = req[http::field::accept];
  w.want_json =
      snap.request.num_images > 1 || (accept.find("application/json") != beast::string_view::npos &&
                                      accept.find("image/png") == beast::string_view::npos);
  waiting_ = w;
  wait_for_job(snap);
}

void HttpSession::start_txt2img(const Request& req, const BodyJson& body, bool img2img) {
  // The checkpoint: override_settings.sd_model_checkpoint, else the caller's (POST
  // /sdapi/v1/options), else the default. Defaults (the size) are that model's.
  std::string model = ctx_->a1111_model(caller());
  if (body.is_object() && body.contains("override_settings") &&
      body["override_settings"].is_object() &&
      body["override_settings"].contains("sd_model_checkpoint") &&
      body["override_settings"]["sd_model_checkpoint"].is_string())
    model = ctx_->resolve_model(body["override_settings"]["sd_model_checkpoint"].get<std::string>(),
                                "override_settings.sd_model_checkpoint");
  const auto info = ctx_->model_info(model);
  auto t = img2img ? a1111::translate_img2img(body, info ? &*info : nullptr)
                   : a1111::translate_txt2img(body, info ? &*info : nullptr);
  if (!model.empty()) t.native["model"] = model;
  engine::JobSnapshot snap;
  try {
    snap = submit_job(*ctx_, req, t.native);
  } catch (const ApiError& e) {
    throw a1111::renamed(e);
  }
  ctx_->a1111().started(caller(), snap.id, ctx_->engine().get());
  Waiting w;
  w.txt2img = std::move(t);
  waiting_ = std::move(w);
  wait_for_job(snap);
}

std::string HttpSession::caller() const {
  const auto auth = req_[http::field::authorization];
  if (!ctx_->config().api_keys.empty() && auth.size() > 7)
    return "key " + std::string(auth.substr(7));
  beast::error_code ec;
  const auto remote = stream_.socket().remote_endpoint(ec);
  return ec ? std::string("unknown") : "address " + remote.address().to_string();
}

void HttpSession::wait_for_job(const engine::JobSnapshot& snap) {
  job_id_ = snap.id;
  waiting_->job_id = snap.id;
  waiting_->cancel_on_disconnect = snap.request.cancel_on_disconnect;
  stream_.expires_never();  // generation takes as long as it takes
  auto self = shared_from_this();
  auto executor = stream_.get_executor();
  const bool a1111 = waiting_->txt2img.has_value();
  auto ctx = ctx_;
  // Only the final event matters here (A1111's progress also follows steps and previews); it
  // is posted so that the engine thread never waits. The callback keeps the session alive until
  // unsubscribe (job done or client gone).
  const uint64_t token =
      ctx_->subscribe(snap.id, [self, executor, a1111, ctx](const engine::JobEvent& e) {
        if (a1111) ctx->a1111().event(e);
        if (!engine::is_final(e.type)) return;
        asio::post(executor, [self] { self->on_job_final(); });
      });
  if (token == 0) throw ApiError(500, "internal", "job '" + snap.id + "' vanished after submit");
  if (waiting_) waiting_->token = token;
  watch_disconnect();
}

void HttpSession::watch_disconnect() {
  stream_.socket().async_wait(
      tcp::socket::wait_read, [self = shared_from_this()](beast::error_code ec) {
        if (ec == asio::error::operation_aborted || !self->waiting_ || self->waiting_->done) return;
        if (!ec) {
          // Never a blocking read here: readiness can be stale (the reactor is edge-triggered),
          // and a blocking peek would hold this network thread, and this session's strand with
          // the job's answer, until the client gives up.
          char c;
          const ssize_t n =
              ::recv(self->stream_.socket().native_handle(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
          if (n > 0) return;  // a pipelined request: the client is still there
          if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return self->watch_disconnect();  // nothing to read after all: keep watching
        }
        self->on_client_gone();  // end of stream or an error: the client went away
      });
}

void HttpSession::on_client_gone() {
  if (!waiting_ || waiting_->done) return;
  waiting_->done = true;
  // unsubscribe cancels the job when it asked for cancel_on_disconnect
  ctx_->unsubscribe(waiting_->job_id, waiting_->token);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_)
          .count();
  job_id_ = waiting_->job_id;
  const Route::Kind kind = !waiting_->txt2img           ? Route::kGenerate
                           : waiting_->txt2img->img2img ? Route::kSdImg2Img
                                                        : Route::kSdTxt2Img;
  log_request("POST", route_template(kind), kind, 499, ms, 0,
              waiting_->cancel_on_disconnect ? "client went away; job cancelled"
                                             : "client went away; job continues");
  ctx_->metrics().count_request(route_template(kind), 499, ms / 1000);
  end_request();
  close();
}

void HttpSession::on_job_final() {
  if (!waiting_ || waiting_->done) return;
  waiting_->done = true;
  ctx_->unsubscribe(waiting_->job_id, waiting_->token);
  beast::error_code ec;
  stream_.socket().cancel(ec);  // ends the disconnect watch
  Response res;
  try {
    res = generate_response(req_);
  } catch (const ApiError& e) {
    res = error_response(e, req_);
  } catch (const std::exception& e) {
    res = error_response(ApiError(500, "internal", e.what()), req_);
  }
  send(std::move(res));
}

Response HttpSession::generate_response(const Request& req) {
  const auto engine = ctx_->engine();
  if (!engine) throw ApiError(503, "shutting_down", "the server is shutting down");
  const std::string& id = waiting_->job_id;
  const auto job = engine->get(id);
  if (!job) throw ApiError(500, "internal", "job '" + id + "' was forgotten before it was read");
  switch (job->status) {
    case engine::JobStatus::kSucceeded:
      break;
    case engine::JobStatus::kFailed:
      throw ApiError(500, "job_failed", "job '" + id + "' failed: " + job->error);
    case engine::JobStatus::kCancelled:
      if (ctx_->shutting_down())
        throw ApiError(503, "shutting_down",
                       "job '" + id + "' was cancelled because the server is shutting down");
      // A1111 answers an interrupted txt2img with what it has: here, no images.
      if (waiting_->txt2img) {
        const auto model = ctx_->model_info(job->request.model);
        return json_response(
            http::status::ok,
            a1111::txt2img_answer(*waiting_->txt2img, *job, {}, model ? &*model : nullptr,
                                  ctx_->model_sha256(job->request.model)),
            req);
      }
      throw ApiError(409, "cancelled", "job '" + id + "' was cancelled");
    case engine::JobStatus::kTimedOut:
      // As a failed job (A1111 answers a failed txt2img with a 500): retrying the same request
      // would run out of time again.
      throw ApiError(500, "timed_out", "job '" + id + "' timed out: " + job->error);
    case engine::JobStatus::kExpired: {
      ApiError err(503, "expired",
                   "job '" + id + "' waited in the queue longer than its timeout_s; retry later");
      err.retry_after_s = 5;
      throw err;
    }
    default:
      throw ApiError(500, "internal", "job '" + id + "' is not final");
  }
  std::vector<std::shared_ptr<const std::vector<uint8_t>>> pngs;
  for (int k = 0; k < job->request.num_images; ++k) {
    const auto img = engine->image(id, k);
    if (img.status == engine::ImageLookup::kEvicted)
      throw ApiError(410, "gone", "the images of job '" + id + "' were already evicted");
    if (img.status != engine::ImageLookup::kOk || !img.png)
      throw ApiError(500, "internal",
                     "image " + std::to_string(k) + " of job '" + id + "' is missing");
    pngs.push_back(img.png);
  }
  if (waiting_->txt2img) {
    const auto model = ctx_->model_info(job->request.model);
    Response res = json_response(
        http::status::ok,
        a1111::txt2img_answer(*waiting_->txt2img, *job, pngs, model ? &*model : nullptr,
                              ctx_->model_sha256(job->request.model)),
        req);
    res.set("X-Job-Id", id);
    return res;
  }
  if (!waiting_->want_json && pngs.size() == 1) {
    Response res{http::status::ok, req.version()};
    res.set(http::field::content_type, "image/png");
    res.set("X-Job-Id", id);
    res.set("X-Seed", std::to_string(job->seed));
    res.body().assign(pngs[0]->begin(), pngs[0]->end());
    return res;
  }
  json images = json::array();
  for (size_t k = 0; k < pngs.size(); ++k)
    images.push_back({{"index", k},
                      {"seed", job->seed + k},
                      {"content_type", "image/png"},
                      {"base64", base64(*pngs[k])}});
  json body = {{"id", id}, {"seed", job->seed}, {"images", images}, {"job", job_json(*job)}};
  Response res = json_response(http::status::ok, body, req);
  res.set("X-Job-Id", id);
  return res;
}

// One line per request: "METHOD path status" and fields (separate members in JSON logs).
// Probes and scrapes every few seconds would drown the log: they go at debug level.
void HttpSession::log_request(const std::string& method, const std::string& path, Route::Kind kind,
                              int status, double ms, uint64_t bytes, const std::string& note) {
  const bool probe = status < 400 &&
                     (kind == Route::kHealthz || kind == Route::kReadyz || kind == Route::kMetrics);
  char ms_text[32];
  std::snprintf(ms_text, sizeof(ms_text), "%.1f", ms);
  std::vector<LogField> fields = {{"method", method, false, false},
                                  {"route", route_template(kind), false, false},
                                  {"status", std::to_string(status), true, false},
                                  {"ms", ms_text, true},
                                  {"bytes", std::to_string(bytes), true},
                                  {"req", request_id_.empty() ? "-" : request_id_}};
  if (!job_id_.empty()) fields.push_back({"job", job_id_});
  if (!note.empty()) fields.push_back({"note", note});
  log_fields(probe ? LogLevel::kDebug : LogLevel::kInfo,
             method + " " + path + " " + std::to_string(status), fields);
}

void HttpSession::send(Response res, bool close_after) {
  res.set(http::field::server, "sdserve/" SDSERVE_VERSION);
  if (res.find(http::field::access_control_allow_origin) == res.end())
    add_cors_headers(*ctx_, req_, res);
  const bool keep = req_.keep_alive() && !close_after && !ctx_->shutting_down();
  res.keep_alive(keep);
  res.prepare_payload();
  const int status = static_cast<int>(res.result_int());
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_)
          .count();
  const std::string method =
      req_.method() == http::verb::unknown ? std::string("-") : std::string(req_.method_string());
  const std::string path = req_.target().empty() ? "-" : path_of(std::string(req_.target()));
  if (!request_id_.empty()) res.set("X-Request-Id", request_id_);
  log_request(method, path, route_kind_, status, ms, res.payload_size().value_or(0));
  ctx_->metrics().count_request(route_template(route_kind_), status, ms / 1000);
  res_ = std::make_shared<Response>(std::move(res));
  stream_.expires_after(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(std::max(60.0, ctx_->config().read_timeout_s))));
  http::async_write(stream_, *res_,
                    [self = shared_from_this(), close_after, keep](beast::error_code ec, size_t) {
                      self->end_request();
                      if (ec) return self->close();
                      self->res_.reset();
                      if (close_after) return self->lingering_close();
                      if (!keep) return self->close();
                      self->do_read();
                    });
}

// After refusing a request whose body is still arriving, closing at once would make the kernel
// reset the connection, and the client might never read our answer: stop sending, swallow
// what comes for a while, then close.
void HttpSession::lingering_close() {
  beast::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  if (ec) return close();
  drained_ = 0;
  stream_.expires_after(kDrainTime);
  do_drain();
}

void HttpSession::do_drain() {
  stream_.async_read_some(asio::buffer(drain_buf_),
                          [self = shared_from_this()](beast::error_code ec, size_t n) {
                            self->drained_ += n;
                            if (ec || self->drained_ > kMaxDrainBytes) return self->close();
                            self->do_drain();
                          });
}

void HttpSession::close() {
  beast::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  stream_.socket().close(ec);
}

void HttpSession::end_request() {
  if (in_flight_) {
    in_flight_ = false;
    --ctx_->requests_in_flight;
  }
}

}  // namespace sdserve::server
