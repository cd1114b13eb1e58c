// The network side of sdload: asynchronous HTTP requests and WebSocket event streams on one
// io_context, each on its own connection and each with deadlines, so that a dead or stalled
// server ends every operation with an error instead of hanging the run.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/http/verb.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

namespace sdload {

using boost::beast::http::verb;
using Millis = std::chrono::milliseconds;

// A target server: where to connect and what every request carries.
struct Server {
  std::string url;          // as given, for reports
  std::string host_header;  // "HOST:PORT"
  boost::asio::ip::tcp::resolver::results_type endpoints;
  std::string api_key;  // "" for none
  Millis timeout{30000};
};

// Parses http://HOST[:PORT][/] and resolves HOST. Throws std::runtime_error saying why.
Server make_server(const std::string& url, const std::string& api_key, Millis timeout);

struct HttpReply {
  int status = 0;     // 0: no response
  std::string error;  // when status is 0: "connect: refused", "read: timeout", ...
  std::string body;
  std::string content_type;
  double retry_after_s = -1;  // the Retry-After header, when present
};

// One request on a fresh connection. The handler runs exactly once, on the io_context's thread.
class HttpCall {
 public:
  using Handler = std::function<void(HttpReply&&)>;
  virtual ~HttpCall() = default;
  // Ends the request early; the handler then gets an error ("...: aborted").
  virtual void cancel() = 0;
};
std::shared_ptr<HttpCall> start_http(boost::asio::io_context& ioc, const Server& server,
                                     verb method, const std::string& target,
                                     const std::string& body, HttpCall::Handler handler);

// A WebSocket that delivers text frames until it ends. `on_end` runs exactly once: with "" when
// the server closed it normally, else with why ("handshake: 404", "read: timeout", "aborted").
class EventStream {
 public:
  using OnText = std::function<void(const std::string&)>;
  using OnEnd = std::function<void(const std::string&)>;
  virtual ~EventStream() = default;
  virtual void cancel() = 0;
};
std::shared_ptr<EventStream> start_events(boost::asio::io_context& ioc, const Server& server,
                                          const std::string& target, EventStream::OnText on_text,
                                          EventStream::OnEnd on_end);

// A blocking GET on its own io_context (for /readyz before a run): the status, 0 for none.
int blocking_get_status(const Server& server, const std::string& target);

}  // namespace sdload
