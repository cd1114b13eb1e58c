// Hostile and careless input against the real binary: each test sends what once crashed, stalled
// or bloated the service, then checks that it answered and still serves another client's job.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

#include "harness.h"

namespace sdserve::itest {
namespace {

namespace fs = std::filesystem;

// Resident memory of a process in MiB (VmRSS).
double rss_mb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return -1;
}

// Another client's small job still runs to success.
void expect_still_serving(int port) {
  const json job = submit(port, small_job("still here", 2, 3));
  EXPECT_EQ(wait_final(port, job["id"].get<std::string>()), "succeeded");
}

// A plain TCP connection for requests the HTTP client cannot send (raw bytes, trailers).
class Raw {
 public:
  explicit Raw(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
      throw std::runtime_error("connect failed");
    timeval tv{10, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  }
  ~Raw() { close(fd_); }
  int fd() const { return fd_; }
  // Sends everything (or until the send timeout); returns the bytes sent.
  size_t send_all(const std::string& data) {
    size_t sent = 0;
    while (sent < data.size()) {
      const ssize_t n = send(fd_, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) break;
      sent += static_cast<size_t>(n);
    }
    return sent;
  }
  // Reads until the status line and headers have arrived; returns the status (0: none).
  int read_status() {
    std::string got;
    char buf[4096];
    while (got.find("\r\n\r\n") == std::string::npos) {
      const ssize_t n = recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
    }
    if (got.rfind("HTTP/1.1 ", 0) != 0) return 0;
    return std::stoi(got.substr(9, 3));
  }

 private:
  int fd_ = -1;
};

std::string random_letters(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, 'a');
  for (auto& c : s) c = static_cast<char>('a' + rng() % 26);
  return s;
}

TEST(HardeningTest, DeeplyNestedJsonIsRefusedNotFatal) {
  ServerProcess server;
  const int port = server.port();
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const auto res = http(port, verb::post, "/v1/jobs", "{\"prompt\": " + deep + "}");
  EXPECT_EQ(res.status, 400) << res.error;
  EXPECT_EQ(res.body_json()["error"]["type"], "invalid_json");
  // Nested inside an object member too, and on the multi-job WebSocket (whose messages are at
  // most 64 KB).
  const auto res2 =
      http(port, verb::post, "/v1/jobs", "{\"prompt\": \"x\", \"preview\": " + deep + "}");
  EXPECT_EQ(res2.status, 400);
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/events"));
  ws.send_text("{\"subscribe\": " + std::string(30000, '[') + std::string(30000, ']') + "}");
  const auto answer = ws.next_json([](const json& j) { return j.value("type", "") == "error"; });
  ASSERT_TRUE(answer.has_value());
  expect_still_serving(port);
}

TEST(HardeningTest, OneHugeWordDoesNotHoldTheWorker) {
  ServerProcess server;
  const int port = server.port();
  // ~1 MB of letters without a space (under max_body_bytes): tokenizing it whole took minutes.
  // Read as A1111 does it is past 16 chunks of 75 tokens: refused at once, naming the field.
  json body = small_job(random_letters(1000000, 7), 1, 5);
  const auto t0 = std::chrono::steady_clock::now();
  const auto refused = post(port, "/v1/jobs", body);
  EXPECT_EQ(refused.status, 400);
  EXPECT_EQ(refused.body_json()["error"]["field"], "prompt");
  // Read as diffusers does it is cut at 75 tokens, and runs.
  body["prompt_syntax"] = "none";
  const json huge = submit(port, body);
  const json other = submit(port, small_job("a normal prompt", 2, 6));
  EXPECT_EQ(wait_final(port, huge["id"].get<std::string>()), "succeeded");
  EXPECT_EQ(wait_final(port, other["id"].get<std::string>()), "succeeded");
  // Generous for a slow CI machine; the unbounded tokenizer needed well over a minute.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30));
}

TEST(HardeningTest, FifoModelFileIsRefusedAtStartUp) {
  const fs::path dir = fs::temp_directory_path() / ("sdserve-fifo-" + std::to_string(getpid()));
  fs::create_directories(dir);
  const fs::path fifo = dir / "x.safetensors";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  ServerProcess server({"--model", fifo.string()}, false);
  const auto status = server.wait_exit(std::chrono::seconds(30));
  fs::remove_all(dir);
  ASSERT_TRUE(status.has_value()) << "start-up blocked on the FIFO; log:\n" << server.log();
  EXPECT_NE(*status, 0);
  EXPECT_NE(server.log().find("not a regular file"), std::string::npos) << server.log();
}

// WebSocket frames a client sends: masked, as RFC 6455 requires.
std::string client_text_frame(const std::string& payload) {
  std::string f;
  f += static_cast<char>(0x81);
  if (payload.size() < 126) {
    f += static_cast<char>(0x80 | payload.size());
  } else {
    f += static_cast<char>(0x80 | 126);
    f += static_cast<char>((payload.size() >> 8) & 0xff);
    f += static_cast<char>(payload.size() & 0xff);
  }
  const char mask[4] = {0x11, 0x22, 0x33, 0x44};
  f.append(mask, 4);
  for (size_t i = 0; i < payload.size(); ++i) f += static_cast<char>(payload[i] ^ mask[i % 4]);
  return f;
}

TEST(HardeningTest, WebSocketClientThatNeverReadsCannotGrowServerMemory) {
  ServerProcess server;
  const int port = server.port();
  Raw raw(port);
  int rcvbuf = 4096;
  setsockopt(raw.fd(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  raw.send_all(
      "GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: "
      "Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: "
      "13\r\n\r\n");
  ASSERT_EQ(raw.read_status(), 101);
  const double before = rss_mb(server.pid());
  // Commands whose answers (errors echoing a long id) are never read.
  const std::string frame =
      client_text_frame("{\"subscribe\": \"" + std::string(2000, 'z') + "\"}");
  std::string burst;
  for (int i = 0; i < 100; ++i) burst += frame;
  timeval tv{2, 0};  // the server stops reading: a blocked send ends after 2 s
  setsockopt(raw.fd(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  size_t sent = 0;
  for (int i = 0; i < 300; ++i) {  // up to 60 MB
    const size_t n = raw.send_all(burst);
    sent += n;
    if (n < burst.size()) break;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const double after = rss_mb(server.pid());
  EXPECT_LT(after - before, 32.0) << "sent " << sent / 1e6 << " MB, RSS " << before << " -> "
                                  << after << " MiB";
  expect_still_serving(port);
}

TEST(HardeningTest, FinishedJobsDoNotKeepHugePrompts) {
  ServerProcess server;
  const int port = server.port();
  const std::string words = [] {
    std::string s;
    while (s.size() < 900000) s += "lighthouse at dusk, ";
    return s;
  }();
  std::vector<std::string> ids;
  for (int i = 0; i < 12; ++i) {
    json body = small_job(words, 1, static_cast<uint64_t>(i));
    body["prompt_syntax"] = "none";  // cut at 75 tokens (A1111's reading refuses it)
    ids.push_back(submit(port, body)["id"]);
  }
  for (const auto& id : ids) ASSERT_EQ(wait_final(port, id), "succeeded");
  const json job = get(port, "/v1/jobs/" + ids.back()).body_json();
  const std::string kept = job["request"]["prompt"].get<std::string>();
  EXPECT_LE(kept.size(), 2100u);
  EXPECT_EQ(kept.substr(0, 20), words.substr(0, 20));
  // The PNG keeps the prompt as sent in its parameters (A1111 reads it from there).
  const auto png = get(port, "/v1/jobs/" + ids.back() + "/images/0");
  EXPECT_EQ(png.status, 200);
}

TEST(HardeningTest, VeryWideImageWithSmallPreviewSucceeds) {
  ServerProcess server;
  const int port = server.port();
  // Far wider than tall with a small max_size: shrinking boxes taller than the image ran past the
  // buffer.
  json body = small_job("wide", 2, 9);
  body["width"] = 1088;
  body["height"] = 64;
  body["guidance_scale"] = 1.0;
  body["preview"] = {{"every", 1}, {"max_size", 16}, {"format", "png"}};
  const json job = submit(port, body);
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/jobs/" + job["id"].get<std::string>() + "/events"));
  std::vector<WsClient::Frame> seen;
  const auto final_event = ws.next_json(
      [](const json& j) { return is_final_type(j.value("type", "")); }, kTimeout, &seen);
  ASSERT_TRUE(final_event.has_value());
  EXPECT_EQ((*final_event)["type"], "succeeded");
  bool preview = false;
  for (const auto& f : seen) {
    if (!f.text) continue;
    const json j = f.as_json();
    if (j.value("type", "") != "preview") continue;
    preview = true;
    // The preview projects the 136x8 latent: boxes of 9 latent pixels, taller than the latent.
    EXPECT_LE(j["width"].get<int>(), 16);
    EXPECT_GE(j["width"].get<int>(), 8);
    EXPECT_EQ(j["height"], 1);
  }
  EXPECT_TRUE(preview);
}

TEST(HardeningTest, NoInternalsLeakAndIdsAreUnguessable) {
  ServerProcess server;
  const int port = server.port();
  const json models = get(port, "/v1/models").body_json();
  ASSERT_EQ(models["models"].size(), 1u);
  EXPECT_FALSE(models["models"][0].contains("path")) << models.dump();
  EXPECT_EQ(models.dump().find(SDSERVE_MODELS), std::string::npos);
  const std::string id = submit(port, small_job("id", 1, 1))["id"];
  EXPECT_EQ(id.size(), 32u);  // 128 random bits in hex
  EXPECT_EQ(id.find_first_not_of("0123456789abcdef"), std::string::npos);
}

TEST(HardeningTest, OddBytesGetAnAnswer) {
  ServerProcess server;
  const int port = server.port();
  // A number past double's range: a validation error, not a 500.
  auto r = http(port, verb::post, "/v1/jobs", R"({"prompt": "x", "guidance_scale": 1e400})");
  EXPECT_EQ(r.status, 400);
  EXPECT_NO_THROW(r.body_json());
  // Invalid UTF-8 in the body and in the URL: answered with well-formed JSON.
  r = http(port, verb::post, "/v1/jobs", "{\"prompt\": \"caf\xc3\x28\"}");
  EXPECT_EQ(r.status, 400);
  EXPECT_NO_THROW(r.body_json());
  r = http(port, verb::post, "/v1/jobs", "{\"pr\xff\xfeompt\": 1}");
  EXPECT_EQ(r.status, 400);
  EXPECT_NO_THROW(r.body_json());
  {
    Raw raw(port);
    raw.send_all("GET /v1/jobs/\xff\xfe HTTP/1.1\r\nHost: localhost\r\n\r\n");
    EXPECT_EQ(raw.read_status(), 404);
  }
  {
    Raw raw(port);
    raw.send_all("GET /nowhere/\xc3\x28 HTTP/1.1\r\nHost: localhost\r\n\r\n");
    EXPECT_EQ(raw.read_status(), 404);
  }
  // A 100 KB chunked trailer: refused like oversized headers.
  {
    Raw raw(port);
    std::string req =
        "POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nTrailer: "
        "X-Pad\r\n\r\n";
    const std::string body = R"({"prompt": "trailer"})";
    char size[16];
    std::snprintf(size, sizeof size, "%zx", body.size());
    req += std::string(size) + "\r\n" + body + "\r\n0\r\nX-Pad: " + std::string(100000, 'p') +
           "\r\n\r\n";
    raw.send_all(req);
    const int status = raw.read_status();
    EXPECT_TRUE(status == 431 || status == 400 || status == 413) << status;
  }
  expect_still_serving(port);
}

TEST(HardeningTest, ResubscribingToAFinishedJobDoesNotReplayItsEnd) {
  ServerProcess server;
  const int port = server.port();
  const std::string id = submit(port, small_job("done", 1, 2))["id"];
  ASSERT_EQ(wait_final(port, id), "succeeded");
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/events"));
  for (int i = 0; i < 5000; ++i) ws.send_text("{\"subscribe\": \"" + id + "\"}");
  ws.send_text("{\"unsubscribe\": \"no-such-job\"}");  // a marker: its answer comes last
  int finals = 0, answers = 0;
  for (;;) {
    const auto f = ws.next(std::chrono::seconds(30));
    ASSERT_TRUE(f.has_value()) << "after " << answers << " answers";
    if (!f->text) continue;
    const json j = f->as_json();
    ++answers;
    if (is_final_type(j.value("type", ""))) ++finals;
    if (j.value("job_id", "") == "no-such-job") break;
  }
  EXPECT_EQ(finals, 1);
}

TEST(HardeningTest, Fp16OnTheCpuIsRefusedAtStartUp) {
  ServerProcess server({"--precision", "fp16"}, false);
  const auto status = server.wait_exit(std::chrono::seconds(60));
  ASSERT_TRUE(status.has_value()) << server.log();
  EXPECT_NE(*status, 0);
  EXPECT_NE(server.log().find("fp16 needs a CUDA device"), std::string::npos) << server.log();
}

TEST(HardeningTest, SighupDrainsLikeSigterm) {
  ServerProcess server;
  const int port = server.port();
  const std::string id = submit(port, small_job("drained", 30, 4))["id"];
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/jobs/" + id + "/events"));
  ASSERT_TRUE(ws.next_json(shows_running).has_value());
  server.signal(SIGHUP);
  const auto final_event =
      ws.next_json([](const json& j) { return is_final_type(j.value("type", "")); });
  ASSERT_TRUE(final_event.has_value());
  EXPECT_EQ((*final_event)["type"], "succeeded");
  const auto status = server.wait_exit();
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(*status, 0);
  EXPECT_NE(server.log().find("received SIGHUP"), std::string::npos);
}

}  // namespace
}  // namespace sdserve::itest
