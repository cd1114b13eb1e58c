// Warm-up is bounded in time (issue #22): a 512 px single-file model on the CPU is ready within a
// minute, /readyz says how far the warm-up is, and SIGTERM during a slow warm-up ends the process
// within shutdown_grace_s plus the model call in progress. These tests measure wall time: CMake
// runs them alone (RUN_SERIAL in tests/integration/CMakeLists.txt), never beside other tests.
#include <signal.h>

#include <set>

#include "harness.h"

namespace sdserve::itest {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// An SD 1.x single file: without a config its native size is 512 px. Its one reference here.
std::string single_file_model() {
  return std::string(SDSERVE_BUILT_FIXTURES) + "/tiny-sd15.safetensors";
}

// The warm_up object of /readyz's first worker (null when absent).
json first_warm_up(const HttpResult& r) {
  const json body = r.body_json();
  if (!body.contains("workers") || body["workers"].empty()) return json();
  return body["workers"][0].value("warm_up", json());
}

TEST(WarmUp, SingleFile512pxModelIsReadyWithinAMinuteOnTheCpu) {
  const auto start = Clock::now();
  ServerProcess server({"--model", single_file_model()}, /*wait_ready=*/false);
  const int port = server.port();
  HttpResult r;
  std::set<std::string> phases;  // seen in 503 answers during the warm-up
  while (seconds_since(start) < 2 * kTimeout.count()) {
    r = get(port, "/readyz");
    if (r.status == 200) break;
    ASSERT_EQ(r.status, 503) << r.error << r.body;
    if (const json w = first_warm_up(r); w.is_object()) {
      phases.insert(w.value("phase", ""));
      EXPECT_TRUE(w["elapsed_s"].is_number());
      EXPECT_TRUE(w["measured"].is_array());
    } else {
      EXPECT_EQ(r.body_json().value("phase", ""), "loading_model") << r.body;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const double ready_after = seconds_since(start);
  ASSERT_EQ(r.status, 200) << "not ready after " << ready_after << " s: " << r.body;
  EXPECT_LT(ready_after, 60.0) << server.log();
  EXPECT_NE(server.log().find("native 512 px"), std::string::npos) << server.log();
  EXPECT_FALSE(phases.empty()) << "no 503 answer showed the warm-up";

  // Every batch size up to max_batch (8) has a step time at 512 px, measured or estimated.
  const json w = first_warm_up(r);
  EXPECT_EQ(w.value("phase", ""), "done") << r.body;
  EXPECT_FALSE(w["measured"].empty()) << r.body;
  std::set<int> batches;
  for (const char* kind : {"measured", "estimated"})
    for (const auto& t : w[kind]) {
      EXPECT_GT(t["step_s"].get<double>(), 0) << r.body;
      if (t["size"] == 512) batches.insert(t["batch"].get<int>());
    }
  EXPECT_EQ(batches, (std::set<int>{1, 2, 4, 8})) << r.body;
  EXPECT_NE(server.log().find("cpu ready after"), std::string::npos) << server.log();

  // Ready means it runs jobs.
  EXPECT_EQ(wait_final(port, submit(port, small_job("after the warm-up", 2))["id"]), "succeeded");
}

// A slow warm-up made of short model calls: the bundled 64 px model with a batch size for every
// number of images up to 48 and the budget to time them all (40 s of steps on two cores, none
// over ~2 s). A job is queued during it; SIGTERM gives that job shutdown_grace_s, then
// the worker stops its warm-up at its next model call and the process exits 0, instead of after
// the whole warm-up.
TEST(WarmUp, SigtermDuringASlowWarmUpExitsWithinTheGrace) {
  constexpr int kGrace = 3;
  constexpr int kMargin = 10;  // the model call in progress, and the shutdown's own steps
  std::string buckets;
  for (int b = 1; b <= 48; ++b) buckets += (b > 1 ? "," : "") + std::to_string(b);
  ServerProcess server({"--batch-buckets", buckets, "--max-batch", "48", "--warm-up-budget-s",
                        "3600", "--shutdown-grace-s", std::to_string(kGrace)},
                       /*wait_ready=*/false);
  const int port = server.port();
  // Until the warm-up has timed a few batch sizes.
  const auto start = Clock::now();
  size_t measured = 0;
  while (measured < 4 && seconds_since(start) < 2 * kTimeout.count()) {
    const auto r = get(port, "/readyz");
    ASSERT_EQ(r.status, 503) << "ready: the warm-up was not slow " << r.body;
    if (const json w = first_warm_up(r); w.is_object()) measured = w["measured"].size();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_GE(measured, 4u) << server.log();
  const auto job = submit(port, small_job("queued during the warm-up", 2));
  ASSERT_TRUE(job.contains("id"));

  const auto signalled = Clock::now();
  server.signal(SIGTERM);
  const auto status = server.wait_exit(std::chrono::seconds(kGrace + kMargin));
  const double exited_after = seconds_since(signalled);
  ASSERT_TRUE(status.has_value()) << "still running " << kGrace + kMargin << " s after SIGTERM\n"
                                  << server.log();
  EXPECT_EQ(*status, 0) << server.log();
  EXPECT_GE(exited_after, kGrace - 0.5) << "the queued job did not get its grace";
  EXPECT_NE(server.log().find("warm-up stopped by shutdown"), std::string::npos) << server.log();
  EXPECT_EQ(server.log().find(" ready after "), std::string::npos) << "the warm-up was not slow";
  std::cerr << "exited " << exited_after << " s after SIGTERM (grace " << kGrace << " s)\n";
}

}  // namespace
}  // namespace sdserve::itest
