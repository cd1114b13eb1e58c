// sdload: a load generator for sdserve. See loadtest/README.md, or `sdload --help`.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>

#include "sdload/chart.h"
#include "sdload/net.h"
#include "sdload/options.h"
#include "sdload/report.h"
#include "sdload/runner.h"
#include "sdload/workload.h"

namespace sdload {
namespace {

constexpr int kExitCheckFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitInterrupted = 130;

std::string rate_label(double rate) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g img/s", rate);
  return buf;
}

// Every job in flight holds a WebSocket and at times a second connection: an overloaded server
// can mean thousands of them, more than the usual soft limit of 1024 descriptors.
void raise_fd_limit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur >= limit.rlim_max) return;
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
}

std::vector<RunSpec> run_specs(const Options& o) {
  std::vector<RunSpec> specs;
  if (o.mode == Mode::kClosed) {
    RunSpec s;
    s.label = std::to_string(o.clients) + (o.clients == 1 ? " client" : " clients");
    s.open_loop = false;
    s.clients = o.clients;
    specs.push_back(s);
    return specs;
  }
  const std::vector<double> rates = o.mode == Mode::kSweep ? o.sweep : std::vector<double>{o.rate};
  for (double rate : rates) {
    RunSpec s;
    s.label = rate_label(rate);
    s.rate = rate;
    specs.push_back(s);
  }
  return specs;
}

// Waits for GET /readyz to answer 200. A server that does not become ready is still loaded (its
// refusals are what the report then shows), but the user is told first.
void wait_ready(const Server& server, const Options& o) {
  if (o.ready_timeout_s <= 0) return;
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<long>(o.ready_timeout_s * 1000));
  int status = 0;
  while (interrupt_count() == 0) {
    status = blocking_get_status(server, "/readyz");
    if (status == 200) return;
    if (std::chrono::steady_clock::now() > deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  if (interrupt_count() > 0) return;
  std::cerr << "sdload: " << server.url << " is not ready after " << o.ready_timeout_s
            << " s (GET /readyz: " << (status ? "HTTP " + std::to_string(status) : "no answer")
            << "); running anyway\n";
}

TargetResult run_target(const Options& o, const Server& server, const Workload& workload) {
  TargetResult target{server.url, {}};
  wait_ready(server, o);
  for (const RunSpec& spec : run_specs(o)) {
    if (interrupt_count() > 0) break;
    // A fresh copy of the workload per run: every run (and every target) gets the same jobs.
    target.runs.push_back(summarize(run_once(o, server, spec, workload)));
  }
  return target;
}

// --from-report: the sweep tables and the chart of a report written earlier (say on a machine
// without gnuplot); no traffic. As after a run, a chart that cannot be drawn is said on stderr
// and does not change the exit status.
int redraw(const Options& o) {
  ReadReport report;
  try {
    report = read_report(o.from_report);
  } catch (const std::exception& e) {
    std::cerr << "sdload: " << e.what() << "\n";
    return kExitUsage;
  }
  std::cout << "sdload: report " << o.from_report
            << (report.workload.empty() ? "" : ", " + report.workload) << "\n";
  print_sweep_tables(std::cout, report.targets);
  std::cout.flush();
  if (draw_chart(o.chart_file, report.targets)) std::cout << "chart: " << o.chart_file << "\n";
  return 0;
}

int run(int argc, char** argv) {
  Options o;
  std::vector<Server> servers;
  std::unique_ptr<Workload> workload;
  try {
    if (!parse_options(argc, argv, o)) return 0;
    if (!o.from_report.empty()) return redraw(o);
    const Millis timeout(static_cast<long>(o.request_timeout_s * 1000));
    servers.push_back(make_server(o.url, o.api_key, timeout));
    if (!o.compare_url.empty()) servers.push_back(make_server(o.compare_url, o.api_key, timeout));
    workload = std::make_unique<Workload>(o);
    // Found out now rather than after a long run: the report's file must be writable.
    if (!o.report_file.empty() && !std::ofstream(o.report_file, std::ios::app))
      throw std::runtime_error("cannot write the report to '" + o.report_file + "'");
  } catch (const std::exception& e) {
    std::cerr << "sdload: " << e.what() << "\n";
    return kExitUsage;
  }
  install_signal_handlers();
  raise_fd_limit();
  std::vector<TargetResult> targets;
  for (const Server& server : servers) {
    if (interrupt_count() > 0) break;
    targets.push_back(run_target(o, server, *workload));
  }
  const bool interrupted = interrupt_count() > 0;
  const CheckResult check = check_results(targets);
  print_summary(std::cout, o, workload->describe(), targets);
  std::cout.flush();
  int status = 0;
  if (!o.report_file.empty() &&
      !write_report(o.report_file, o, workload->describe(), targets, check, interrupted))
    status = kExitUsage;
  if (!o.chart_file.empty() && !targets.empty() && draw_chart(o.chart_file, targets))
    std::cout << "chart: " << o.chart_file << "\n";
  if (o.check) {
    std::cout << (check.passed ? "check: passed\n" : "check: FAILED\n");
    for (const auto& p : check.problems) std::cout << "  " << p << "\n";
    if (!check.passed && status == 0) status = kExitCheckFailed;
  }
  if (interrupted && status == 0) status = kExitInterrupted;
  return status;
}

}  // namespace
}  // namespace sdload

int main(int argc, char** argv) {
  return sdload::run(argc, argv);
}
