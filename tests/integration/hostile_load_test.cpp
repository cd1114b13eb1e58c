// Issue #23: "a client sending normal jobs meanwhile keeps its p99 within 2x of a quiet run".
// One client submits small jobs one after another, alternately alone and beside paced hostile
// traffic (the attacks of hostile_test.cpp and browser_guard_test.cpp, on threads of their own),
// and its latencies of both kinds are compared. docs/SECURITY.md has the measured numbers.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "harness.h"

namespace sdserve::itest {
namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Nearest rank: below 100 samples the p99 is the largest.
double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(v.size())));
  return v[std::max<size_t>(rank, 1) - 1];
}

// CPU time (user + system) the process has used, in seconds.
double cpu_seconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::istringstream fields(stat.substr(stat.rfind(')') + 2));  // after "pid (comm) "
  std::string skip;
  for (int i = 3; i < 14; ++i) fields >> skip;  // state .. cmajflt
  double utime = 0, stime = 0;
  fields >> utime >> stime;
  return (utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// One normal job, from its POST to its final event over the job's WebSocket, in ms.
double job_ms(int port, int n) {
  const auto t0 = Clock::now();
  const json job = submit(port, small_job("a lighthouse, job " + std::to_string(n), 1, n));
  EXPECT_EQ(wait_final(port, job.is_object() ? job.value("id", "") : ""), "succeeded");
  return ms_between(t0, Clock::now());
}

std::string many_keys(size_t n) {
  std::string s = "{";
  for (size_t i = 0; i < n; ++i) s += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":0";
  return s + "}";
}

// A request the service must refuse, and the status that says so.
struct Attack {
  std::string name;
  std::function<int(int port)> send;  // returns the status (0: no answer)
  int status;
};

std::vector<Attack> body_attacks() {
  // 200 KB nested 100,000 deep (it once killed the process on A1111's routes) and 1 MB of
  // 95,000 keys (it once took 19.6 s there).
  static const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  static const std::string wide = many_keys(95000);
  std::vector<Attack> out;
  for (const auto& route : kBodyRoutes) {
    out.push_back({"deep " + route,
                   [route](int port) { return http(port, verb::post, route, deep).status; }, 400});
    out.push_back({"wide " + route,
                   [route](int port) { return http(port, verb::post, route, wide).status; }, 400});
  }
  return out;
}

std::vector<Attack> small_attacks() {
  const std::string evil = "https://evil.example";
  const auto text_post = [evil](const std::string& route, const json& body) {
    return [route, body, evil](int port) {
      return http(port, verb::post, route, body.dump(),
                  {{"Origin", evil}, {"Content-Type", "text/plain;charset=UTF-8"}})
          .status;
    };
  };
  const auto raw = [](const std::string& request) {
    return [request](int port) {
      const std::string got = raw_request(port, request);
      return got.rfind("HTTP/1.1 ", 0) == 0 ? std::stoi(got.substr(9, 3)) : 0;
    };
  };
  const auto json_post = [](const std::string& route, const std::string& body) {
    return [route, body](int port) { return http(port, verb::post, route, body).status; };
  };
  return {
      // DNS rebinding: a page whose name now resolves to 127.0.0.1.
      {"foreign Host GET",
       [](int port) {
         return get(port, "/v1/samplers", {{"Host", "evil.example"}}).status;
       },
       403},
      {"foreign Host POST",
       [](int port) {
         return post(port, "/v1/jobs", small_job("stolen"), {{"Host", "evil.example"}}).status;
       },
       403},
      // Cross-site text/plain POSTs (no CORS preflight).
      {"cross-site /v1/jobs", text_post("/v1/jobs", small_job("stolen")), 403},
      {"cross-site txt2img", text_post("/sdapi/v1/txt2img", small_job("stolen")), 403},
      {"cross-site interrupt", text_post("/sdapi/v1/interrupt", json::object()), 403},
      {"invalid UTF-8 path",
       raw("GET /\xc3(abc\xff HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"), 404},
      {"1e400 txt2img", json_post("/sdapi/v1/txt2img", R"({"prompt": "x", "steps": 1e400})"), 400},
      {"1e400 /v1/jobs", json_post("/v1/jobs", R"({"prompt": "x", "guidance_scale": -1e400})"),
       400},
  };
}

// How much hostile traffic, each kind on a thread of its own paced to its rate (a request that
// comes late is not made up for: no bursts).
struct Rates {
  double bodies_per_s;      // deep and wide in turn on every body route
  double small_per_s;       // foreign Host, cross-site POSTs, an invalid UTF-8 path, 1e400
  size_t slow_connections;  // slowloris: a byte of a never-ending header every 100 ms each
};

class HostileTraffic {
 public:
  HostileTraffic(int port, Rates rates) : port_(port) {
    const auto period = [](double per_s) {
      return std::chrono::duration_cast<Ms>(std::chrono::duration<double>(1 / per_s));
    };
    threads_.emplace_back([this, p = period(rates.bodies_per_s)] { paced(body_attacks(), p); });
    threads_.emplace_back([this, p = period(rates.small_per_s)] { paced(small_attacks(), p); });
    threads_.emplace_back([this, n = rates.slow_connections] { slowloris(n, Ms(100)); });
  }
  ~HostileTraffic() {
    stop_ = true;
    for (auto& t : threads_) t.join();
  }

  void start() { active_ = true; }
  // Returns once no hostile request is in flight and every slow connection is closed.
  void pause() {
    active_ = false;
    while (working_ > 0) std::this_thread::sleep_for(Ms(2));
  }

  int sent() const { return sent_; }
  int slow_connections() const { return slow_opened_; }
  // "name: got N (want M)" for each answer that was not the expected refusal.
  std::vector<std::string> wrong_answers() const {
    std::lock_guard lock(mutex_);
    return wrong_;
  }
  std::map<std::string, int> sent_by_attack() const {
    std::lock_guard lock(mutex_);
    return by_attack_;
  }

 private:
  // Runs `step` over and over while started and `idle` once at each pause. A thread counts in
  // working_ from before it checks active_ until it is idle again, so pause() cannot miss one.
  void run(const std::function<void()>& step, const std::function<void()>& idle) {
    bool working = false;
    while (!stop_) {
      if (!working) {
        if (!active_) {
          std::this_thread::sleep_for(Ms(2));
          continue;
        }
        ++working_;
        working = true;
      }
      if (!active_) {
        idle();
        working = false;
        --working_;
        continue;
      }
      step();
    }
    if (working) {
      idle();
      --working_;
    }
  }

  void paced(const std::vector<Attack>& attacks, Ms period) {
    size_t turn = 0;
    std::optional<Clock::time_point> next;
    run(
        [&] {
          const Attack& a = attacks[turn++ % attacks.size()];
          const int status = a.send(port_);
          ++sent_;
          {
            std::lock_guard lock(mutex_);
            ++by_attack_[a.name];
            if (status != a.status && wrong_.size() < 20)
              wrong_.push_back(a.name + ": got " + std::to_string(status) + " (want " +
                               std::to_string(a.status) + ")");
          }
          next = std::max(next.value_or(Clock::now()) + period, Clock::now());
          std::this_thread::sleep_until(*next);
        },
        [&] { next.reset(); });
  }

  void slowloris(size_t connections, Ms period) {
    const std::string head =
        "POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\nX-Slow: ";
    std::vector<int> fds;
    run(
        [&] {
          while (fds.size() < connections) {
            const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            sockaddr_in addr{};
            addr.sin_family = AF_INET;
            addr.sin_port = htons(static_cast<uint16_t>(port_));
            addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
                send(fd, head.data(), head.size(), MSG_NOSIGNAL) < 0) {
              close(fd);
              break;
            }
            fds.push_back(fd);
            ++slow_opened_;
          }
          // One more byte each; a connection the server has closed is replaced next time.
          for (auto it = fds.begin(); it != fds.end();) {
            if (send(*it, "z", 1, MSG_NOSIGNAL | MSG_DONTWAIT) == 1) {
              ++it;
            } else {
              close(*it);
              it = fds.erase(it);
            }
          }
          std::this_thread::sleep_for(period);
        },
        [&] {
          for (int fd : fds) close(fd);
          fds.clear();
        });
  }

  const int port_;
  std::atomic<bool> stop_{false}, active_{false};
  std::atomic<int> working_{0}, sent_{0}, slow_opened_{0};
  mutable std::mutex mutex_;
  std::vector<std::string> wrong_;        // guarded by mutex_
  std::map<std::string, int> by_attack_;  // guarded by mutex_
  std::vector<std::thread> threads_;
};

// Quiet and hostile blocks alternate, short, so that other load on the machine (a shared CI
// runner's other jobs), which comes and goes, weighs on both alike.
TEST(HostileLoad, NormalClientKeepsItsP99WithinTwiceQuietBesideHostileTraffic) {
  // 200 jobs of each kind: the p99 (nearest rank) is the third slowest, so that a job or two
  // slowed by something else on the machine does not decide it. On a machine so busy that jobs
  // are ten times slower (25 s otherwise), rounds stop after 90 s, with at least 100 of each.
  constexpr int kRounds = 40, kMinRounds = 20, kJobsPerBlock = 5;
  constexpr std::chrono::seconds kBudget{90};
  // Attack traffic the service must shrug off: 8 bodies/s is about 5 MB/s of hostile JSON, and
  // all of it costs the service under a tenth of one core (printed below). An unpaced flood of any
  // request, valid ones included, takes both cores of a 2-core machine from the jobs: no design
  // survives that, and a rate-limiting proxy is what stops it (docs/SECURITY.md, Internet).
  const Rates rates{8, 20, 16};
  // Scheduling noise, not the service: on a busy 2-core machine a thread that becomes runnable
  // may wait a scheduler period (tens of ms) for a core, and one job hands over between seven
  // threads (HTTP, worker, text, decoder, encoder, dispatcher, WebSocket) of the service and two
  // of this client, so one unlucky job gains tens of ms with or without attackers.
  constexpr double kSlackMs = 50;
  ServerProcess server;
  const int port = server.port();
  for (int i = 0; i < 3; ++i) job_ms(port, 1000 + i);  // first-use costs (allocations, caches)

  HostileTraffic hostile(port, rates);
  // What the attacks cost the service, alone: its CPU time over a second without them, and over
  // a second of them without jobs (libtorch's threads spin a while after a job: waited out).
  std::this_thread::sleep_for(Ms(500));
  const auto cpu_share = [&](const std::function<void()>& during) {
    const double cpu0 = cpu_seconds(server.pid());
    const auto t0 = Clock::now();
    during();
    return (cpu_seconds(server.pid()) - cpu0) / (ms_between(t0, Clock::now()) / 1000);
  };
  const double idle_cpu = cpu_share([] { std::this_thread::sleep_for(Ms(1000)); });
  const double attacked_cpu = cpu_share([&] {
    hostile.start();
    std::this_thread::sleep_for(Ms(1000));
    hostile.pause();
  });
  const int sent_alone = hostile.sent();

  std::vector<double> quiet, loud;
  int n = 0;
  const auto start = Clock::now();
  for (int round = 0; round < kRounds; ++round) {
    if (round >= kMinRounds && Clock::now() - start > kBudget) break;
    for (int i = 0; i < kJobsPerBlock; ++i) quiet.push_back(job_ms(port, n++));
    hostile.start();
    std::this_thread::sleep_for(Ms(100));  // slow connections open, first requests in flight
    for (int i = 0; i < kJobsPerBlock; ++i) loud.push_back(job_ms(port, n++));
    hostile.pause();
  }

  const double quiet_p99 = percentile(quiet, 0.99), loud_p99 = percentile(loud, 0.99);
  std::printf(
      "normal jobs, ms (%zu of each kind): quiet p50 %.1f p99 %.1f; beside hostile traffic"
      " p50 %.1f p99 %.1f (%.2fx)\n",
      quiet.size(), percentile(quiet, 0.5), quiet_p99, percentile(loud, 0.5), loud_p99,
      loud_p99 / quiet_p99);
  std::printf(
      "hostile traffic: %d requests, %d slow connections; alone it cost the service %.0f%%"
      " of a core (%d requests in 1 s; idle %.0f%%)\n",
      hostile.sent(), hostile.slow_connections(), 100 * attacked_cpu, sent_alone, 100 * idle_cpu);
  for (const auto& [name, count] : hostile.sent_by_attack())
    std::printf("  %-28s %d\n", name.c_str(), count);
  EXPECT_LE(loud_p99, 2 * quiet_p99 + kSlackMs);
  // The attacks ran, and each got its refusal.
  EXPECT_GE(hostile.sent(), 100);
  EXPECT_GE(hostile.slow_connections(), 16);
  const auto wrong = hostile.wrong_answers();
  EXPECT_TRUE(wrong.empty()) << wrong.front();
  EXPECT_EQ(get(port, "/healthz").status, 200);
}

}  // namespace
}  // namespace sdserve::itest
