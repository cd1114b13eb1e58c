// The load generator (loadtest/, binary SDLOAD_BINARY) against the real server: short runs with
// --check must pass and their JSON reports must account for every job; against a dead port it
// must end quickly and fail the check. sdload bounds itself (duration, drain timeout, deadlines).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>

#include <gtest/gtest.h>

#include "tests/integration/harness.h"

namespace sdserve::itest {
namespace {

// Defined by tests/integration/CMakeLists.txt as sdload's path; until then the tests skip.
#ifdef SDLOAD_BINARY
constexpr const char* kSdload = SDLOAD_BINARY;
#else
constexpr const char* kSdload = nullptr;
#endif

struct SdloadRun {
  int status = -1;     // exit status
  std::string output;  // stdout and stderr
};

// sdload bounds itself (duration, drain timeout, deadlines); the kill is a backstop.
SdloadRun run_sdload(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {kSdload};
  argv.insert(argv.end(), args.begin(), args.end());
  const auto [status, output] = run_program(argv, {}, seconds(180));
  return {status, output};
}

std::string url_of(int port) {
  return "http://127.0.0.1:" + std::to_string(port);
}

std::string report_path(const std::string& name) {
  return ::testing::TempDir() + "sdload_" + name + "_" + std::to_string(getpid()) + ".json";
}

json read_report(const std::string& path) {
  std::ifstream in(path);
  if (!in) return json();
  return json::parse(in, nullptr, false);
}

// The tiny model on the CPU: small, few-step jobs keep each run to a few seconds.
std::vector<std::string> small_jobs(const std::string& url, const std::string& report) {
  return {"--url",     url,    "--width",    "64",      "--height",        "64",
          "--steps",   "2..3", "--duration", "2",       "--drain-timeout", "30",
          "--timeout", "10",   "--check",    "--quiet", "--report",        report};
}

// The first run of the first target; null when the report does not have one. Reads below use
// at(), so a report missing a field fails the test (an exception) instead of reading garbage.
json first_run(const json& report) {
  if (!report.is_object() || !report.contains("targets") || !report["targets"].is_array() ||
      report["targets"].empty())
    return json();
  const json& target = report["targets"][0];
  if (!target.contains("runs") || !target["runs"].is_array() || target["runs"].empty())
    return json();
  return target["runs"][0];
}

long count(const json& run, const char* name) {
  return run.at("counts").at(name).get<long>();
}

void expect_counts_add_up(const json& run) {
  EXPECT_EQ(count(run, "submitted"), count(run, "succeeded") + count(run, "failed") +
                                         count(run, "rejected") + count(run, "cancelled") +
                                         count(run, "expired"))
      << run.at("counts").dump();
  EXPECT_TRUE(run.at("counts_add_up").get<bool>());
}

TEST(SdloadTest, OpenLoopRunPassesCheckAndItsReportAddsUp) {
  if (!kSdload) GTEST_SKIP() << "SDLOAD_BINARY is not defined (sdload not built)";
  ServerProcess server;
  const std::string report = report_path("open");
  auto args = small_jobs(url_of(server.port()), report);
  args.insert(args.end(), {"--rate", "3"});
  const SdloadRun run = run_sdload(args);
  ASSERT_EQ(run.status, 0) << run.output;

  const json j = read_report(report);
  const json r = first_run(j);
  ASSERT_TRUE(r.is_object()) << j.dump(2);
  expect_counts_add_up(r);
  EXPECT_GT(count(r, "succeeded"), 0);
  EXPECT_EQ(count(r, "failed"), 0) << r.at("errors").dump();
  EXPECT_EQ(r.at("images").at("decoded"), r.at("images").at("fetched"));
  EXPECT_GT(r.at("latency_s").at("e2e").at("n").get<long>(), 0);
  EXPECT_TRUE(j.at("check").at("passed").get<bool>());
  std::remove(report.c_str());
}

TEST(SdloadTest, ClosedLoopCountsQueueFullAsRejectionsNotFailures) {
  if (!kSdload) GTEST_SKIP() << "SDLOAD_BINARY is not defined (sdload not built)";
  // One queue slot and more clients than the server batches: some submissions get 429.
  ServerProcess server({"--max-queue", "1", "--max-batch", "2"});
  const std::string report = report_path("closed");
  auto args = small_jobs(url_of(server.port()), report);
  args.insert(args.end(), {"--clients", "6"});
  const SdloadRun run = run_sdload(args);
  ASSERT_EQ(run.status, 0) << run.output;

  const json r = first_run(read_report(report));
  ASSERT_TRUE(r.is_object());
  expect_counts_add_up(r);
  EXPECT_GT(count(r, "succeeded"), 0);
  EXPECT_GT(count(r, "rejected"), 0);
  EXPECT_EQ(count(r, "failed"), 0) << r.at("errors").dump();
  std::remove(report.c_str());
}

TEST(SdloadTest, DeadServerEndsPromptlyAndFailsTheCheck) {
  if (!kSdload) GTEST_SKIP() << "SDLOAD_BINARY is not defined (sdload not built)";
  // A bound but not listening socket: its port refuses connections for as long as we hold it.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string report = report_path("dead");
  const auto start = std::chrono::steady_clock::now();
  const SdloadRun run = run_sdload({"--url", url_of(ntohs(addr.sin_port)), "--rate", "4",
                                    "--duration", "1", "--ready-timeout", "0", "--timeout", "5",
                                    "--check", "--quiet", "--report", report});
  close(fd);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(15));
  EXPECT_EQ(run.status, 1) << run.output;

  const json j = read_report(report);
  const json r = first_run(j);
  ASSERT_TRUE(r.is_object());
  expect_counts_add_up(r);
  EXPECT_EQ(count(r, "succeeded"), 0);
  EXPECT_EQ(count(r, "failed"), count(r, "submitted"));
  EXPECT_FALSE(j.at("check").at("passed").get<bool>());
  std::remove(report.c_str());
}

}  // namespace
}  // namespace sdserve::itest
