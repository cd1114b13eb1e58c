// What sdload sends: a deterministic sequence of job requests (built-in mix, one fixed job, or
// lines of a JSONL file) and Poisson arrival times, both from the seed, so that two runs with one
// seed (a --compare, or rates of a --sweep) send the same jobs in the same order.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "sdload/options.h"

namespace sdload {

struct JobSpec {
  nlohmann::json body;  // the POST /v1/jobs body
  int width = 512;      // what the images must measure (the server's defaults when not given)
  int height = 512;
  int images = 1;
};

class Workload {
 public:
  // Reads --prompts when given. Throws UsageError for an unreadable or malformed file.
  explicit Workload(const Options& options);

  // The next job of the sequence.
  JobSpec next();
  // Mean images per job, to turn an offered image rate into a job arrival rate.
  double mean_images() const;
  // One line for the summary ("built-in mix", "fixed job", "12 prompts from FILE").
  std::string describe() const;

 private:
  nlohmann::json builtin_job();
  nlohmann::json fixed_job() const;
  void apply_overrides(nlohmann::json& body);

  Options options_;
  std::vector<nlohmann::json> lines_;  // from --prompts
  std::mt19937_64 rng_;
  uint64_t count_ = 0;
};

// Poisson arrivals: exponential gaps with mean 1/rate, from their own seeded generator.
class Arrivals {
 public:
  Arrivals(double jobs_per_s, uint64_t seed);
  double next_gap_s() { return gap_(rng_); }

 private:
  std::mt19937_64 rng_;
  std::exponential_distribution<double> gap_;
};

}  // namespace sdload
