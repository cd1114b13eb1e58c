// What sdload says at the end: a human summary on stdout (side by side with --compare, a table
// per target for --sweep), the JSON report, and the --check verdict; and a report read back
// (--from-report).
#pragma once

#include <iosfwd>
#include <stdexcept>
#include <string>
#include <vector>

#include "sdload/options.h"
#include "sdload/stats.h"

namespace sdload {

struct TargetResult {
  std::string url;
  std::vector<RunSummary> runs;  // in the order they ran
};

struct CheckResult {
  bool passed = true;
  std::vector<std::string> problems;
};

// Every run: counts add up, at least one job succeeded, every fetched image decoded.
CheckResult check_results(const std::vector<TargetResult>& targets);

void print_summary(std::ostream& out, const Options& options, const std::string& workload,
                   const std::vector<TargetResult>& targets);

// Writes the JSON report; false (and why on stderr) when the file cannot be written.
bool write_report(const std::string& path, const Options& options, const std::string& workload,
                  const std::vector<TargetResult>& targets, const CheckResult& check,
                  bool interrupted);

// A report that cannot be read back; the message names the file and the field at fault.
struct ReportError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ReadReport {
  std::string workload;               // "" when the report does not say
  std::vector<TargetResult> targets;  // each with at least one run
};

// Reads back a report of open-loop runs (a --sweep's, or a --rate's) as far as the chart and the
// sweep tables need it: per target its `url`; per run `offered_img_per_s`, `counts`,
// `throughput.completed_img_per_s`, `latency_s.e2e` and `latency_s.first_step` (`n`, and `p50`
// and `p99` when n > 0) and `errors` (when there). Everything else stays at its default.
// Throws ReportError.
ReadReport read_report(const std::string& path);

// The tables of a --sweep's summary (one per target), e.g. of a report read back.
void print_sweep_tables(std::ostream& out, const std::vector<TargetResult>& targets);

}  // namespace sdload
