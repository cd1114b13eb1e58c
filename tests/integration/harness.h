// Test harness for black-box tests of `sdserve serve`: the real binary as a child process, and
// small Beast HTTP / WebSocket clients with deadlines (nothing here waits forever).
#pragma once

#include <sys/types.h>

#include <gtest/gtest.h>

#include <boost/beast/http/verb.hpp>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace sdserve::itest {

using json = nlohmann::json;
using std::chrono::seconds;
using Headers = std::map<std::string, std::string>;
using boost::beast::http::verb;

// Generous: CI machines are slow and shared; tests wait on events, not on time.
constexpr seconds kTimeout{60};

// A running `sdserve serve --host 127.0.0.1 --port 0 ...` (the bundled tiny model on the CPU
// unless `args` say otherwise). Killed, if still running, when destroyed.
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> args = {}, bool wait_ready = true);
  ~ServerProcess();
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string log() const;
  // Waits until the log contains `needle`.
  bool wait_log(const std::string& needle, seconds timeout = kTimeout) const;
  void signal(int signo) const;
  // The exit status, or nullopt when still running after `timeout`.
  std::optional<int> wait_exit(seconds timeout = kTimeout);

 private:
  void read_output();

  pid_t pid_ = -1;
  int out_fd_ = -1;
  int port_ = 0;
  std::optional<int> exit_status_;
  std::thread reader_;
  mutable std::mutex mutex_;
  mutable std::condition_variable cv_;
  std::string log_;
  bool eof_ = false;
};

// Runs a program (argv[0] its path) with our environment minus SDSERVE_* plus `env`, killed after
// `timeout`: its exit status (-1 when it had to be killed) and stdout+stderr.
std::pair<int, std::string> run_program(const std::vector<std::string>& argv,
                                        const std::map<std::string, std::string>& env,
                                        seconds timeout);
// Runs `sdserve serve ARGS` to completion (for start-up errors): exit status and output.
std::pair<int, std::string> run_to_exit(const std::vector<std::string>& args,
                                        const std::map<std::string, std::string>& env = {});

struct HttpResult {
  int status = 0;     // 0: no response (connection refused, reset, timeout)
  std::string error;  // why, when status is 0
  Headers headers;    // lower-case names
  std::string body;
  json body_json() const;
  std::string header(const std::string& lower_name) const;
};

// One request on a fresh connection.
HttpResult http(int port, verb method, const std::string& target, const std::string& body = "",
                const Headers& headers = {}, seconds timeout = kTimeout);
inline HttpResult get(int port, const std::string& target, const Headers& headers = {}) {
  return http(port, verb::get, target, "", headers);
}
inline HttpResult post(int port, const std::string& target, const json& body,
                       const Headers& headers = {}) {
  return http(port, verb::post, target, body.dump(), headers);
}
// Sends raw bytes on a new connection and returns what came back (up to the first response's
// headers; 10 s at most), for requests an HTTP client would refuse to write.
std::string raw_request(int port, const std::string& request);

// The routes that read a JSON body (server/handlers.cpp takes_body()).
inline const std::vector<std::string> kBodyRoutes = {"/v1/jobs", "/v1/generate",
                                                     "/sdapi/v1/txt2img", "/sdapi/v1/png-info"};

// A WebSocket client; frames are read on its own thread into a queue.
// A test suite whose tests share one default `sdserve serve` (started before the suite's first
// test, stopped after its last).
// One server for every test of a suite. Under ctest this shares only when the suite runs as one
// process: add the suite to SHARED_SERVER_SUITES in tests/integration/CMakeLists.txt.
class SharedServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = new ServerProcess(); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  int port() const { return server_->port(); }
  static inline ServerProcess* server_ = nullptr;
};

class WsClient {
 public:
  struct Frame {
    bool text = true;
    std::string data;
    json as_json() const { return json::parse(data); }
  };

  WsClient();
  ~WsClient();
  // Upgrades `target`. With `read` false nothing is ever read from the socket (a client that
  // never reads); `rcvbuf` shrinks the socket's receive buffer first. On failure returns false
  // and `http_status` gets the refusal's status (0 when none).
  bool connect(int port, const std::string& target, const Headers& headers = {}, bool read = true,
               int rcvbuf = 0, int* http_status = nullptr);
  // Starts reading on a client connected with `read` false.
  void start_reading();
  // The next frame, or nullopt on timeout or once the connection has ended.
  std::optional<Frame> next(seconds timeout = kTimeout);
  // The next text frame whose JSON satisfies `pred`, collecting everything read on the way.
  std::optional<json> next_json(const std::function<bool(const json&)>& pred,
                                seconds timeout = kTimeout, std::vector<Frame>* seen = nullptr);
  void send_text(const std::string& text);
  void close();  // a close frame
  void abort();  // drops the TCP connection without a close frame
  // True once the server closed the connection; `close_code` its close frame's code (0: none).
  bool wait_closed(seconds timeout = kTimeout, int* close_code = nullptr);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Pictures in requests: base64 (standard alphabet, padded) both ways, and a file of
// tests/fixtures as bytes.
std::string base64_of(const std::vector<uint8_t>& bytes);
std::vector<uint8_t> unbase64_of(const std::string& text);
std::vector<uint8_t> fixture_bytes(const std::string& name);

// Job helpers.
json small_job(const std::string& prompt, int steps = 4, uint64_t seed = 1);
// Submits and returns the 202 body (fails the test on anything else).
json submit(int port, const json& body);
// Waits (WebSocket) until the job reaches a final state; returns the final event's type.
std::string wait_final(int port, const std::string& id, seconds timeout = kTimeout);
// Polls GET /metrics until `metric` (exact series text, e.g. sdserve_running_jobs) has `value`.
bool wait_metric(int port, const std::string& series, double value, seconds timeout = kTimeout);
double metric(int port, const std::string& series);

bool is_final_type(const std::string& type);
// An event showing the job denoising: "started", progress/previews, or a catch-up state event
// that says "running" (when the job had started before the client subscribed).
bool shows_running(const json& event);

}  // namespace sdserve::itest
