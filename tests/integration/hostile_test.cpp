// Issue #23: no request, slow dependency or web page can crash, stall or misuse the service.
// Each test sends what once crashed, stalled or misled the real binary over a loopback socket,
// expects a clear 4xx (or the right behaviour), and then a normal request still succeeds.
// docs/SECURITY.md lists these attacks and their outcomes.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <sstream>
#include <thread>

#include "harness.h"
#include "pipeline/image.h"

namespace sdserve::itest {
namespace {

using Clock = std::chrono::steady_clock;

// Another client's small job still runs to success.
void expect_still_serving(int port) {
  const json job = submit(port, small_job("still here", 2, 3));
  EXPECT_EQ(wait_final(port, job["id"].get<std::string>()), "succeeded");
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

std::vector<uint8_t> bytes(const std::string& s) {
  return {s.begin(), s.end()};
}

std::string base64(const std::string& in) {
  static const char* tbl = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = (static_cast<uint8_t>(in[i]) << 16) |
                       (static_cast<uint8_t>(in[i + 1]) << 8) | static_cast<uint8_t>(in[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out += tbl[(v >> s) & 63];
  }
  if (i < in.size()) {
    const uint32_t v = (static_cast<uint8_t>(in[i]) << 16) |
                       (i + 1 < in.size() ? static_cast<uint8_t>(in[i + 1]) << 8 : 0);
    out += tbl[v >> 18];
    out += tbl[(v >> 12) & 63];
    out += i + 1 < in.size() ? tbl[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

// A connected socket that sends nothing (an idle client), closed when destroyed.
class IdleConnection {
 public:
  explicit IdleConnection(int port) : fd_(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  }
  ~IdleConnection() { close(fd_); }
  bool connected() const { return connected_; }
  // True once the server wrote to it or closed it: its 503 for a connection past
  // max_connections (written when accepted, so there by the time a later connection was).
  bool answered() const {
    char c;
    return recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT) >= 0;
  }

 private:
  int fd_;
  bool connected_ = false;
};

// Polls GET /healthz until it answers `status`.
bool wait_healthz(int port, int status) {
  const auto deadline = Clock::now() + kTimeout;
  while (Clock::now() < deadline) {
    if (get(port, "/healthz").status == status) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

class HostileTest : public SharedServerTest {};

// One request once killed the process: A1111's routes parsed with nlohmann's unbounded parser,
// whose recursive destructor and dump() overflow the stack at 100,000 levels.
TEST_F(HostileTest, DeepNestingIsRefusedOnEveryBodyRoute) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  for (const auto& route : kBodyRoutes) {
    for (const std::string& body :
         {deep, "{\"prompt\": " + deep + "}", "{\"image\": " + deep + "}"}) {
      const auto res = http(port(), verb::post, route, body);
      ASSERT_EQ(res.status, 400) << route << ": " << res.error << res.body;
      EXPECT_EQ(res.body_json()["error"]["type"], "invalid_json") << route;
    }
  }
  expect_still_serving(port());
}

struct Hostile {
  std::string name, route, body;
  int status;  // expected; 0: any answer below 500
};

std::string many_keys(size_t n, const std::string& prefix) {
  std::string s = "{";
  for (size_t i = 0; i < n; ++i) s += (i ? ",\"" : "\"") + prefix + std::to_string(i) + "\":0";
  return s + "}";
}

// Bodies built to make a parser slow (each under 1 MiB, below max_body_bytes). 95,000 keys
// took 19.6 s on /sdapi/v1/txt2img; the goal is 50 ms per MiB on one core. The bound here is
// 20 times that (CI is shared and runs tests in parallel), still far below what was quadratic.
TEST_F(HostileTest, AnyBodyIsParsedOrRefusedInLinearTime) {
  std::vector<Hostile> cases;
  const std::string keys95k = many_keys(95000, "k");
  for (const auto& route : kBodyRoutes) cases.push_back({"95k keys", route, keys95k, 400});
  // Objects at the members' limit, as many as fit: parsed, then refused (unknown fields).
  std::string wide = "{\"prompt\": \"x\"";
  const std::string at_limit = many_keys(256, "a");
  for (int i = 0; wide.size() + at_limit.size() < 1000000; ++i)
    wide += ",\"o" + std::to_string(i) + "\":" + at_limit;
  wide += "}";
  for (const auto& route : kBodyRoutes) cases.push_back({"objects of 256 keys", route, wide, 400});
  // A long array, escapes in strings, numbers.
  std::string numbers = "{\"prompt\": \"x\", \"styles\": [0";
  while (numbers.size() < 1000000) numbers += ",1e300";
  numbers += "]}";
  cases.push_back({"long array", "/sdapi/v1/txt2img", numbers, 400});
  std::string escapes = "{\"prompt\": \"";
  while (escapes.size() < 1000000) escapes += "\\u00e9\\n";
  escapes += "\", \"steps\": 1, \"width\": 64, \"height\": 64, \"prompt_syntax\": \"none\"}";
  cases.push_back({"escaped prompt", "/v1/jobs", escapes, 202});
  // A1111's prompt syntax at its worst: brackets, weights, BREAKs, colons.
  const auto prompt_body = [](const std::string& unit) {
    std::string p;  // 900 KB as JSON (a backslash is written twice)
    const size_t chars = unit.find('\\') == std::string::npos ? 900000 : 600000;
    while (p.size() < chars) p += unit;
    return json{{"prompt", p}, {"steps", 1}, {"width", 64}, {"height", 64}}.dump();
  };
  for (const std::string unit : {"(", "(a", "[a:1.5)", "(a:1.1)", "BREAK ", ":", "\\(", ": 1"})
    cases.push_back({"prompt '" + unit + "'...", "/v1/jobs", prompt_body(unit), 0});
  // png-info: an infotext of 100,000 fields inside a valid PNG.
  std::string params = "a cat\nSteps: 4";
  while (params.size() < 600000) params += ", K" + std::to_string(params.size()) + ": v";
  pipeline::RgbImage img;
  img.width = img.height = 8;
  img.pixels.assign(8 * 8 * 3, 0);
  const auto png = pipeline::encode_png(img, {{"parameters", params}});
  const std::string png_b64 = base64(std::string(png.begin(), png.end()));
  cases.push_back({"infotext of 100k fields", "/sdapi/v1/png-info",
                   json{{"image", "data:image/png;base64," + png_b64}}.dump(), 200});

  for (const auto& c : cases) {
    const auto t0 = Clock::now();
    const auto res = http(port(), verb::post, c.route, c.body);
    const double ms = ms_since(t0);
    const double mib = static_cast<double>(c.body.size()) / (1 << 20);
    std::printf("%-26s %-20s %7.0f KB  %4d  %7.1f ms  (%.1f ms/MiB)\n", c.name.c_str(),
                c.route.c_str(), c.body.size() / 1000.0, res.status, ms, ms / mib);
    if (c.status != 0)
      EXPECT_EQ(res.status, c.status)
          << c.name << " on " << c.route << ": " << res.body.substr(0, 300);
    else
      EXPECT_TRUE(res.status > 0 && res.status < 500) << c.name << ": " << res.status;
    EXPECT_LT(ms, 1000.0 * std::max(mib, 0.1)) << c.name << " on " << c.route;
  }
  expect_still_serving(port());
}

// steps: 1e400 is valid JSON for a number no double holds: nlohmann throws out_of_range, which
// A1111's routes did not catch (500).
TEST_F(HostileTest, OutOfRangeNumbersAre400NamingTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"/sdapi/v1/txt2img", "steps"},
      {"/sdapi/v1/txt2img", "cfg_scale"},
      {"/sdapi/v1/txt2img", "seed"},
      {"/v1/jobs", "steps"},
      {"/v1/generate", "guidance_scale"}};
  for (const auto& [route, field] : cases) {
    for (const std::string number : {"1e400", "-1e999"}) {
      const std::string body = "{\"prompt\": \"a cat\", \"" + field + "\": " + number + "}";
      const auto res = http(port(), verb::post, route, body);
      ASSERT_EQ(res.status, 400) << route << " " << body << ": " << res.body;
      EXPECT_EQ(res.body_json()["error"]["field"], field) << route << ": " << res.body;
      EXPECT_EQ(res.body_json()["error"]["type"], "validation_error");
    }
  }
  // Nested members are named by their path.
  const auto nested =
      http(port(), verb::post, "/v1/jobs", R"({"prompt": "x", "preview": {"every": 1e400}})");
  EXPECT_EQ(nested.status, 400);
  EXPECT_EQ(nested.body_json()["error"]["field"], "preview.every") << nested.body;
  expect_still_serving(port());
}

// libpng measures tEXt/iTXt with strlen: a NUL in a prompt cut the parameters off after it.
TEST_F(HostileTest, NulInAPromptKeepsTheWholeParameters) {
  json body = small_job(std::string("a\0b", 3), 1, 7);
  body["negative_prompt"] = std::string("n\0m", 3);
  const auto res = post(port(), "/v1/generate", body);
  ASSERT_EQ(res.status, 200) << res.body;
  const std::string params = pipeline::read_png_text(bytes(res.body), "parameters");
  EXPECT_EQ(params.rfind("a\xEF\xBF\xBD"
                         "b\n",
                         0),
            0u)
      << params;
  EXPECT_NE(params.find("Negative prompt: n\xEF\xBF\xBDm"), std::string::npos) << params;
  EXPECT_NE(params.find("Steps: 1"), std::string::npos) << params;
  EXPECT_NE(params.find("Seed: 7"), std::string::npos) << params;
}

// A1111's interrupt remembered 16 jobs per caller: the older ones kept running.
TEST_F(HostileTest, InterruptStopsEveryJobOfTheCaller) {
  constexpr int kJobs = 20;
  const double submitted_before = metric(port(), "sdserve_jobs_submitted_total");
  std::vector<std::thread> clients;
  std::vector<HttpResult> answers(kJobs);
  for (int i = 0; i < kJobs; ++i)
    clients.emplace_back([&, i] {
      answers[i] = post(port(), "/sdapi/v1/txt2img",
                        {{"prompt", "job " + std::to_string(i)},
                         {"steps", 150},
                         {"width", 256},
                         {"height", 256},
                         {"seed", i}});
    });
  const bool all_in = wait_metric(port(), "sdserve_jobs_submitted_total", submitted_before + kJobs);
  const auto stopped = http(port(), verb::post, "/sdapi/v1/interrupt", "");
  for (auto& t : clients) t.join();
  ASSERT_TRUE(all_in);
  EXPECT_EQ(stopped.status, 200);
  int interrupted = 0;
  for (const auto& a : answers) {
    ASSERT_EQ(a.status, 200) << a.error << a.body.substr(0, 300);
    const json info = json::parse(a.body_json()["info"].get<std::string>());
    interrupted += info["interrupted"].get<bool>() ? 1 : 0;
  }
  EXPECT_EQ(interrupted, kJobs);
  expect_still_serving(port());
}

// A1111's refusals were missing from sdserve_jobs_rejected_total.
TEST_F(HostileTest, A1111RefusalsCountAsRejectedJobs) {
  const std::string series = "sdserve_jobs_rejected_total{reason=\"invalid\"}";
  const double before = std::max(0.0, metric(port(), series));
  const std::vector<std::pair<std::string, std::string>> refused = {
      {"/sdapi/v1/txt2img",
       R"({"prompt": "x", "enable_hr": true, "hr_upscaler": "R-ESRGAN 4x+"})"},  // unsupported
      {"/sdapi/v1/txt2img", R"({"prompt": "x", "steps": 0})"},                   // out of range
      {"/sdapi/v1/txt2img", R"({"prompt": "x", "batch_size": "two"})"},          // wrong type
      {"/sdapi/v1/txt2img", "{\"prompt\": "},                                    // not JSON
      {"/v1/jobs", R"({"prompt": "x", "steps": 0})"}};
  for (const auto& [route, body] : refused) {
    const auto res = http(port(), verb::post, route, body);
    EXPECT_EQ(res.status, 400) << route << " " << body;
  }
  EXPECT_EQ(metric(port(), series), before + static_cast<double>(refused.size()));
  // png-info submits no job: not counted.
  EXPECT_EQ(http(port(), verb::post, "/sdapi/v1/png-info", "{}").status, 400);
  EXPECT_EQ(metric(port(), series), before + static_cast<double>(refused.size()));
}

// A request path with invalid UTF-8 went into --log-format json lines as it was.
TEST(HostileStartTest, InvalidUtf8InAPathKeepsJsonLogsValid) {
  ServerProcess server({"--log-format", "json"});
  const std::string got = raw_request(
      server.port(), "GET /\xc3(abc\xff HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(got.rfind("HTTP/1.1 404", 0), 0u) << got;
  ASSERT_TRUE(server.wait_log("(abc"));
  std::istringstream lines(server.log());
  std::string line;
  int checked = 0;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] != '{') continue;
    ++checked;
    json j;
    ASSERT_NO_THROW(j = json::parse(line)) << line;
    if (line.find("(abc") != std::string::npos) {
      EXPECT_EQ(j["msg"].get<std::string>().rfind("GET /\xEF\xBF\xBD(abc\xEF\xBF\xBD 404", 0), 0u)
          << line;
    }
  }
  EXPECT_GT(checked, 2);
}

// "--api-keys ," yielded no key after splitting, and so a service open to everyone.
TEST(HostileStartTest, ApiKeysThatNameNoKeyStopStartUp) {
  for (const std::string text : {",", " , ,"}) {
    const auto [status, out] = run_to_exit({"--api-keys", text});
    EXPECT_EQ(status, 2) << out;
    EXPECT_NE(out.find("api_keys holds no item"), std::string::npos) << out;
    const auto [env_status, env_out] = run_to_exit({}, {{"SDSERVE_API_KEYS", text}});
    EXPECT_EQ(env_status, 2) << env_out;
    EXPECT_NE(env_out.find("api_keys holds no item"), std::string::npos) << env_out;
  }
  // Empty still means no keys.
  ServerProcess open({"--api-keys", ""});
  EXPECT_EQ(get(open.port(), "/v1/models").status, 200);
}

// Open connections were not capped: idle clients could hold descriptors until accept() failed
// for everyone.
TEST(HostileStartTest, ConnectionsBeyondMaxConnectionsAreRefused) {
  ServerProcess server({"--max-connections", "4"});
  const int port = server.port();
  std::vector<std::unique_ptr<IdleConnection>> idle;
  // The server counts a connection until its session ends, a moment after the client has its
  // answer: a request just made (the readiness poll, a 200 from /healthz) can still count, and
  // an idle connection be refused in its place. Such ones are replaced until four are held.
  for (int attempt = 0; attempt < 20 && idle.size() < 4; ++attempt) {
    while (idle.size() < 4) {
      idle.push_back(std::make_unique<IdleConnection>(port));
      ASSERT_TRUE(idle.back()->connected());
    }
    ASSERT_TRUE(wait_healthz(port, 503)) << "a fifth connection was served";
    idle.erase(
        std::remove_if(idle.begin(), idle.end(), [](const auto& c) { return c->answered(); }),
        idle.end());
  }
  ASSERT_EQ(idle.size(), 4u);
  const auto refused = get(port, "/v1/models");
  EXPECT_EQ(refused.status, 503);
  EXPECT_EQ(refused.body_json()["error"]["type"], "too_many_connections");
  idle.pop_back();  // one client leaves: room for another
  ASSERT_TRUE(wait_healthz(port, 200));
  // Three idle and the scrape (a scrape beside a /healthz still counted is refused: -1, again).
  EXPECT_TRUE(wait_metric(port, "sdserve_open_connections", 4));
  double refusals = -1;
  for (int i = 0; i < 100 && refusals < 0; ++i) {
    refusals = metric(port, "sdserve_connections_refused_total");
    if (refusals < 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_GE(refusals, 2);
  idle.clear();
  ASSERT_TRUE(wait_healthz(port, 200));
  expect_still_serving(port);
}

}  // namespace
}  // namespace sdserve::itest
