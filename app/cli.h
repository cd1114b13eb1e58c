// Sub-commands of the sdserve executable. Each returns the process exit code.
#pragma once

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace sdserve {

// Thrown for a bad command-line argument: main prints it with the usage hint, exit code 2.
class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

int run_generate(const std::vector<std::string>& args);
int run_bench(const std::vector<std::string>& args);

// When main() started (the benchmark's start-up time counts from here).
std::chrono::steady_clock::time_point process_start_time();
int run_serve(const std::vector<std::string>& args);

// Small helpers shared by the sub-commands' parsers.
int parse_int_arg(const std::string& flag, const std::string& value, long long lo, long long hi);
double parse_double_arg(const std::string& flag, const std::string& value, double lo, double hi);
uint64_t parse_u64_arg(const std::string& flag, const std::string& value);

}  // namespace sdserve
