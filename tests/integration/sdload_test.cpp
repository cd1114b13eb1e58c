// The load generator (loadtest/, binary SDLOAD_BINARY) against the real server: short runs with
// --check must pass and their JSON reports must account for every job; against a dead port it
// must end quickly and fail the check. sdload bounds itself (duration, drain timeout, deadlines).
// --from-report redraws the chart of a report (a real sweep's, or one written here) and refuses
// a broken report with exit status 2 and a message naming the field.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>

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

std::string chart_path(const std::string& name) {
  return ::testing::TempDir() + "sdload_" + name + "_" + std::to_string(getpid()) + ".png";
}

bool exists(const std::string& path) {
  return access(path.c_str(), F_OK) == 0;
}

// gnuplot where sdload's --chart looks for it: on PATH.
bool have_gnuplot() {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "/usr/bin:/bin");
  for (std::string dir; std::getline(dirs, dir, ':');)
    if (access(((dir.empty() ? "." : dir) + "/gnuplot").c_str(), X_OK) == 0) return true;
  return false;
}

bool starts_with_png_signature(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char head[8] = {};
  in.read(head, sizeof head);
  return in && std::string(head, sizeof head) == std::string("\x89PNG\r\n\x1a\n", 8);
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

// The summary's sweep table of `url` (its lines up to the next blank or non-table line): the
// same after a run and after --from-report of that run's report.
std::string sweep_table(const std::string& output, const std::string& url) {
  std::istringstream lines(output);
  std::string table;
  bool in_table = false;
  for (std::string line; std::getline(lines, line);) {
    if (!in_table && line != url) continue;
    if (in_table && (line.empty() || line.rfind("chart:", 0) == 0 || line.rfind("check:", 0) == 0 ||
                     line.rfind("sdload:", 0) == 0))
      break;
    in_table = true;
    table += line + "\n";
  }
  return table;
}

// A report of a two-rate sweep against one target, written as report.cpp writes it.
json sweep_report() {
  auto latency = [](double p50) {
    return json{{"n", 4},           {"p50", p50},       {"p90", p50 * 1.2},
                {"p99", p50 * 1.5}, {"max", p50 * 1.5}, {"mean", p50}};
  };
  auto run = [&](double rate, long succeeded, long failed, double img_per_s) {
    json r = {{"label", std::to_string(rate) + " img/s"},
              {"url", "http://127.0.0.1:1"},
              {"mode", "open"},
              {"offered_img_per_s", rate},
              {"duration_s", 2.0},
              {"submit_window_s", 2.0},
              {"elapsed_s", 2.5},
              {"drain_timed_out", false},
              {"interrupted", false}};
    r["counts"] = {{"submitted", succeeded + failed},
                   {"succeeded", succeeded},
                   {"failed", failed},
                   {"rejected", 0},
                   {"cancelled", 0},
                   {"expired", 0}};
    r["counts_add_up"] = true;
    r["images"] = {{"expected", succeeded + failed},
                   {"fetched", succeeded},
                   {"decoded", succeeded},
                   {"decode_failures", 0}};
    r["throughput"] = {{"completed_img_per_s", img_per_s},
                       {"completed_jobs_per_s", img_per_s},
                       {"submitted_jobs_per_s", rate}};
    r["latency_s"] = {{"submit", latency(0.01)},
                      {"queue_wait", latency(0.1 * rate)},
                      {"first_step", latency(0.2 * rate)},
                      {"final_event", latency(0.5 * rate)},
                      {"e2e", latency(0.6 * rate)}};
    r["errors"] = json::object();
    if (failed > 0) r["errors"]["aborted"] = {{"drain_timeout", failed}};
    r["error_examples"] = json::object();
    return r;
  };
  json runs = json::array({run(1, 4, 0, 0.9), run(2, 3, 1, 1.6)});
  runs[1]["latency_s"]["first_step"] = {{"n", 0}};  // as written when no job got that far
  json target = {{"url", "http://127.0.0.1:1"}, {"runs", runs}};
  return {{"tool", "sdload"},
          {"options", {{"url", "http://127.0.0.1:1"}, {"sweep", {1.0, 2.0}}}},
          {"workload", "fixed job"},
          {"interrupted", false},
          {"targets", json::array({target})},
          {"check", {{"passed", true}, {"problems", json::array()}}}};
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
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

TEST(SdloadTest, FromReportRefusesBrokenReportsNamingTheField) {
  if (!kSdload) GTEST_SKIP() << "SDLOAD_BINARY is not defined (sdload not built)";
  const std::string report = report_path("broken");
  const std::string chart = chart_path("broken");
  struct Case {
    std::string what;                   // the test case, for messages
    std::function<void(json&)> change;  // applied to a good report
    std::string text;                   // or the whole file ("" to use `change`)
    std::string expected;               // in sdload's message
  };
  auto run0 = [](json& j) -> json& { return j["targets"][0]["runs"][0]; };
  const std::vector<Case> cases = {
      {"not JSON", nullptr, "{\"targets\": [", "not valid JSON"},
      {"not an object", nullptr, "[1, 2]", "is an array, expected an object"},
      {"no targets", [](json& j) { j.erase("targets"); }, "", "targets is missing"},
      {"no offered rate", [&](json& j) { run0(j).erase("offered_img_per_s"); }, "",
       "targets[0].runs[0].offered_img_per_s is missing"},
      {"no e2e p99", [](json& j) { j["targets"][0]["runs"][1]["latency_s"]["e2e"].erase("p99"); },
       "", "targets[0].runs[1].latency_s.e2e.p99 is missing"},
      {"no first step n", [&](json& j) { run0(j)["latency_s"]["first_step"].erase("n"); }, "",
       "targets[0].runs[0].latency_s.first_step.n is missing"},
      {"no throughput", [&](json& j) { run0(j).erase("throughput"); }, "",
       "targets[0].runs[0].throughput is missing"},
      {"throughput a string",
       [&](json& j) { run0(j)["throughput"]["completed_img_per_s"] = "fast"; }, "",
       "targets[0].runs[0].throughput.completed_img_per_s is a string, expected a number"},
      {"negative count", [&](json& j) { run0(j)["counts"]["succeeded"] = -1; }, "",
       "targets[0].runs[0].counts.succeeded is -1, expected a count"},
      {"closed loop",
       [&](json& j) {
         run0(j)["mode"] = "closed";
         run0(j).erase("offered_img_per_s");
         run0(j)["clients"] = 4;
       },
       "", "targets[0].runs[0] is a closed-loop run"},
      {"no runs", [](json& j) { j["targets"][0]["runs"] = json::array(); }, "", "has no runs"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    json j = sweep_report();
    if (c.change) c.change(j);
    write_file(report, c.text.empty() ? j.dump(2) : c.text);
    const SdloadRun run = run_sdload({"--from-report", report, "--chart", chart});
    EXPECT_EQ(run.status, 2) << run.output;
    EXPECT_NE(run.output.find("sdload: " + report + ": "), std::string::npos) << run.output;
    EXPECT_NE(run.output.find(c.expected), std::string::npos) << run.output;
    EXPECT_FALSE(exists(chart));
  }
  std::remove(report.c_str());

  const SdloadRun missing = run_sdload({"--from-report", report, "--chart", chart});
  EXPECT_EQ(missing.status, 2) << missing.output;
  EXPECT_NE(missing.output.find(report + ": cannot read it"), std::string::npos) << missing.output;

  // Nothing to do without --chart; traffic options do not go with it.
  write_file(report, sweep_report().dump(2));
  const SdloadRun no_chart = run_sdload({"--from-report", report});
  EXPECT_EQ(no_chart.status, 2) << no_chart.output;
  EXPECT_NE(no_chart.output.find("--from-report needs --chart"), std::string::npos)
      << no_chart.output;
  const SdloadRun with_url =
      run_sdload({"--from-report", report, "--chart", chart, "--url", "http://127.0.0.1:1"});
  EXPECT_EQ(with_url.status, 2) << with_url.output;
  EXPECT_NE(with_url.output.find("--url does not go with --from-report"), std::string::npos)
      << with_url.output;
  EXPECT_FALSE(exists(chart));
  std::remove(report.c_str());
}

TEST(SdloadTest, FromReportDrawsTheChartOrSaysWhyNot) {
  if (!kSdload) GTEST_SKIP() << "SDLOAD_BINARY is not defined (sdload not built)";
  const std::string report = report_path("written");
  const std::string chart = chart_path("written");
  write_file(report, sweep_report().dump(2));
  std::remove(chart.c_str());

  // Without gnuplot (none on this PATH): the tables, no chart, said on stderr, exit status 0.
  // Through env(1): run_program adds to our environment, where PATH would come first.
  const auto [status, output] = run_program({"/usr/bin/env", "-i", "PATH=/nonexistent-sdload-test",
                                             kSdload, "--from-report", report, "--chart", chart},
                                            {}, seconds(60));
  EXPECT_EQ(status, 0) << output;
  EXPECT_NE(output.find("no chart"), std::string::npos) << output;
  EXPECT_FALSE(exists(chart));
  const std::string table = sweep_table(output, "http://127.0.0.1:1");
  EXPECT_NE(table.find("offered"), std::string::npos) << output;
  EXPECT_NE(table.find("2.00"), std::string::npos) << output;  // the second rate's row
  EXPECT_NE(table.find("aborted drain_timeout: 1"), std::string::npos) << output;

  if (have_gnuplot()) {
    const SdloadRun run = run_sdload({"--from-report", report, "--chart", chart, "--quiet"});
    EXPECT_EQ(run.status, 0) << run.output;
    EXPECT_NE(run.output.find("chart: " + chart), std::string::npos) << run.output;
    EXPECT_TRUE(starts_with_png_signature(chart)) << run.output;
  }
  std::remove(report.c_str());
  std::remove(chart.c_str());
}

TEST(SdloadTest, FromReportOfARealSweepPrintsItsTablesAndRedrawsItsChart) {
  if (!kSdload) GTEST_SKIP() << "SDLOAD_BINARY is not defined (sdload not built)";
  ServerProcess server;
  const std::string url = url_of(server.port());
  const std::string report = report_path("sweep");
  const std::string chart = chart_path("sweep");
  std::remove(chart.c_str());
  auto args = small_jobs(url, report);
  args.insert(args.end(), {"--sweep", "2,4", "--duration", "1"});
  const SdloadRun sweep = run_sdload(args);
  ASSERT_EQ(sweep.status, 0) << sweep.output;

  const SdloadRun redraw = run_sdload({"--from-report", report, "--chart", chart});
  EXPECT_EQ(redraw.status, 0) << redraw.output;
  // The same numbers as the run printed, read back from its report.
  const std::string table = sweep_table(sweep.output, url);
  EXPECT_NE(table.find("offered"), std::string::npos) << sweep.output;
  EXPECT_EQ(sweep_table(redraw.output, url), table) << redraw.output;
  if (have_gnuplot()) {
    EXPECT_NE(redraw.output.find("chart: " + chart), std::string::npos) << redraw.output;
    EXPECT_TRUE(starts_with_png_signature(chart)) << redraw.output;
  } else {
    EXPECT_NE(redraw.output.find("no chart"), std::string::npos) << redraw.output;
    EXPECT_FALSE(exists(chart));
  }
  std::remove(report.c_str());
  std::remove(chart.c_str());
}

}  // namespace
}  // namespace sdserve::itest
