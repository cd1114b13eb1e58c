#include "sdload/net.h"

#include <boost/asio/connect.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <cstdlib>
#include <stdexcept>

namespace sdload {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;

constexpr size_t kBodyLimit = 256u << 20;  // a 16-image 2048x2048 answer still fits
constexpr const char* kUserAgent = "sdload/1";

// Short, stable reasons: they become keys of the report's error counts.
std::string reason(const beast::error_code& ec) {
  if (ec == beast::error::timeout) return "timeout";
  if (ec == asio::error::operation_aborted) return "aborted";
  if (ec == asio::error::connection_refused) return "refused";
  if (ec == asio::error::connection_reset) return "reset";
  if (ec == asio::error::broken_pipe) return "broken pipe";
  if (ec == asio::error::eof || ec == http::error::end_of_stream) return "closed";
  if (ec == asio::error::host_unreachable || ec == asio::error::network_unreachable)
    return "unreachable";
  return ec.message();
}

std::string authorization(const Server& s) {
  return s.api_key.empty() ? "" : "Bearer " + s.api_key;
}

class HttpCallImpl : public HttpCall, public std::enable_shared_from_this<HttpCallImpl> {
 public:
  HttpCallImpl(asio::io_context& ioc, const Server& server, verb method, const std::string& target,
               const std::string& body, Handler handler)
      : server_(server), stream_(ioc), handler_(std::move(handler)) {
    req_ = {method, target, 11};
    req_.set(http::field::host, server.host_header);
    req_.set(http::field::user_agent, kUserAgent);
    if (!server.api_key.empty()) req_.set(http::field::authorization, authorization(server));
    if (method == verb::post) {
      req_.set(http::field::content_type, "application/json");
      req_.body() = body;
    }
    req_.keep_alive(false);
    req_.prepare_payload();
    parser_.body_limit(kBodyLimit);
  }

  void start() {
    stream_.expires_after(server_.timeout);
    stream_.async_connect(server_.endpoints,
                          [self = shared_from_this()](beast::error_code ec, const tcp::endpoint&) {
                            self->on_connect(ec);
                          });
  }

  void cancel() override {
    if (done_) return;
    cancelled_ = true;
    stream_.close();  // pending operations end with operation_aborted
  }

 private:
  void on_connect(beast::error_code ec) {
    if (ec || cancelled_) return fail("connect", ec);
    stream_.expires_after(server_.timeout);
    http::async_write(stream_, req_, [self = shared_from_this()](beast::error_code e, size_t) {
      self->on_write(e);
    });
  }

  void on_write(beast::error_code ec) {
    if (ec || cancelled_) return fail("write", ec);
    stream_.expires_after(server_.timeout);
    http::async_read(
        stream_, buffer_, parser_,
        [self = shared_from_this()](beast::error_code e, size_t) { self->on_read(e); });
  }

  void on_read(beast::error_code ec) {
    if (ec || cancelled_) return fail("read", ec);
    const auto& res = parser_.get();
    HttpReply reply;
    reply.status = static_cast<int>(res.result_int());
    reply.body = res.body();
    reply.content_type = std::string(res[http::field::content_type]);
    const auto retry = res[http::field::retry_after];
    if (!retry.empty()) reply.retry_after_s = std::atof(std::string(retry).c_str());
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    finish(std::move(reply));
  }

  void fail(const char* op, beast::error_code ec) {
    HttpReply reply;
    reply.error = std::string(op) + ": " + (cancelled_ ? "aborted" : reason(ec));
    finish(std::move(reply));
  }

  void finish(HttpReply&& reply) {
    if (done_) return;
    done_ = true;
    stream_.close();
    // Moved out first: the handler may own this call, and it must not outlive its captures.
    auto handler = std::move(handler_);
    handler_ = nullptr;
    handler(std::move(reply));
  }

  const Server server_;  // a copy: calls may outlive the caller's Server
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> req_;
  http::response_parser<http::string_body> parser_;
  Handler handler_;
  bool cancelled_ = false;
  bool done_ = false;
};

class EventStreamImpl : public EventStream, public std::enable_shared_from_this<EventStreamImpl> {
 public:
  EventStreamImpl(asio::io_context& ioc, const Server& server, const std::string& target,
                  OnText on_text, OnEnd on_end)
      : server_(server),
        ws_(ioc),
        target_(target),
        on_text_(std::move(on_text)),
        on_end_(std::move(on_end)) {}

  void start() {
    auto& tcp_layer = beast::get_lowest_layer(ws_);
    tcp_layer.expires_after(server_.timeout);
    tcp_layer.async_connect(
        server_.endpoints, [self = shared_from_this()](beast::error_code ec, const tcp::endpoint&) {
          self->on_connect(ec);
        });
  }

  void cancel() override {
    if (ended_) return;
    cancelled_ = true;
    beast::get_lowest_layer(ws_).close();
  }

 private:
  void on_connect(beast::error_code ec) {
    if (ec || cancelled_) return end("connect", ec);
    // From here the WebSocket's own timeouts apply: a handshake deadline, and pings when the
    // server is silent so that a dead one is noticed within `timeout` even while a job waits.
    beast::get_lowest_layer(ws_).expires_never();
    websocket::stream_base::timeout t{};
    t.handshake_timeout = server_.timeout;
    t.idle_timeout = server_.timeout;
    t.keep_alive_pings = true;
    ws_.set_option(t);
    const std::string auth = authorization(server_);
    ws_.set_option(websocket::stream_base::decorator([auth](websocket::request_type& req) {
      req.set(http::field::user_agent, kUserAgent);
      if (!auth.empty()) req.set(http::field::authorization, auth);
    }));
    ws_.async_handshake(
        response_, server_.host_header, target_,
        [self = shared_from_this()](beast::error_code e) { self->on_handshake(e); });
  }

  void on_handshake(beast::error_code ec) {
    if (!ec && !cancelled_) return read();
    // A refused upgrade (404 unknown job, 401, 503) says more by its status than by `ec`.
    const int status = static_cast<int>(response_.result_int());
    if (!cancelled_ && status != 0 && status != 101)
      return finish("handshake: HTTP " + std::to_string(status));
    end("handshake", ec);
  }

  void read() {
    if (cancelled_) return finish("aborted");
    ws_.async_read(buffer_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec || self->cancelled_) {
        // The server ends every job's stream with a close frame after the final event.
        if (ec == websocket::error::closed && !self->cancelled_) return self->finish("");
        return self->end("read", ec);
      }
      if (self->ws_.got_text() && self->on_text_)
        self->on_text_(beast::buffers_to_string(self->buffer_.data()));
      self->buffer_.consume(self->buffer_.size());
      self->read();
    });
  }

  void end(const char* op, beast::error_code ec) {
    finish(cancelled_ ? "aborted" : std::string(op) + ": " + reason(ec));
  }

  void finish(const std::string& why) {
    if (ended_) return;
    ended_ = true;
    beast::get_lowest_layer(ws_).close();
    // Dropping the callbacks breaks the cycle job -> stream -> callback -> job.
    auto on_end = std::move(on_end_);
    on_end_ = nullptr;
    on_text_ = nullptr;
    if (on_end) on_end(why);
  }

  const Server server_;  // a copy: calls may outlive the caller's Server
  websocket::stream<beast::tcp_stream> ws_;
  std::string target_;
  websocket::response_type response_;
  beast::flat_buffer buffer_;
  OnText on_text_;
  OnEnd on_end_;
  bool cancelled_ = false;
  bool ended_ = false;
};

}  // namespace

Server make_server(const std::string& url, const std::string& api_key, Millis timeout) {
  const std::string scheme = "http://";
  if (url.rfind(scheme, 0) != 0)
    throw std::runtime_error("'" + url + "': only http://HOST[:PORT] URLs are supported");
  std::string rest = url.substr(scheme.size());
  if (!rest.empty() && rest.back() == '/') rest.pop_back();
  if (rest.empty() || rest.find('/') != std::string::npos)
    throw std::runtime_error("'" + url + "': expected http://HOST[:PORT] without a path");
  std::string host = rest, port = "80";
  // [v6-address]:port, or name:port / v4:port.
  const size_t colon = rest.rfind(':');
  const size_t bracket = rest.rfind(']');
  if (colon != std::string::npos && (bracket == std::string::npos || colon > bracket)) {
    host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  Server s;
  s.url = url;
  s.host_header = rest;
  s.api_key = api_key;
  s.timeout = timeout;
  asio::io_context ioc;
  tcp::resolver resolver(ioc);
  beast::error_code ec;
  s.endpoints = resolver.resolve(host, port, ec);
  if (ec) throw std::runtime_error("cannot resolve '" + host + ":" + port + "': " + ec.message());
  return s;
}

std::shared_ptr<HttpCall> start_http(asio::io_context& ioc, const Server& server, verb method,
                                     const std::string& target, const std::string& body,
                                     HttpCall::Handler handler) {
  auto call = std::make_shared<HttpCallImpl>(ioc, server, method, target, body, std::move(handler));
  call->start();
  return call;
}

std::shared_ptr<EventStream> start_events(asio::io_context& ioc, const Server& server,
                                          const std::string& target, EventStream::OnText on_text,
                                          EventStream::OnEnd on_end) {
  auto stream =
      std::make_shared<EventStreamImpl>(ioc, server, target, std::move(on_text), std::move(on_end));
  stream->start();
  return stream;
}

int blocking_get_status(const Server& server, const std::string& target) {
  asio::io_context ioc;
  int status = 0;
  start_http(ioc, server, verb::get, target, "", [&](HttpReply&& r) { status = r.status; });
  ioc.run();
  return status;
}

}  // namespace sdload
