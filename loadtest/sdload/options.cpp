#include "sdload/options.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <set>

namespace sdload {
namespace {

std::string shortest(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

double to_number(const std::string& flag, const std::string& text, double min, double max) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno != 0 || !std::isfinite(v) || v < min || v > max)
    throw UsageError(flag + ": expected a number in [" + shortest(min) + ", " + shortest(max) +
                     "], got '" + text + "'");
  return v;
}

long to_integer(const std::string& flag, const std::string& text, long min, long max) {
  const double v = to_number(flag, text, static_cast<double>(min), static_cast<double>(max));
  if (v != std::floor(v)) throw UsageError(flag + ": expected an integer, got '" + text + "'");
  return static_cast<long>(v);
}

std::vector<double> to_rates(const std::string& text) {
  std::vector<double> rates;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    rates.push_back(to_number("--sweep", text.substr(start, end - start), 1e-6, 1e6));
    start = end + 1;
  }
  return rates;
}

// "30" or "2..4": a fixed step count, or one drawn per job from the range.
void to_steps(const std::string& text, Options& o) {
  const size_t dots = text.find("..");
  if (dots == std::string::npos) {
    o.steps_min = o.steps_max = static_cast<int>(to_integer("--steps", text, 1, 150));
    return;
  }
  o.steps_min = static_cast<int>(to_integer("--steps", text.substr(0, dots), 1, 150));
  o.steps_max = static_cast<int>(to_integer("--steps", text.substr(dots + 2), 1, 150));
  if (o.steps_min > o.steps_max) throw UsageError("--steps: A..B needs A <= B");
}

int to_size(const std::string& flag, const std::string& text) {
  const long v = to_integer(flag, text, 64, 2048);
  if (v % 8 != 0) throw UsageError(flag + ": must be a multiple of 8 (64..2048)");
  return static_cast<int>(v);
}

using Setter = std::function<void(Options&, const std::string&)>;

// Flags that take a value.
const std::map<std::string, Setter>& value_flags() {
  static const std::map<std::string, Setter> flags = {
      {"--url", [](Options& o, const std::string& v) { o.url = v; }},
      {"--compare", [](Options& o, const std::string& v) { o.compare_url = v; }},
      {"--rate",
       [](Options& o, const std::string& v) { o.rate = to_number("--rate", v, 1e-6, 1e6); }},
      {"--clients",
       [](Options& o, const std::string& v) {
         o.clients = static_cast<int>(to_integer("--clients", v, 1, 100000));
       }},
      {"--sweep", [](Options& o, const std::string& v) { o.sweep = to_rates(v); }},
      {"--duration",
       [](Options& o, const std::string& v) { o.duration_s = to_number("--duration", v, 0, 1e7); }},
      {"--max-jobs",
       [](Options& o, const std::string& v) {
         o.max_jobs = to_integer("--max-jobs", v, 0, 1000000000000L);
       }},
      {"--drain-timeout",
       [](Options& o, const std::string& v) {
         o.drain_timeout_s = to_number("--drain-timeout", v, 0, 1e7);
       }},
      {"--timeout",
       [](Options& o, const std::string& v) {
         o.request_timeout_s = to_number("--timeout", v, 0.1, 3600);
       }},
      {"--ready-timeout",
       [](Options& o, const std::string& v) {
         o.ready_timeout_s = to_number("--ready-timeout", v, 0, 1e6);
       }},
      {"--prompts", [](Options& o, const std::string& v) { o.prompts_file = v; }},
      {"--mix",
       [](Options& o, const std::string& v) {
         if (v != "builtin" && v != "fixed") throw UsageError("--mix: builtin or fixed");
         o.mix = v;
       }},
      {"--width", [](Options& o, const std::string& v) { o.width = to_size("--width", v); }},
      {"--height", [](Options& o, const std::string& v) { o.height = to_size("--height", v); }},
      {"--steps", [](Options& o, const std::string& v) { to_steps(v, o); }},
      {"--sampler", [](Options& o, const std::string& v) { o.sampler = v; }},
      {"--scheduler", [](Options& o, const std::string& v) { o.scheduler = v; }},
      {"--seed",
       [](Options& o, const std::string& v) {
         o.seed = static_cast<uint64_t>(to_integer("--seed", v, 0, 1000000000000000L));
       }},
      {"--api-key", [](Options& o, const std::string& v) { o.api_key = v; }},
      {"--report", [](Options& o, const std::string& v) { o.report_file = v; }},
      {"--chart", [](Options& o, const std::string& v) { o.chart_file = v; }},
      {"--from-report", [](Options& o, const std::string& v) { o.from_report = v; }},
  };
  return flags;
}

// --from-report sends nothing: every flag about traffic, servers or a run's output is refused
// rather than silently ignored (--quiet is harmless, there being no progress line anyway).
void validate_from_report(const Options& o, const std::set<std::string>& given) {
  if (o.from_report.empty()) throw UsageError("--from-report: expected a file name");
  if (o.chart_file.empty())
    throw UsageError("--from-report needs --chart FILE (redrawing the chart is all it does)");
  if (o.chart_file == o.from_report) throw UsageError("--chart would overwrite the report");
  for (const std::string& flag : given)
    if (flag != "--from-report" && flag != "--chart" && flag != "--quiet")
      throw UsageError(flag + " does not go with --from-report, which sends no traffic (only " +
                       "--chart and --quiet do)");
}

void validate(Options& o, const std::set<std::string>& given) {
  if (given.count("--from-report")) {
    validate_from_report(o, given);
    return;
  }
  const int modes = (o.rate > 0) + (o.clients > 0) + !o.sweep.empty();
  if (modes != 1) throw UsageError("give exactly one of --rate R, --clients N, --sweep R1,R2,...");
  o.mode = o.rate > 0 ? Mode::kOpen : o.clients > 0 ? Mode::kClosed : Mode::kSweep;
  if (!o.chart_file.empty() && o.mode != Mode::kSweep)
    throw UsageError("--chart draws a sweep: it needs --sweep");
  if (o.duration_s <= 0 && o.max_jobs == 0)
    throw UsageError("--duration 0 needs --max-jobs N (else nothing would be sent)");
  if (!o.prompts_file.empty() && o.mix != "builtin")
    throw UsageError("--mix and --prompts exclude each other");
  // --check promises that every fetched image decoded, so it must decode them.
  if (o.check) o.decode = true;
}

}  // namespace

std::string usage() {
  return R"(usage: sdload [--url URL] (--rate R | --clients N | --sweep R1,R2,...) [options]
       sdload --from-report REPORT.json --chart CHART.png

Load generator for sdserve: submits jobs (POST /v1/jobs), follows each over its WebSocket,
fetches its images, and reports latency percentiles, throughput and outcome counts.

Traffic
  --rate R              open loop: Poisson arrivals at R images/s
  --clients N           closed loop: N clients, each submitting its next job when one ends
  --sweep R1,R2,...     open loop at each rate in turn (one run per rate)
  --duration S          seconds of submissions per run (default 10)
  --max-jobs N          stop submitting after N jobs per run (default: no limit)
  --drain-timeout S     after submissions stop, wait this long for jobs in flight (default 60)
  --seed N              seed of arrivals and prompt choices (default 1; same seed, same traffic)
Requests
  --prompts FILE        JSONL: one object of request fields per line, merged over the defaults
  --mix builtin|fixed   built-in variety (prompts, samplers, steps, sizes) or one fixed job
  --width W --height H  fix the size of every job
  --steps N | A..B      fix the steps of every job, or draw them from A..B per job
  --sampler NAME        fix the sampler; --scheduler normal|karras fixes the schedule
Checks and output
  --decode              decode every fetched PNG and check its size
  --check               exit 1 unless counts add up, a job succeeded and all images decoded
  --report FILE         JSON report;  --chart FILE  PNG chart of a sweep (through gnuplot)
  --compare URL2        afterwards, the same traffic against URL2; both side by side
  --quiet               no live progress line on stderr
  --from-report FILE    no traffic: print the sweep tables of FILE (a --report of a --sweep)
                        and redraw its --chart (needed); no other option but --quiet
Connection
  --url URL             http://HOST[:PORT] (default http://127.0.0.1:8080)
  --api-key KEY         sent as 'Authorization: Bearer KEY'
  --timeout S           deadline of each connect, request and WebSocket silence (default 30)
  --ready-timeout S     wait for /readyz before a target's first run (default 30; 0: don't)

Ctrl-C stops submissions and waits for jobs in flight (a second Ctrl-C abandons them), then
reports. Exit status: 0; 1 when --check failed; 2 bad usage (or a --from-report that cannot be
read); 130 interrupted.
)";
}

bool parse_options(int argc, char** argv, Options& o) {
  const auto& flags = value_flags();
  std::set<std::string> given;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_value = false;
    // --flag=value as well as --flag value.
    if (const size_t eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    if (arg == "-h" || arg == "--help") {
      std::cout << usage();
      return false;
    }
    given.insert(arg);
    if (arg == "--decode" || arg == "--check" || arg == "--quiet") {
      if (has_value) throw UsageError(arg + " takes no value");
      (arg == "--decode" ? o.decode : arg == "--check" ? o.check : o.quiet) = true;
      continue;
    }
    const auto it = flags.find(arg);
    if (it == flags.end()) throw UsageError("unknown argument '" + arg + "' (see --help)");
    if (!has_value) {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      value = argv[++i];
    }
    it->second(o, value);
  }
  validate(o, given);
  return true;
}

nlohmann::ordered_json options_json(const Options& o) {
  nlohmann::ordered_json j = {{"url", o.url},
                              {"duration_s", o.duration_s},
                              {"max_jobs", o.max_jobs},
                              {"drain_timeout_s", o.drain_timeout_s},
                              {"timeout_s", o.request_timeout_s},
                              {"seed", o.seed},
                              {"mix", o.prompts_file.empty() ? o.mix : "prompts_file"},
                              {"decode", o.decode},
                              {"api_key", !o.api_key.empty()}};
  if (o.mode == Mode::kOpen) j["rate"] = o.rate;
  if (o.mode == Mode::kClosed) j["clients"] = o.clients;
  if (o.mode == Mode::kSweep) j["sweep"] = o.sweep;
  if (!o.compare_url.empty()) j["compare"] = o.compare_url;
  if (!o.prompts_file.empty()) j["prompts"] = o.prompts_file;
  if (o.width) j["width"] = o.width;
  if (o.height) j["height"] = o.height;
  if (o.steps_min) j["steps"] = {o.steps_min, o.steps_max};
  if (!o.sampler.empty()) j["sampler"] = o.sampler;
  if (!o.scheduler.empty()) j["scheduler"] = o.scheduler;
  return j;
}

}  // namespace sdload
