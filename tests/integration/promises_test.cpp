// README promises that the other black-box tests leave open: /readyz while the model loads and
// warms up, metrics_auth, /v1/generate's 503 for a job that expired in the queue, read_timeout_s,
// the result_max_mb cap (410 + results_evicted), the shutdown grace period and the second signal,
// `sdserve bench` on the CPU, and VAE / latent2rgb previews as PNG frames.
//
// Not tested, because no client can bring them about: /v1/generate's 409 (a waiting generate's
// job id is only told with its answer, so nobody can DELETE it meanwhile) and 500 job_failed (a
// job fails only when the model throws, which no valid request makes the tiny model do).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <tuple>

#include "harness.h"
#include "pipeline/image.h"

extern char** environ;

namespace sdserve::itest {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

const std::string kTinyModel = std::string(SDSERVE_MODELS) + "/tiny-sd15";

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string id_of(const json& j) {
  return j.at("id").get<std::string>();
}

json job_view(int port, const std::string& id) {
  return get(port, "/v1/jobs/" + id).body_json();
}

std::vector<uint8_t> bytes(const std::string& s) {
  return {s.begin(), s.end()};
}

// A job that keeps the CPU busy far longer than any test waits for it (it is always cancelled or
// cut short): 16 images x 150 steps; with --max-batch 1 they run one after another.
json hog_job(const std::string& prompt, uint64_t seed) {
  json body = small_job(prompt, 150, seed);
  body["num_images"] = 16;
  return body;
}

// A fresh directory under the system's temporary directory, removed with its contents.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "sdserve-promises-XXXXXX").string();
    if (!mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// A bare TCP client for requests that never complete (Beast's client always completes them).
class RawConn {
 public:
  explicit RawConn(int port) : opened_(Clock::now()) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ =
        fd_ >= 0 && ::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
  }
  ~RawConn() {
    if (fd_ >= 0) ::close(fd_);
  }
  RawConn(const RawConn&) = delete;
  RawConn& operator=(const RawConn&) = delete;

  bool connected() const { return connected_; }
  Clock::time_point opened() const { return opened_; }

  bool send(const std::string& data) {
    size_t off = 0;
    while (off < data.size()) {
      const ssize_t n = ::send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  }

  // Reads one complete response (head + Content-Length body); returns its status, 0 if none.
  int read_response(seconds timeout) {
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      const size_t head_end = received_.find("\r\n\r\n");
      if (head_end != std::string::npos) {
        size_t length = 0;
        const size_t cl = received_.find("Content-Length: ");
        if (cl != std::string::npos && cl < head_end)
          length = std::stoul(received_.substr(cl + std::strlen("Content-Length: ")));
        if (received_.size() >= head_end + 4 + length) {
          const int status = std::atoi(received_.substr(9, 3).c_str());
          received_.erase(0, head_end + 4 + length);
          return status;
        }
      }
      if (!read_some(deadline)) return 0;
    }
  }

  // Waits until the server ends the connection (end of stream or reset), reading whatever comes;
  // `trickle` is sent one byte every 200 ms meanwhile. Returns when it ended, or nullopt when the
  // connection is still open after `timeout`.
  std::optional<Clock::time_point> wait_closed(seconds timeout, const std::string& trickle = "") {
    const auto deadline = Clock::now() + timeout;
    size_t sent = 0;
    while (Clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      const int r = poll(&p, 1, 200);
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) {
        if (sent < trickle.size() && !send(trickle.substr(sent++, 1))) return Clock::now();
        continue;
      }
      char buf[4096];
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return Clock::now();
      received_.append(buf, static_cast<size_t>(n));
    }
    return std::nullopt;
  }

 private:
  bool read_some(Clock::time_point deadline) {
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) return false;
    char buf[4096];
    const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n <= 0) return false;
    received_.append(buf, static_cast<size_t>(n));
    return true;
  }

  int fd_ = -1;
  bool connected_ = false;
  Clock::time_point opened_;
  std::string received_;
};

// Width and height from a PNG's signature and IHDR chunk (the first chunk, by the format).
std::optional<std::pair<int, int>> png_size(const std::string& data) {
  static const unsigned char kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (data.size() < 24 || std::memcmp(data.data(), kSignature, 8) != 0 ||
      data.compare(12, 4, "IHDR") != 0)
    return std::nullopt;
  auto be32 = [&](size_t at) {
    const auto* p = reinterpret_cast<const unsigned char*>(data.data()) + at;
    return static_cast<int>((uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
                            (uint32_t{p[2]} << 8) | uint32_t{p[3]});
  };
  return std::make_pair(be32(16), be32(20));
}

// ---------------------------------------------------------------------------------------------

// /readyz: 503 while the model loads and warms up, 200 afterwards; /healthz: 200 throughout.
//
// Nothing outside the process can hold start-up at a chosen point (model files are opened with
// O_NONBLOCK and mmapped, so file leases make loading fail rather than wait; every response is
// logged before it is written, so a full log pipe blocks the answers too). The window is made
// wide instead: the warm-up times UNet steps at the model's native size (unet sample_size x 8)
// for every batch size up to max_batch that fits its budget, so a copy of the tiny model with a
// larger sample_size warms up for seconds of CPU work on the server, against a few milliseconds
// for this loop to get an answer in. A slower machine stretches that work too, so the margin does
// not shrink on a loaded CI host.
TEST(PromisesTest, ReadyzIs503UntilLoadedAndWarmedUpHealthzAlways200) {
  TempDir dir;
  const fs::path model = dir.path() / "slow-warm-up";
  fs::copy(kTinyModel, model, fs::copy_options::recursive);
  {
    const fs::path unet_config = model / "unet" / "config.json";
    std::ifstream in(unet_config);
    json config = json::parse(in);
    in.close();
    config["sample_size"] = 16;  // 128 px: a warm-up of seconds on the CPU, many polls long
    std::ofstream(unet_config) << config.dump(2);
  }
  ServerProcess server({"--model", model.string()}, /*wait_ready=*/false);
  const int port = server.port();

  int first_readyz = 0, not_ready = 0, not_ready_while_warming = 0, polls = 0;
  bool ready = false;
  const auto deadline = Clock::now() + 2 * kTimeout;
  while (!ready && Clock::now() < deadline) {
    // The log reports the model loaded before the engine is attached and starts warming up: a
    // 503 after that line was read is a warm-up answer.
    const bool loaded = server.log().find(", loaded in ") != std::string::npos;
    const auto health = get(port, "/healthz");
    EXPECT_EQ(health.status, 200) << "poll " << polls << ": " << health.error;
    const auto r = get(port, "/readyz");
    if (polls++ == 0) first_readyz = r.status;
    if (r.status == 200) {
      ready = true;
      break;
    }
    ASSERT_EQ(r.status, 503) << "poll " << polls << ": " << r.error << r.body;
    EXPECT_EQ(r.body_json().value("status", ""), "loading");
    ++not_ready;
    not_ready_while_warming += loaded ? 1 : 0;
    std::this_thread::sleep_for(milliseconds(10));
  }
  ASSERT_TRUE(ready) << "never ready";
  EXPECT_EQ(first_readyz, 503) << "ready before the model could have been loaded";
  EXPECT_GE(not_ready_while_warming, 1)
      << "no 503 seen during the warm-up (" << not_ready << " while loading)";
  // Ready for good, and it runs jobs.
  for (int i = 0; i < 3; ++i) EXPECT_EQ(get(port, "/readyz").status, 200);
  EXPECT_EQ(get(port, "/healthz").status, 200);
  EXPECT_EQ(wait_final(port, id_of(submit(port, small_job("after the warm-up", 2, 3)))),
            "succeeded");
}

// With api_keys set, /metrics needs a key only when metrics_auth is on; /healthz and /readyz stay
// open either way.
TEST(PromisesTest, MetricsNeedAKeyOnlyWithMetricsAuth) {
  const Headers key_one = {{"Authorization", "Bearer key-one"}};
  const Headers key_two = {{"Authorization", "Bearer key-two"}};
  const Headers wrong = {{"Authorization", "Bearer not-a-key"}};
  {
    ServerProcess server({"--api-keys", "key-one,key-two", "--metrics-auth", "true"});
    const int port = server.port();
    const auto anonymous = get(port, "/metrics");
    EXPECT_EQ(anonymous.status, 401) << anonymous.body;
    EXPECT_EQ(anonymous.body_json()["error"]["type"], "unauthorized");
    EXPECT_EQ(anonymous.header("www-authenticate"), "Bearer");
    EXPECT_EQ(get(port, "/metrics", wrong).status, 401);
    const auto with_key = get(port, "/metrics", key_one);
    EXPECT_EQ(with_key.status, 200);
    EXPECT_NE(with_key.body.find("sdserve_ready 1"), std::string::npos) << with_key.body;
    EXPECT_EQ(get(port, "/metrics", key_two).status, 200);
    EXPECT_EQ(get(port, "/healthz").status, 200);
    EXPECT_EQ(get(port, "/readyz").status, 200);
  }
  {
    ServerProcess server({"--api-keys", "key-one"});  // metrics_auth defaults to false
    const int port = server.port();
    const auto anonymous = get(port, "/metrics");
    EXPECT_EQ(anonymous.status, 200);
    EXPECT_NE(anonymous.body.find("sdserve_ready 1"), std::string::npos) << anonymous.body;
    // The keys still guard the API itself.
    EXPECT_EQ(get(port, "/v1/models").status, 401);
    EXPECT_EQ(get(port, "/v1/models", key_one).status, 200);
  }
}

// POST /v1/generate answers 503 "expired" (with Retry-After) when its job outlives timeout_s in
// the queue; here it waits behind a long job that holds the only batch slot.
TEST(PromisesTest, GenerateAnswers503WhenItsJobExpiresInTheQueue) {
  ServerProcess server({"--max-batch", "1"});
  const int port = server.port();
  const std::string hog = id_of(submit(port, hog_job("holds the only slot", 21)));
  WsClient hog_events;
  ASSERT_TRUE(hog_events.connect(port, "/v1/jobs/" + hog + "/events"));
  ASSERT_TRUE(hog_events.next_json(shows_running));

  json late = small_job("expires in the queue", 2, 22);
  late["timeout_s"] = 0.5;
  const auto r = post(port, "/v1/generate", late);
  EXPECT_EQ(r.status, 503) << r.body;
  EXPECT_EQ(r.body_json()["error"]["type"], "expired");
  EXPECT_FALSE(r.header("retry-after").empty());
  // It expired while the long job still ran (the only way it could have waited).
  EXPECT_EQ(job_view(port, hog).value("status", ""), "running");
  EXPECT_EQ(metric(port, "sdserve_jobs_finished_total{status=\"expired\"}"), 1);

  EXPECT_EQ(http(port, verb::delete_, "/v1/jobs/" + hog).status, 200);
  const auto final_event =
      hog_events.next_json([](const json& j) { return is_final_type(j.value("type", "")); });
  ASSERT_TRUE(final_event);
  EXPECT_EQ((*final_event)["type"], "cancelled");
}

// read_timeout_s: a request has to arrive whole within it, and an idle keep-alive connection is
// closed after it, while everyone else is served (a /v1/generate longer than it included).
TEST(PromisesTest, ReadTimeoutDropsSlowAndIdleConnectionsOnly) {
  ServerProcess server({"--read-timeout-s", "1"});
  const int port = server.port();

  RawConn silent(port), partial(port), trickling(port), keep_alive(port);
  ASSERT_TRUE(silent.connected() && partial.connected() && trickling.connected() &&
              keep_alive.connected());
  ASSERT_TRUE(partial.send("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"));  // no blank line
  ASSERT_TRUE(keep_alive.send("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));
  ASSERT_EQ(keep_alive.read_response(kTimeout), 200);
  const auto idle_since = Clock::now();

  // A header that would take 30 s to arrive, one byte every 200 ms: the limit is per request,
  // not per read.
  const std::string slow_header =
      "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + std::string(100, 'a') + "\r\n\r\n";
  // 15 s: well past the 1 s limit, and well short of the 30 s default.
  const seconds limit(15);
  auto silent_end = std::async(std::launch::async, [&] { return silent.wait_closed(limit); });
  auto partial_end = std::async(std::launch::async, [&] { return partial.wait_closed(limit); });
  auto trickling_end =
      std::async(std::launch::async, [&] { return trickling.wait_closed(limit, slow_header); });
  auto idle_end = std::async(std::launch::async, [&] { return keep_alive.wait_closed(limit); });

  // Served meanwhile, including a generate that may well take longer than read_timeout_s.
  auto generated = std::async(std::launch::async, [&] {
    return post(port, "/v1/generate", small_job("slow generate", 40, 23));
  });
  EXPECT_EQ(get(port, "/healthz").status, 200);

  // Lower bounds: the server's clock for a connection starts after our connect (or after the
  // response), so it cannot close sooner than 1 s after those; 0.9 s allows for rounding.
  const auto silent_closed = silent_end.get();
  ASSERT_TRUE(silent_closed) << "a connection that never sent anything is still open";
  EXPECT_GE(std::chrono::duration<double>(*silent_closed - silent.opened()).count(), 0.9);
  const auto partial_closed = partial_end.get();
  ASSERT_TRUE(partial_closed) << "a connection with half a request is still open";
  EXPECT_GE(std::chrono::duration<double>(*partial_closed - partial.opened()).count(), 0.9);
  const auto trickling_closed = trickling_end.get();
  ASSERT_TRUE(trickling_closed) << "a connection trickling its header is still open";
  EXPECT_GE(std::chrono::duration<double>(*trickling_closed - trickling.opened()).count(), 0.9);
  const auto idle_closed = idle_end.get();
  ASSERT_TRUE(idle_closed) << "an idle keep-alive connection is still open";
  EXPECT_GE(std::chrono::duration<double>(*idle_closed - idle_since).count(), 0.9);

  const auto g = generated.get();
  EXPECT_EQ(g.status, 200) << g.error << g.body;
  EXPECT_EQ(g.header("content-type"), "image/png");
  EXPECT_EQ(get(port, "/healthz").status, 200);
}

// result_max_mb: past the byte cap the oldest job's images go first; they then answer 410, and
// the job says results_evicted with an empty images list, while newer results stay.
TEST(PromisesTest, ResultByteCapEvictsTheOldestJobsImages) {
  ServerProcess server({"--result-max-mb", "1"});  // the smallest cap allowed
  const int port = server.port();
  auto job_at = [](const std::string& prompt, int num_images, uint64_t seed) {
    json body = small_job(prompt, 1, seed);
    body["width"] = body["height"] = 128;
    body["num_images"] = num_images;
    body["guidance_scale"] = 1.0;  // one UNet pass per step: faster, same image size
    return body;
  };
  const std::string oldest = id_of(submit(port, job_at("oldest", 1, 31)));
  ASSERT_EQ(wait_final(port, oldest), "succeeded");
  const std::string first_image = "/v1/jobs/" + oldest + "/images/0";
  ASSERT_EQ(get(port, first_image).status, 200) << "kept while under the cap";

  // 128x128 PNGs of the tiny model's noise hardly compress (~42 KB each), so two 16-image jobs
  // pass 1 MiB; more are submitted if they were smaller.
  std::string newest;
  auto evicted = [&] { return job_view(port, oldest).value("results_evicted", false); };
  for (int i = 0; i < 5 && !evicted(); ++i) {
    newest = id_of(submit(port, job_at("filler", 16, 100 + 16 * i)));
    ASSERT_EQ(wait_final(port, newest), "succeeded");
  }
  const json view = job_view(port, oldest);
  EXPECT_EQ(view.value("status", ""), "succeeded");
  EXPECT_EQ(view.value("results_evicted", false), true) << view.dump();
  EXPECT_EQ(view["images"], json::array()) << view.dump();
  const auto gone = get(port, first_image);
  EXPECT_EQ(gone.status, 410) << gone.body;
  EXPECT_EQ(gone.body_json()["error"]["type"], "gone");

  // The newest results are still there, and the store keeps within the cap.
  const auto kept = get(port, "/v1/jobs/" + newest + "/images/15");
  EXPECT_EQ(kept.status, 200);
  EXPECT_EQ(kept.header("content-type"), "image/png");
  EXPECT_EQ(job_view(port, newest).value("results_evicted", true), false);
  const double stored = metric(port, "sdserve_result_store_bytes");
  EXPECT_GT(stored, 0);
  EXPECT_LE(stored, 1 << 20);
}

// SIGTERM: no new jobs; what is still running or queued when shutdown_grace_s runs out is
// cancelled (a waiting /v1/generate gets 503 shutting_down); then the process exits 0.
TEST(PromisesTest, SigtermCancelsWhatOutlastsTheGraceThenExitsZero) {
  constexpr double kGrace = 1;
  ServerProcess server({"--shutdown-grace-s", "1", "--max-batch", "1"});
  const int port = server.port();
  const std::string running = id_of(submit(port, hog_job("outlasts the grace period", 41)));
  const std::string queued = id_of(submit(port, small_job("queued behind it", 4, 42)));
  WsClient running_events, queued_events;
  ASSERT_TRUE(running_events.connect(port, "/v1/jobs/" + running + "/events"));
  ASSERT_TRUE(queued_events.connect(port, "/v1/jobs/" + queued + "/events"));
  ASSERT_TRUE(running_events.next_json(shows_running));
  auto generated = std::async(std::launch::async, [&] {
    return post(port, "/v1/generate", small_job("generate queued at SIGTERM", 4, 43));
  });
  // Counted on acceptance, so unlike the queue depth (the hog stays queued while its images
  // wait for the only slot) it cannot read right before the generate arrives.
  ASSERT_TRUE(wait_metric(port, "sdserve_jobs_submitted_total", 3)) << "the generate never queued";

  const auto signalled = Clock::now();
  server.signal(SIGTERM);
  const auto is_final = [](const json& j) { return is_final_type(j.value("type", "")); };
  const auto running_final = running_events.next_json(is_final);
  const double cancelled_after = seconds_since(signalled);
  ASSERT_TRUE(running_final);
  EXPECT_EQ((*running_final)["type"], "cancelled") << running_final->dump();
  EXPECT_FALSE(running_final->value("reason", "").empty()) << "a shutdown cancel says why";
  // The deadline is taken when the signal is handled, after we sent it: never sooner.
  EXPECT_GE(cancelled_after, kGrace - 0.1) << "cancelled before the grace period ran out";
  const auto queued_final = queued_events.next_json(is_final);
  ASSERT_TRUE(queued_final);
  EXPECT_EQ((*queued_final)["type"], "cancelled");

  const auto g = generated.get();
  EXPECT_EQ(g.status, 503) << g.error << g.body;
  if (g.status == 503) {
    EXPECT_EQ(g.body_json()["error"]["type"], "shutting_down");
  }
  const auto status = server.wait_exit();
  ASSERT_TRUE(status) << "still running";
  EXPECT_EQ(*status, 0);
}

// A second signal during the drain exits at once, with status 1, however long the grace.
TEST(PromisesTest, SecondSignalDuringTheDrainExitsAtOnce) {
  ServerProcess server({"--shutdown-grace-s", "600"});
  const int port = server.port();
  const std::string running = id_of(submit(port, hog_job("would hold the drain", 44)));
  WsClient events;
  ASSERT_TRUE(events.connect(port, "/v1/jobs/" + running + "/events"));
  ASSERT_TRUE(events.next_json(shows_running));

  server.signal(SIGTERM);
  ASSERT_TRUE(server.wait_log("shutting down"));
  // Draining: alive, refusing new work, the job still running.
  const auto refused = post(port, "/v1/jobs", small_job("during the drain"));
  EXPECT_EQ(refused.status, 503) << refused.error << refused.body;
  EXPECT_EQ(job_view(port, running).value("status", ""), "running");

  const auto signalled = Clock::now();
  server.signal(SIGINT);
  // Without the second signal the drain would last minutes (the job) or 600 s (the grace).
  const auto status = server.wait_exit(seconds(20));
  ASSERT_TRUE(status) << "still draining " << seconds_since(signalled) << " s after SIGINT";
  EXPECT_EQ(*status, 1);
  EXPECT_NE(server.log().find("second signal"), std::string::npos);
}

// `sdserve bench` runs on the CPU against a given model and writes its JSON report.
TEST(PromisesTest, BenchRunsOnTheCpuAndWritesJson) {
  TempDir dir;
  const fs::path report = dir.path() / "bench.json";
  const auto [status, output] =
      run_program({SDSERVE_BINARY, "bench", "--model", kTinyModel, "--device", "cpu", "--batches",
                   "1,2", "--steps", "2", "--width", "64", "--height", "64", "--repeats", "1",
                   "--json", report.string()},
                  {}, seconds(100));
  ASSERT_EQ(status, 0) << output;
  std::ifstream in(report);
  ASSERT_TRUE(in) << "no report written; output:\n" << output;
  const json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(j.is_discarded()) << "the report is not JSON";
  EXPECT_EQ(j.value("device", ""), "cpu");
  EXPECT_EQ(j.value("steps", 0), 2);
  EXPECT_EQ(j.value("width", 0), 64);
  EXPECT_EQ(j.value("height", 0), 64);
  ASSERT_TRUE(j.contains("batches") && j["batches"].is_array()) << j.dump(2);
  ASSERT_EQ(j["batches"].size(), 2u) << j.dump(2);
  for (size_t i = 0; i < 2; ++i) {
    const json& b = j["batches"][i];
    EXPECT_EQ(b.value("batch", 0), static_cast<int>(i) + 1);
    EXPECT_GT(b.value("images_per_s", 0.0), 0.0) << b.dump();
    EXPECT_GT(b.value("it_per_s", 0.0), 0.0) << b.dump();
  }
  EXPECT_GT(j["batch1"].value("seconds_per_image", 0.0), 0.0);
}

// Previews over the job's WebSocket: each preview event is followed by one binary frame, a PNG of
// the announced size, for both methods; "vae" and "latent2rgb" differ in their pixels.
TEST(PromisesTest, VaeAndLatentPreviewsArePngsOfTheAnnouncedSize) {
  // Subscribers must be attached before the preview jobs run, or their previews are gone: they
  // queue behind a long job (one batch slot), which is cancelled once everyone listens.
  ServerProcess server({"--max-batch", "1"});
  const int port = server.port();
  const std::string gate = id_of(submit(port, hog_job("keeps the others queued", 60)));
  ASSERT_TRUE(wait_metric(port, "sdserve_running_jobs", 1));

  struct Run {
    std::string method;
    int max_size;
    std::string id;
    WsClient events;
    // The previews' announced (step, width, height) and decoded images.
    std::vector<std::tuple<int, int, int>> announced;
    std::vector<pipeline::RgbImage> images;
  };
  // The same prompt, seed and size: one trajectory, previewed three ways. 128x128, so that
  // latent2rgb (at the 16x16 latent's resolution) and a VAE preview shrunk to the smallest
  // max_size allowed (16) compare pixel for pixel.
  std::vector<std::unique_ptr<Run>> runs;
  for (const auto& [method, max_size] :
       std::vector<std::pair<std::string, int>>{{"vae", 32}, {"latent2rgb", 16}, {"vae", 16}}) {
    auto run = std::make_unique<Run>();
    run->method = method;
    run->max_size = max_size;
    json body = small_job("previewed", 4, 61);
    body["width"] = body["height"] = 128;
    body["preview"] = {{"every", 1}, {"method", method}, {"format", "png"}, {"max_size", max_size}};
    run->id = id_of(submit(port, body));
    ASSERT_TRUE(run->events.connect(port, "/v1/jobs/" + run->id + "/events"));
    const auto state = run->events.next();  // the catch-up state: subscribed from here on
    ASSERT_TRUE(state && state->text);
    EXPECT_EQ(state->as_json().value("type", ""), "queued") << state->data;
    runs.push_back(std::move(run));
  }
  ASSERT_EQ(http(port, verb::delete_, "/v1/jobs/" + gate).status, 200);

  for (auto& run : runs) {
    SCOPED_TRACE(run->method + " max_size " + std::to_string(run->max_size));
    for (;;) {
      auto f = run->events.next();
      ASSERT_TRUE(f) << "the stream ended before the final event";
      ASSERT_TRUE(f->text) << "a binary frame that does not follow a preview event";
      const json ev = f->as_json();
      const std::string type = ev.value("type", "");
      if (is_final_type(type)) {
        EXPECT_EQ(type, "succeeded") << f->data;
        break;
      }
      if (type != "preview") continue;
      EXPECT_EQ(ev.value("format", ""), "png");
      const int width = ev.value("width", 0), height = ev.value("height", 0);
      auto bin = run->events.next();
      ASSERT_TRUE(bin) << "no frame after a preview event";
      ASSERT_FALSE(bin->text) << "the preview's bytes must come right after its event";
      const auto size = png_size(bin->data);
      ASSERT_TRUE(size) << "not a PNG";
      EXPECT_EQ(size->first, width);
      EXPECT_EQ(size->second, height);
      const auto image = pipeline::decode_png(bytes(bin->data));
      EXPECT_EQ(image.width, width);
      EXPECT_EQ(image.height, height);
      EXPECT_GT(width, 0);
      EXPECT_LE(std::max(width, height), run->max_size);
      run->announced.emplace_back(ev.value("step", -1), width, height);
      run->images.push_back(image);
    }
    EXPECT_FALSE(run->images.empty()) << "no previews";
  }
  // The VAE decodes the full 128x128 image, then shrinks it to max_size.
  for (const auto& [step, width, height] : runs[0]->announced) {
    EXPECT_EQ(width, 32);
    EXPECT_EQ(height, 32);
  }
  // Same trajectory, same step, same size: the two methods must give different pixels.
  const Run& latent = *runs[1];
  const Run& vae = *runs[2];
  ASSERT_EQ(latent.announced.size(), vae.announced.size());
  for (size_t i = 0; i < latent.images.size(); ++i) {
    EXPECT_EQ(std::get<0>(latent.announced[i]), std::get<0>(vae.announced[i]));
    const auto& a = latent.images[i];
    const auto& b = vae.images[i];
    ASSERT_EQ(a.width, b.width);
    ASSERT_EQ(a.height, b.height);
    size_t differing = 0;
    for (size_t k = 0; k < a.pixels.size(); ++k) differing += a.pixels[k] != b.pixels[k];
    EXPECT_GT(differing, a.pixels.size() / 2) << "preview " << i << ": the methods agree";
  }
}

}  // namespace
}  // namespace sdserve::itest
