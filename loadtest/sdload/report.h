// What sdload says at the end: a human summary on stdout (side by side with --compare, a table
// per target for --sweep), the JSON report, and the --check verdict.
#pragma once

#include <iosfwd>
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

}  // namespace sdload
