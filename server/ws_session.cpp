#include "server/ws_session.h"

#include <spdlog/spdlog.h>

#include <boost/asio/post.hpp>
#include <nlohmann/json.hpp>

#include "config/safe_json.h"
#include "server/api_json.h"
#include "server/ws_command.h"

namespace sdserve::server {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using json = nlohmann::ordered_json;

constexpr size_t kMaxSubscriptions = 256;  // per /v1/events connection
constexpr size_t kMaxIncomingMessage = 64 << 10;
constexpr int kSendBufferBytes = 128 << 10;
constexpr size_t kRememberedFinals = 1024;  // per /v1/events connection

}  // namespace

WsSession::WsSession(asio::ip::tcp::socket&& socket, std::shared_ptr<Context> ctx, Mode mode,
                     std::string job_id)
    : ws_(std::move(socket)),
      ctx_(std::move(ctx)),
      counted_(ctx_->open_connections),
      mode_(mode),
      job_id_(std::move(job_id)) {
  path_ = mode_ == Mode::kJob ? "/v1/jobs/" + job_id_ + "/events" : "/v1/events";
}

WsSession::~WsSession() {
  if (accepted_) ctx_->metrics().websocket_closed();
}

void WsSession::run(beast::http::request<beast::http::string_body> req) {
  // A modest kernel send buffer: for a slow reader, backlog then builds up in our bounded queue,
  // where stale progress and previews are dropped, instead of megabytes of them in the kernel
  // delaying the events that matter.
  beast::error_code ignored;
  beast::get_lowest_layer(ws_).socket().set_option(
      asio::socket_base::send_buffer_size(kSendBufferBytes), ignored);
  ws_.set_option(websocket::stream_base::timeout::suggested(beast::role_type::server));
  ws_.set_option(websocket::stream_base::decorator([](websocket::response_type& res) {
    res.set(beast::http::field::server, "sdserve/" SDSERVE_VERSION);
  }));
  ws_.read_message_max(kMaxIncomingMessage);
  ws_.async_accept(req, beast::bind_front_handler(&WsSession::on_accept, shared_from_this()));
}

void WsSession::on_accept(beast::error_code ec) {
  if (ec) {
    spdlog::info("GET {} websocket handshake failed: {}", path_, ec.message());
    return;
  }
  accepted_ = true;
  ctx_->metrics().websocket_opened();
  ctx_->add_websocket(shared_from_this());
  if (ctx_->shutting_down()) close_code_ = websocket::close_code::going_away;
  if (mode_ == Mode::kJob) subscribe(job_id_);
  do_read();
}

void WsSession::remember_final(const std::string& job_id) {
  if (!finals_sent_.insert(job_id).second) return;
  finals_order_.push_back(job_id);
  if (finals_order_.size() > kRememberedFinals) {
    finals_sent_.erase(finals_order_.front());
    finals_order_.pop_front();
  }
}

void WsSession::subscribe(const std::string& job_id) {
  // This connection already carried the job's final event: say so once more, briefly, instead
  // of replaying it (a client looping on subscribe would otherwise get it again and again).
  if (finals_sent_.count(job_id))
    return send_control("error", job_id, "already_final",
                        "this job has ended and its final event was sent on this connection; "
                        "GET /v1/jobs/{id} has its state");
  if (subscriptions_.count(job_id)) {
    if (mode_ == Mode::kMulti) send_control("subscribed", job_id);
    return;
  }
  if (subscriptions_.size() >= kMaxSubscriptions) {
    send_control("error", job_id, "too_many_subscriptions",
                 "at most " + std::to_string(kMaxSubscriptions) + " jobs per connection");
    return;
  }
  std::weak_ptr<WsSession> weak = shared_from_this();
  const size_t limit = static_cast<size_t>(ctx_->config().ws_queue_limit);
  auto executor = ws_.get_executor();
  // Runs on an engine thread: must not block. Drops droppable events early when far behind.
  auto callback = [weak, limit, executor](const engine::JobEvent& e) {
    auto self = weak.lock();
    if (!self) return;
    if (e.droppable && self->posted_.load(std::memory_order_relaxed) +
                               self->queued_.load(std::memory_order_relaxed) >=
                           limit) {
      self->dropped_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    self->posted_.fetch_add(1, std::memory_order_relaxed);
    asio::post(executor, [self, e] {
      self->posted_.fetch_sub(1, std::memory_order_relaxed);
      self->on_event(e);
    });
  };
  const uint64_t token = ctx_->subscribe(job_id, callback);
  if (token == 0) {
    send_control("error", job_id, "not_found", "no such job (unknown, or forgotten)");
    if (mode_ == Mode::kJob) request_close(websocket::close_code::policy_error);
    return;
  }
  // The engine's first event was posted, so this acknowledgement still goes out before it.
  if (mode_ == Mode::kMulti) send_control("subscribed", job_id);
  subscriptions_[job_id] = token;
}

void WsSession::unsubscribe(const std::string& job_id) {
  const auto it = subscriptions_.find(job_id);
  if (it == subscriptions_.end()) return;
  const uint64_t token = it->second;
  subscriptions_.erase(it);
  ctx_->unsubscribe(job_id, token);
}

void WsSession::on_event(const engine::JobEvent& e) {
  if (torn_down_ || close_requested_) return;
  // After an unsubscribe, events already posted for that job are stale.
  if (!subscriptions_.count(e.job_id)) return;
  Outgoing out;
  out.text = safe_json::dump(event_json(e));
  out.binary = e.binary;
  out.job_id = e.job_id;
  out.droppable = e.droppable;
  out.final = engine::is_final(e.type);
  const bool final = out.final;
  push(std::move(out));
  if (final && mode_ == Mode::kMulti) {
    remember_final(e.job_id);
    unsubscribe(e.job_id);
  }
}

void WsSession::push(Outgoing out) {
  const size_t limit = static_cast<size_t>(ctx_->config().ws_queue_limit);
  if (queue_.size() >= limit) {
    if (out.droppable) {
      dropped_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    // Make room by dropping the oldest droppable event that is not being written.
    auto it = queue_.begin();
    if (writing_ && it != queue_.end()) ++it;  // the front is on the wire
    for (; it != queue_.end(); ++it) {
      if (it->droppable) {
        queue_.erase(it);
        queued_.store(queue_.size(), std::memory_order_relaxed);
        dropped_.fetch_add(1, std::memory_order_relaxed);
        break;
      }
    }
  }
  queue_.push_back(std::move(out));
  queued_.store(queue_.size(), std::memory_order_relaxed);
  if (!writing_) do_write();
}

void WsSession::send_control(const std::string& type, const std::string& job_id,
                             const std::string& error_type, const std::string& message) {
  if (torn_down_ || closing_) return;
  json j = {{"type", type}, {"job_id", job_id}};
  if (!error_type.empty()) j["error"] = {{"type", error_type}, {"message", message}};
  Outgoing out;
  out.text = safe_json::dump(j);
  out.job_id = job_id;
  queue_.push_back(std::move(out));
  queued_.store(queue_.size(), std::memory_order_relaxed);
  if (!writing_) do_write();
}

void WsSession::do_write() {
  if (torn_down_) return;
  if (queue_.empty()) {
    writing_ = false;
    if (close_requested_ && !closing_) {
      closing_ = true;
      writing_ = true;  // a close frame is a write too
      ws_.async_close(close_code_, [self = shared_from_this()](beast::error_code ec) {
        self->writing_ = false;
        if (ec) self->teardown("close failed: " + ec.message());
        // Otherwise the read loop ends when the client's close frame arrives.
      });
    }
    return;
  }
  writing_ = true;
  const Outgoing& front = queue_.front();
  auto handler = beast::bind_front_handler(&WsSession::on_write, shared_from_this());
  if (!binary_stage_) {
    ws_.text(true);
    ws_.async_write(asio::buffer(front.text), std::move(handler));
  } else {
    ws_.binary(true);
    ws_.async_write(asio::buffer(*front.binary), std::move(handler));
  }
}

void WsSession::on_write(beast::error_code ec, size_t) {
  if (ec) return teardown("write failed: " + ec.message());
  const Outgoing& front = queue_.front();
  if (!binary_stage_ && front.binary) {
    binary_stage_ = true;  // the preview's bytes follow its JSON at once
    return do_write();
  }
  binary_stage_ = false;
  const bool final = front.final;
  queue_.pop_front();
  queued_.store(queue_.size(), std::memory_order_relaxed);
  ++sent_;
  if (read_paused_ && queue_.size() <= queue_limit() / 2 && !torn_down_) {
    read_paused_ = false;
    do_read();
  }
  if (final && mode_ == Mode::kJob) {
    queue_.clear();  // nothing follows a final event; close once it is out
    queued_.store(queue_.size(), std::memory_order_relaxed);
    close_requested_ = true;
    close_code_ = websocket::close_code::normal;  // even when shutdown asked for going_away
  }
  do_write();
}

void WsSession::request_close(websocket::close_code code) {
  if (close_requested_ || torn_down_) return;
  close_requested_ = true;
  close_code_ = code;
  if (!writing_) do_write();
}

void WsSession::close_for_shutdown() {
  asio::post(ws_.get_executor(), [self = shared_from_this()] {
    self->request_close(websocket::close_code::going_away);
  });
}

void WsSession::do_read() {
  ws_.async_read(in_, beast::bind_front_handler(&WsSession::on_read, shared_from_this()));
}

void WsSession::on_read(beast::error_code ec, size_t) {
  if (ec) {
    return teardown(ec == websocket::error::closed ? "closed" : ec.message());
  }
  if (mode_ == Mode::kMulti && ws_.got_text() && !close_requested_)
    on_command(beast::buffers_to_string(in_.data()));
  in_.consume(in_.size());
  // A client that sends commands but does not read their answers: stop reading until the
  // queue drains, so its commands wait in its own socket buffers, not in our memory.
  if (queue_.size() >= queue_limit()) {
    read_paused_ = true;
    return;
  }
  do_read();
}

size_t WsSession::queue_limit() const {
  return static_cast<size_t>(std::max(1, ctx_->config().ws_queue_limit));
}

void WsSession::on_command(const std::string& text) {
  const WsCommand cmd = parse_ws_command(text);
  switch (cmd.kind) {
    case WsCommand::kSubscribe:
      return subscribe(cmd.job_id);
    case WsCommand::kUnsubscribe:
      if (!subscriptions_.count(cmd.job_id))
        return send_control("error", cmd.job_id, "not_subscribed", "not subscribed to this job");
      unsubscribe(cmd.job_id);
      return send_control("unsubscribed", cmd.job_id);
    case WsCommand::kInvalidJson:
    case WsCommand::kInvalid:
      return send_control("error", "", ws_command_error_type(cmd.kind), cmd.message);
  }
}

void WsSession::teardown(const std::string& why) {
  if (torn_down_) return;
  torn_down_ = true;
  // Unsubscribing cancels jobs that asked for cancel_on_disconnect (when we were their last
  // listener).
  for (const auto& [job, token] : subscriptions_) ctx_->unsubscribe(job, token);
  subscriptions_.clear();
  queue_.clear();
  queued_.store(queue_.size(), std::memory_order_relaxed);
  ctx_->remove_websocket(this);
  const uint64_t dropped = dropped_.load();
  if (dropped) ctx_->metrics().events_dropped(dropped);
  spdlog::info("websocket {} ended ({}): {} events sent, {} dropped", path_, why, sent_, dropped);
  beast::error_code ec;
  beast::get_lowest_layer(ws_).socket().close(ec);
}

}  // namespace sdserve::server
