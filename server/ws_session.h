// One WebSocket: GET /v1/jobs/{id}/events (one job; closed after its final event) or
// GET /v1/events (many jobs; the client sends {"subscribe": id} / {"unsubscribe": id}).
//
// Engine callbacks only post to this connection's strand; everything else runs there. The
// outgoing queue is bounded (ws_queue_limit) with one write in flight: a slow reader loses
// progress and preview events (JobEvent::droppable), never the state changes, and never makes
// the engine wait.
#pragma once

#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "server/context.h"

namespace sdserve::server {

class WsSession : public std::enable_shared_from_this<WsSession> {
 public:
  enum class Mode { kJob, kMulti };

  WsSession(boost::asio::ip::tcp::socket&& socket, std::shared_ptr<Context> ctx, Mode mode,
            std::string job_id);
  ~WsSession();

  // Completes the upgrade. Call on the socket's strand (the HTTP session's handler is).
  void run(boost::beast::http::request<boost::beast::http::string_body> req);
  // From any thread: send what is queued, then a close frame with `going_away`.
  void close_for_shutdown();
  Mode mode() const { return mode_; }

 private:
  struct Outgoing {
    std::string text;
    std::shared_ptr<const std::vector<uint8_t>> binary;
    std::string job_id;
    bool droppable = false;
    bool final = false;
  };

  void on_accept(boost::beast::error_code ec);
  void subscribe(const std::string& job_id);
  void unsubscribe(const std::string& job_id);
  void on_event(const engine::JobEvent& event);
  void push(Outgoing out);
  void send_control(const std::string& type, const std::string& job_id,
                    const std::string& error_type = "", const std::string& message = "");
  void do_write();
  void on_write(boost::beast::error_code ec, size_t);
  void request_close(boost::beast::websocket::close_code code);
  void do_read();
  void on_read(boost::beast::error_code ec, size_t);
  void on_command(const std::string& text);
  void teardown(const std::string& why);
  void remember_final(const std::string& job_id);
  size_t queue_limit() const;

  boost::beast::websocket::stream<boost::beast::tcp_stream> ws_;
  std::shared_ptr<Context> ctx_;
  ConnectionCount counted_;  // after ctx_, whose counter it holds
  const Mode mode_;
  const std::string job_id_;  // kJob
  std::string path_;
  boost::beast::flat_buffer in_;

  std::deque<Outgoing> queue_;
  bool writing_ = false;
  bool binary_stage_ = false;  // the front event's text frame went out; its binary is next
  bool close_requested_ = false;
  boost::beast::websocket::close_code close_code_ = boost::beast::websocket::close_code::normal;
  bool closing_ = false;
  bool torn_down_ = false;
  bool accepted_ = false;
  bool read_paused_ = false;  // the queue is full: the next read waits for writes to drain
  // Jobs whose final event this connection sent (bounded, oldest forgotten).
  std::set<std::string> finals_sent_;
  std::deque<std::string> finals_order_;
  std::map<std::string, uint64_t> subscriptions_;  // job id -> token
  // Events posted to the strand but not yet handled, and a copy of queue_.size(): together they
  // let the engine thread drop a droppable event without posting when the reader is far behind.
  std::atomic<size_t> posted_{0};
  std::atomic<size_t> queued_{0};
  std::atomic<uint64_t> dropped_{0};
  uint64_t sent_ = 0;
};

}  // namespace sdserve::server
