// One HTTP/1.1 connection: reads requests (bounded header and body, read timeout, keep-alive),
// answers them, hands WebSocket upgrades to WsSession, and for POST /v1/generate waits for the
// job while watching for the client going away.
#pragma once

#include <array>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "server/a1111.h"
#include "server/context.h"
#include "server/handlers.h"

namespace sdserve::server {

class HttpSession : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(boost::asio::ip::tcp::socket&& socket, std::shared_ptr<Context> ctx);
  ~HttpSession();
  void run();

 private:
  void do_read();
  void on_header(boost::beast::error_code ec);
  void on_body(boost::beast::error_code ec);
  void on_request();
  void on_read_error(boost::beast::error_code ec);

  void dispatch(const Route& route);
  void start_generate(const Request& req, const BodyJson& body);
  void start_txt2img(const Request& req, const BodyJson& body,
                     bool img2img);  // A1111's POST /sdapi/v1/txt2img
  void wait_for_job(const engine::JobSnapshot& snap);
  std::string caller() const;  // who an A1111 progress / interrupt is about
  void watch_disconnect();
  void on_job_final();
  void on_client_gone();
  Response generate_response(const Request& req);

  void send(Response res, bool close_after = false);
  void log_request(const std::string& method, const std::string& path, Route::Kind kind, int status,
                   double ms, uint64_t bytes, const std::string& note = "");
  void on_write(boost::beast::error_code ec, bool close);
  void lingering_close();
  void do_drain();
  void close();
  void end_request();

  boost::beast::tcp_stream stream_;
  std::shared_ptr<Context> ctx_;
  ConnectionCount counted_;           // after ctx_, whose counter it holds
  boost::beast::flat_buffer buffer_;  // bounded (see the constructor); after ctx_, which sizes it
  std::optional<http::request_parser<http::string_body>> parser_;
  Request req_;  // the request being answered
  std::shared_ptr<Response> res_;
  std::string job_id_;      // for the log line
  std::string request_id_;  // X-Request-Id: the client's (when well-formed) or ours
  Route::Kind route_kind_ = Route::kNotFound;  // of the request being answered
  std::chrono::steady_clock::time_point started_;
  bool in_flight_ = false;  // counted in ctx_->requests_in_flight

  // POST /v1/generate (or A1111's txt2img) while waiting for its job
  struct Waiting {
    std::string job_id;
    uint64_t token = 0;
    bool want_json = false;
    bool cancel_on_disconnect = false;
    bool done = false;
    std::optional<a1111::Txt2Img> txt2img;  // answer in A1111's shape
  };
  std::optional<Waiting> waiting_;

  std::array<char, 16 * 1024> drain_buf_{};
  size_t drained_ = 0;
};

}  // namespace sdserve::server
