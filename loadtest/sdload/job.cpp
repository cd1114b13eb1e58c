#include "sdload/job.h"

#include "sdload/png_check.h"

namespace sdload {
namespace {

using json = nlohmann::json;

constexpr Millis kPollInterval{500};

bool is_final(const std::string& type) {
  return type == "succeeded" || type == "failed" || type == "cancelled" || type == "expired" ||
         type == "timed_out";
}

std::string status_class(int status) {
  return std::to_string(status / 100) + "xx";
}

// The server's {"error": {"type", "message"}} body; empty strings when it is something else.
std::pair<std::string, std::string> api_error(const std::string& body) {
  const json j = json::parse(body, nullptr, false);
  if (!j.is_object() || !j.contains("error") || !j["error"].is_object()) return {};
  const json& e = j["error"];
  return {e.value("type", ""), e.value("message", "")};
}

}  // namespace

JobRun::JobRun(const JobContext& ctx, JobSpec spec, Done done)
    : ctx_(ctx), spec_(std::move(spec)), done_(std::move(done)), poll_timer_(ctx.ioc) {
  rec_.images_expected = spec_.images;
}

double JobRun::since_submit() const {
  return std::chrono::duration<double>(Clock::now() - t0_).count();
}

void JobRun::start() {
  t0_ = Clock::now();
  http_ =
      start_http(ctx_.ioc, ctx_.server, verb::post, "/v1/jobs", spec_.body.dump(),
                 [self = shared_from_this()](HttpReply&& r) { self->on_submitted(std::move(r)); });
}

void JobRun::on_submitted(HttpReply&& reply) {
  if (finished_) return;
  if (reply.status != 0) rec_.submit_s = since_submit();
  if (reply.status == 429) {
    rec_.retry_after_s = reply.retry_after_s;
    return finish(Outcome::kRejected);
  }
  if (reply.status != 202) return fail_http("submit", reply);
  const json j = json::parse(reply.body, nullptr, false);
  if (!j.is_object() || !j.contains("id") || !j["id"].is_string()) {
    rec_.add_error("protocol", "submit: 202 without a job id");
    return finish(Outcome::kFailed);
  }
  id_ = j["id"].get<std::string>();
  rec_.accepted = true;
  // The answer names its events link; the documented path serves when it does not.
  std::string events = "/v1/jobs/" + id_ + "/events";
  if (j.contains("links") && j["links"].is_object() && j["links"].contains("events") &&
      j["links"]["events"].is_string())
    events = j["links"]["events"].get<std::string>();
  follow_events(events);
}

void JobRun::follow_events(const std::string& target) {
  auto self = shared_from_this();
  events_ = start_events(
      ctx_.ioc, ctx_.server, target, [self](const std::string& text) { self->on_event(text); },
      [self](const std::string& why) { self->on_events_end(why); });
}

void JobRun::on_event(const std::string& text) {
  if (finished_ || final_seen_) return;
  const json ev = json::parse(text, nullptr, false);
  if (!ev.is_object()) {
    rec_.add_error("protocol", "events: a frame that is not a JSON object");
    return;  // not fatal: the final event may still come
  }
  const std::string type = ev.value("type", "");
  // A client that connects late gets the current state first: `started` may then carry a
  // step > 0, and is a late observation; the server's timings give the queue wait exactly.
  if ((type == "started" || type == "progress") && started_s_ < 0) started_s_ = since_submit();
  if (type == "progress" && rec_.first_step_s < 0) rec_.first_step_s = since_submit();
  if (is_final(type)) on_final(ev);
  // queued, preview (its image follows as a binary frame, skipped) and control frames: nothing.
}

void JobRun::on_events_end(const std::string& why) {
  if (finished_ || final_seen_ || why == "aborted") return;
  // Lost before the final event (a reset, a silent server, the job forgotten): the job may well
  // still be running, so its state is asked for instead of guessed.
  events_error_ = why.empty() ? "closed before the final event" : why;
  poll();
}

void JobRun::poll() {
  http_ = start_http(ctx_.ioc, ctx_.server, verb::get, "/v1/jobs/" + id_, "",
                     [self = shared_from_this()](HttpReply&& r) { self->on_poll(std::move(r)); });
}

void JobRun::on_poll(HttpReply&& reply) {
  if (finished_) return;
  if (reply.status == 0) {
    rec_.add_error("connection", "events/" + events_error_);
    return finish(Outcome::kFailed);
  }
  if (reply.status != 200) return fail_http("status", reply);
  const json j = json::parse(reply.body, nullptr, false);
  const std::string status = j.is_object() ? j.value("status", "") : "";
  if (is_final(status)) return on_final(j);
  poll_timer_.expires_after(kPollInterval);
  poll_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
    if (!ec && !self->finished_) self->poll();
  });
}

// `j` is a final event ({"type": ...}) or, after polling, the job ({"status": ...}).
void JobRun::on_final(const json& j) {
  final_seen_ = true;
  rec_.final_s = since_submit();
  const std::string type = j.contains("type") ? j.value("type", "") : j.value("status", "");
  const auto timings = j.find("timings");
  if (timings != j.end() && timings->is_object() && timings->contains("queue_s") &&
      (*timings)["queue_s"].is_number())
    rec_.queue_s = (*timings)["queue_s"].get<double>();
  else if (started_s_ >= 0)
    rec_.queue_s = started_s_;
  if (type == "cancelled") return finish(Outcome::kCancelled);
  if (type == "expired") return finish(Outcome::kExpired);
  if (type == "failed" || type == "timed_out") {
    rec_.add_error("server", type == "failed" ? "job_failed" : "timed_out");
    if (j.contains("error") && j["error"].is_string()) rec_.error_message = j["error"];
    return finish(Outcome::kFailed);
  }
  if (j.contains("images") && j["images"].is_array())
    for (const auto& url : j["images"])
      if (url.is_string()) images_.push_back(url.get<std::string>());
  if (images_.empty() && rec_.images_expected > 0) {
    rec_.add_error("protocol", "succeeded without image links");
    return finish(Outcome::kFailed);
  }
  fetch_image(0);
}

void JobRun::fetch_image(size_t k) {
  if (k >= images_.size()) {
    if (rec_.images_fetched < rec_.images_expected) {
      rec_.add_error("protocol", "fewer images than requested");
      return finish(Outcome::kFailed);
    }
    return finish(rec_.decode_failures > 0 ? Outcome::kFailed : Outcome::kSucceeded);
  }
  http_ = start_http(
      ctx_.ioc, ctx_.server, verb::get, images_[k], "",
      [self = shared_from_this(), k](HttpReply&& r) { self->on_image(k, std::move(r)); });
}

void JobRun::on_image(size_t k, HttpReply&& reply) {
  if (finished_) return;
  if (reply.status != 200) return fail_http("image", reply);
  ++rec_.images_fetched;
  if (ctx_.decode) {
    const PngCheck png = check_png(reply.body, spec_.width, spec_.height);
    if (png.ok) {
      ++rec_.images_decoded;
    } else {
      ++rec_.decode_failures;
      rec_.add_error("image", "decode");
      if (rec_.error_message.empty()) rec_.error_message = png.error;
    }
  }
  fetch_image(k + 1);
}

void JobRun::fail_http(const std::string& op, const HttpReply& reply) {
  if (reply.status == 0) {
    rec_.add_error("connection", op + "/" + reply.error);
  } else {
    rec_.add_error("http_status", status_class(reply.status));
    auto [type, message] = api_error(reply.body);
    if (!type.empty()) rec_.add_error("server", type);
    if (rec_.error_message.empty())
      rec_.error_message = op + ": HTTP " + std::to_string(reply.status) + " " + message;
  }
  finish(Outcome::kFailed);
}

void JobRun::abort(const std::string& why) {
  if (finished_) return;
  rec_.add_error("aborted", why);
  // Tell the server to drop a job we no longer wait for (best effort, not waited on): later
  // runs of a sweep must not share the server with it.
  if (!id_.empty() && !final_seen_)
    start_http(ctx_.ioc, ctx_.server, verb::delete_, "/v1/jobs/" + id_, "", [](HttpReply&&) {});
  finish(Outcome::kFailed);
}

void JobRun::finish(Outcome outcome) {
  if (finished_) return;
  finished_ = true;
  // `done` drops the runner's reference; this one keeps the job alive to the end of this call.
  const auto keep = shared_from_this();
  rec_.outcome = outcome;
  if (outcome == Outcome::kSucceeded) rec_.e2e_s = since_submit();
  rec_.ended_at_s = std::chrono::duration<double>(Clock::now() - ctx_.run_start).count();
  poll_timer_.cancel();
  if (http_) http_->cancel();
  // After a final event the server closes the socket itself; otherwise it is dropped here.
  if (events_ && !final_seen_) events_->cancel();
  auto done = std::move(done_);
  done_ = nullptr;
  done(std::move(rec_));
}

}  // namespace sdload
