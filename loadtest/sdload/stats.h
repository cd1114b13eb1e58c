// From a run's job records to its numbers: counts, percentiles, throughput, errors by type.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "sdload/record.h"

namespace sdload {

struct Percentiles {
  size_t n = 0;  // samples; the rest are meaningless (NaN) when 0
  double p50 = 0, p90 = 0, p99 = 0, max = 0, mean = 0;
};

// Nearest-rank percentiles (each value is one that was measured).
Percentiles percentiles(std::vector<double> values);

struct RunSummary {
  RunSpec spec;
  std::string url;
  double duration_s = 0, submit_window_s = 0, elapsed_s = 0;
  bool drain_timed_out = false;
  bool interrupted = false;

  long submitted = 0, succeeded = 0, failed = 0, rejected = 0, cancelled = 0, expired = 0;
  long records = 0;  // one per job; equals `submitted` unless sdload lost track of one
  long images_expected = 0, images_fetched = 0, images_decoded = 0, decode_failures = 0;

  double completed_img_per_s = 0;   // images of succeeded jobs / elapsed
  double completed_jobs_per_s = 0;  // succeeded jobs / elapsed
  double submitted_per_s = 0;       // jobs / submission window

  // Latencies of succeeded jobs, except submit: every POST that was answered.
  Percentiles submit, queue_wait, first_step, final_event, e2e;

  // class ("connection", "http_status", "server", "protocol", "image", "aborted") -> key -> n
  std::map<std::string, std::map<std::string, long>> errors;
  std::map<std::string, std::string> error_examples;  // "class/key" -> a message, first seen

  // submitted = succeeded + failed + rejected + cancelled + expired, one record per job.
  bool counts_add_up() const;
  long error_total() const;
};

RunSummary summarize(const RunResult& run);
nlohmann::ordered_json to_json(const RunSummary& s);

}  // namespace sdload
