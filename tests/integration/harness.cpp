#include "harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

#include <gtest/gtest.h>

extern char** environ;

namespace sdserve::itest {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;

// The child's environment: ours without SDSERVE_* (a developer's settings must not leak into
// tests), plus `extra`.
std::vector<std::string> child_env(const std::map<std::string, std::string>& extra) {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e)
    if (std::strncmp(*e, "SDSERVE_", 8) != 0) env.emplace_back(*e);
  for (const auto& [k, v] : extra) env.push_back(k + "=" + v);
  return env;
}

// fork + exec of argv_s (the program's path first) with stdout and stderr on one pipe; returns
// the pid and the pipe's read end.
std::pair<pid_t, int> spawn(const std::vector<std::string>& argv_s,
                            const std::map<std::string, std::string>& extra_env) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
  const auto env_s = child_env(extra_env);
  std::vector<char*> argv, envp;
  for (auto& a : argv_s) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (auto& e : env_s) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  const pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  close(fds[1]);
  return {pid, fds[0]};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ServerProcess

ServerProcess::ServerProcess(std::vector<std::string> args, bool wait_ready) {
  std::vector<std::string> all = {SDSERVE_BINARY, "serve", "--host",   "127.0.0.1",
                                  "--port",       "0",     "--device", "cpu"};
  all.insert(all.end(), args.begin(), args.end());
  std::tie(pid_, out_fd_) = spawn(all, {});
  reader_ = std::thread([this] { read_output(); });
  // --host 127.0.0.1 unless `args` name another (0.0.0.0: still reached through 127.0.0.1).
  const std::regex re("listening on http://[0-9.]+:([0-9]+)");
  {
    std::unique_lock<std::mutex> lock(mutex_);
    std::smatch m;
    const bool found =
        cv_.wait_for(lock, kTimeout, [&] { return std::regex_search(log_, m, re) || eof_; });
    if (!found || !std::regex_search(log_, m, re))
      throw std::runtime_error("sdserve did not start listening; its output:\n" + log_);
    port_ = std::stoi(m[1]);
  }
  if (!wait_ready) return;
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (get(port_, "/readyz").status == 200) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  throw std::runtime_error("sdserve did not become ready; its output:\n" + log());
}

ServerProcess::~ServerProcess() {
  if (!exit_status_ && pid_ > 0) {
    kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
  }
  if (reader_.joinable()) reader_.join();
  if (out_fd_ >= 0) close(out_fd_);
  if (::testing::Test::HasFailure()) {
    std::string tail = log();
    if (tail.size() > 8000) tail = "...\n" + tail.substr(tail.size() - 8000);
    std::cerr << "---- sdserve output ----\n" << tail << "------------------------\n";
  }
}

void ServerProcess::read_output() {
  char buf[4096];
  for (;;) {
    const ssize_t n = read(out_fd_, buf, sizeof buf);
    if (n <= 0) break;
    std::lock_guard<std::mutex> lock(mutex_);
    log_.append(buf, static_cast<size_t>(n));
    cv_.notify_all();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  eof_ = true;
  cv_.notify_all();
}

std::string ServerProcess::log() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return log_;
}

bool ServerProcess::wait_log(const std::string& needle, seconds timeout) const {
  std::unique_lock<std::mutex> lock(mutex_);
  return cv_.wait_for(lock, timeout, [&] { return log_.find(needle) != std::string::npos; });
}

void ServerProcess::signal(int signo) const {
  kill(pid_, signo);
}

std::optional<int> ServerProcess::wait_exit(seconds timeout) {
  if (exit_status_) return exit_status_;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      return exit_status_;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return std::nullopt;
}

std::pair<int, std::string> run_program(const std::vector<std::string>& argv,
                                        const std::map<std::string, std::string>& env,
                                        seconds timeout) {
  auto [pid, fd] = spawn(argv, env);
  std::string out;
  bool killed = false;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    if (left <= 0) {
      kill(pid, SIGKILL);
      killed = true;
      break;
    }
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    char buf[4096];
    const ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  int status = 0;
  waitpid(pid, &status, 0);
  if (killed) return {-1, out};
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

std::pair<int, std::string> run_to_exit(const std::vector<std::string>& args,
                                        const std::map<std::string, std::string>& env) {
  std::vector<std::string> argv = {SDSERVE_BINARY, "serve"};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_program(argv, env, seconds(120));
}

// ---------------------------------------------------------------------------------------------
// HTTP

json HttpResult::body_json() const {
  try {
    return json::parse(body);
  } catch (const json::exception&) {
    ADD_FAILURE() << "not JSON (status " << status << "): " << body.substr(0, 200);
    return json();
  }
}

std::string HttpResult::header(const std::string& name) const {
  const auto it = headers.find(name);
  return it == headers.end() ? "" : it->second;
}

HttpResult http(int port, verb method, const std::string& target, const std::string& body,
                const Headers& headers, seconds timeout) {
  asio::io_context ioc;
  beast::tcp_stream stream(ioc);
  http::request<http::string_body> req{method, target, 11};
  req.set(http::field::host, "127.0.0.1");
  for (const auto& [k, v] : headers) req.set(k, v);
  if (!body.empty() || method == verb::post) {
    if (req[http::field::content_type].empty())
      req.set(http::field::content_type, "application/json");
    req.body() = body;
  }
  req.keep_alive(false);
  req.prepare_payload();
  http::response_parser<http::string_body> parser;
  parser.body_limit(256 << 20);
  beast::flat_buffer buffer;
  beast::error_code result;
  stream.expires_after(timeout);
  stream.async_connect(
      tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)),
      [&](beast::error_code ec) {
        if (ec) return void(result = ec);
        http::async_write(stream, req, [&](beast::error_code ec, size_t) {
          // A refused body (413) may break the write; the answer is still
          // there to read.
          (void)ec;
          http::async_read(stream, buffer, parser,
                           [&](beast::error_code ec, size_t) { result = ec; });
        });
      });
  ioc.run();
  HttpResult out;
  if (result && !parser.is_header_done()) {
    out.error = result.message();
    return out;
  }
  const auto& res = parser.get();
  out.status = static_cast<int>(res.result_int());
  for (const auto& f : res) {
    std::string name(f.name_string());
    for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    out.headers[name] = std::string(f.value());
  }
  out.body = res.body();
  return out;
}

// ---------------------------------------------------------------------------------------------
// WebSocket

struct WsClient::Impl {
  asio::io_context ioc;
  websocket::stream<beast::tcp_stream> ws{ioc};
  beast::flat_buffer buffer;
  std::thread thread;
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<Frame> frames;
  std::deque<std::string> outgoing;
  bool writing = false;
  bool ended = false;
  int close_code = 0;

  void do_read() {
    ws.async_read(buffer, [this](beast::error_code ec, size_t) {
      std::lock_guard<std::mutex> lock(mutex);
      if (ec) {
        ended = true;
        close_code = static_cast<int>(ws.reason().code);
        cv.notify_all();
        return;
      }
      frames.push_back({ws.got_text(), beast::buffers_to_string(buffer.data())});
      buffer.consume(buffer.size());
      cv.notify_all();
      // Re-arm outside the lock's scope is not needed: async_read only starts the operation.
      do_read();
    });
  }

  void do_write() {
    if (writing || outgoing.empty()) return;
    writing = true;
    ws.text(true);
    ws.async_write(asio::buffer(outgoing.front()), [this](beast::error_code, size_t) {
      outgoing.pop_front();
      writing = false;
      do_write();
    });
  }
};

WsClient::WsClient() : impl_(std::make_unique<Impl>()) {}

WsClient::~WsClient() {
  abort();
  if (impl_->thread.joinable()) impl_->thread.join();
}

bool WsClient::connect(int port, const std::string& target, const Headers& headers, bool read,
                       int rcvbuf, int* http_status) {
  auto& s = *impl_;
  auto& sock = beast::get_lowest_layer(s.ws).socket();
  beast::error_code ec;
  sock.open(tcp::v4(), ec);
  if (rcvbuf > 0) sock.set_option(asio::socket_base::receive_buffer_size(rcvbuf), ec);
  beast::get_lowest_layer(s.ws).expires_after(kTimeout);
  sock.connect(
      tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)), ec);
  if (ec) return false;
  s.ws.set_option(websocket::stream_base::decorator([headers](websocket::request_type& req) {
    for (const auto& [k, v] : headers) req.set(k, v);
  }));
  websocket::response_type res;
  s.ws.handshake(res, "127.0.0.1", target, ec);
  if (http_status) *http_status = static_cast<int>(res.result_int());
  if (ec) return false;
  beast::get_lowest_layer(s.ws).expires_never();
  if (read) s.do_read();
  s.thread = std::thread([&s] {
    auto guard = asio::make_work_guard(s.ioc);
    s.ioc.run();
  });
  return true;
}

void WsClient::start_reading() {
  asio::post(impl_->ioc, [s = impl_.get()] { s->do_read(); });
}

std::optional<WsClient::Frame> WsClient::next(seconds timeout) {
  std::unique_lock<std::mutex> lock(impl_->mutex);
  impl_->cv.wait_for(lock, timeout, [&] { return !impl_->frames.empty() || impl_->ended; });
  if (impl_->frames.empty()) return std::nullopt;
  Frame f = std::move(impl_->frames.front());
  impl_->frames.pop_front();
  return f;
}

std::optional<json> WsClient::next_json(const std::function<bool(const json&)>& pred,
                                        seconds timeout, std::vector<Frame>* seen) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left =
        std::chrono::duration_cast<seconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return std::nullopt;
    auto f = next(left);
    if (!f) return std::nullopt;
    if (seen) seen->push_back(*f);
    if (!f->text) continue;
    json j = f->as_json();
    if (pred(j)) return j;
  }
}

void WsClient::send_text(const std::string& text) {
  asio::post(impl_->ioc, [s = impl_.get(), text] {
    s->outgoing.push_back(text);
    s->do_write();
  });
}

void WsClient::close() {
  asio::post(impl_->ioc, [s = impl_.get()] {
    s->ws.async_close(websocket::close_code::normal, [](beast::error_code) {});
  });
}

void WsClient::abort() {
  if (!impl_->thread.joinable()) return;
  asio::post(impl_->ioc, [s = impl_.get()] {
    beast::error_code ec;
    beast::get_lowest_layer(s->ws).socket().close(ec);
    s->ioc.stop();
  });
  impl_->thread.join();
}

bool WsClient::wait_closed(seconds timeout, int* close_code) {
  std::unique_lock<std::mutex> lock(impl_->mutex);
  const bool ended = impl_->cv.wait_for(lock, timeout, [&] { return impl_->ended; });
  if (close_code) *close_code = impl_->close_code;
  return ended;
}

// ---------------------------------------------------------------------------------------------
// Jobs

namespace {
constexpr const char* kBase64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

}  // namespace

std::string base64_of(const std::vector<uint8_t>& in) {
  const char* kDigits = kBase64;
  std::string out;
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = (uint32_t{in[i]} << 16) | (uint32_t{in[i + 1]} << 8) | in[i + 2];
    for (int s = 18; s >= 0; s -= 6) out += kDigits[(v >> s) & 63];
  }
  if (i < in.size()) {
    uint32_t v = uint32_t{in[i]} << 16;
    if (i + 1 < in.size()) v |= uint32_t{in[i + 1]} << 8;
    out += kDigits[(v >> 18) & 63];
    out += kDigits[(v >> 12) & 63];
    out += i + 1 < in.size() ? kDigits[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::vector<uint8_t> unbase64_of(const std::string& in) {
  std::vector<uint8_t> out;
  uint32_t acc = 0;
  int bits = 0;
  for (const char c : in) {
    const char* at = std::strchr(kBase64, c);
    if (c == '=' || at == nullptr) continue;
    acc = (acc << 6) | static_cast<uint32_t>(at - kBase64);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<uint8_t>((acc >> bits) & 0xFF));
    }
  }
  return out;
}

std::vector<uint8_t> fixture_bytes(const std::string& name) {
  std::ifstream in(std::string(SDSERVE_FIXTURES) + "/" + name, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

json small_job(const std::string& prompt, int steps, uint64_t seed) {
  return {{"prompt", prompt}, {"width", 64}, {"height", 64}, {"steps", steps}, {"seed", seed}};
}

json submit(int port, const json& body) {
  const auto r = post(port, "/v1/jobs", body);
  EXPECT_EQ(r.status, 202) << r.body;
  return r.status == 202 ? r.body_json() : json();
}

bool is_final_type(const std::string& type) {
  return type == "succeeded" || type == "failed" || type == "cancelled" || type == "expired" ||
         type == "timed_out";
}

bool shows_running(const json& ev) {
  const std::string type = ev.value("type", "");
  return type == "started" || type == "progress" || type == "preview" || type == "running" ||
         (ev.contains("status") && ev["status"] == "running");
}

std::string wait_final(int port, const std::string& id, seconds timeout) {
  WsClient ws;
  if (!ws.connect(port, "/v1/jobs/" + id + "/events")) return "connect failed";
  const auto ev =
      ws.next_json([](const json& j) { return is_final_type(j.value("type", "")); }, timeout);
  return ev ? (*ev)["type"].get<std::string>() : "timeout";
}

std::string raw_request(int port, const std::string& request) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string got;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
    timeval tv{10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    send(fd, request.data(), request.size(), MSG_NOSIGNAL);
    char buf[4096];
    while (got.find("\r\n\r\n") == std::string::npos) {
      const ssize_t n = recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
    }
  }
  close(fd);
  return got;
}

double metric(int port, const std::string& series) {
  const auto r = get(port, "/metrics");
  std::istringstream in(r.body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return -1;
}

bool wait_metric(int port, const std::string& series, double value, seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (metric(port, series) == value) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace sdserve::itest
