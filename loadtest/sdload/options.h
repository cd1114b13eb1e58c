// sdload's command line: what to send, how fast, for how long, against which servers.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace sdload {

// A bad command line; main prints the message and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Mode { kOpen, kClosed, kSweep };

struct Options {
  std::string url = "http://127.0.0.1:8080";
  std::string compare_url;  // "" when not comparing

  Mode mode = Mode::kOpen;
  double rate = 0;            // --rate: offered images per second (open loop)
  int clients = 0;            // --clients: concurrent clients (closed loop)
  std::vector<double> sweep;  // --sweep: open-loop rates, run in order
  double duration_s = 10;
  long max_jobs = 0;  // per run; 0: no limit
  double drain_timeout_s = 60;
  double request_timeout_s = 30;  // every connect / request / WebSocket handshake and idle
  double ready_timeout_s = 30;    // waiting for /readyz before a target's first run; 0: skip

  std::string prompts_file;          // JSONL of request fields; "" for the built-in mix
  std::string mix = "builtin";       // builtin (varied prompts, samplers, sizes) or fixed
  int width = 0, height = 0;         // 0: from the mix / prompts file
  int steps_min = 0, steps_max = 0;  // --steps N or A..B; 0: from the mix / prompts file
  std::string sampler, scheduler;    // "": from the mix / prompts file
  uint64_t seed = 1;                 // arrivals and prompt choices; same seed, same traffic

  bool decode = false;
  bool check = false;
  bool quiet = false;
  std::string api_key;
  std::string report_file;
  std::string chart_file;
  // --from-report: no traffic; the --chart (and the summary tables) of this earlier report.
  std::string from_report;
};

// Parses argv. Throws UsageError. Returns false for --help (usage printed already).
bool parse_options(int argc, char** argv, Options& out);
std::string usage();
// The options as they go into the JSON report (the API key is never written out).
nlohmann::ordered_json options_json(const Options& o);

}  // namespace sdload
