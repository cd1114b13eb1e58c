// sdserve: Stable Diffusion as a service. `sdserve serve` runs the HTTP/WebSocket service,
// `sdserve generate` makes images from the command line.
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "app/cli.h"
#include "pipeline/errors.h"

namespace {

constexpr const char* kUsage = R"(usage: sdserve <command> [options]

commands:
  serve      run the HTTP/WebSocket generation service (sdserve serve --help)
  generate   generate images to PNG files (sdserve generate --help)
  bench      time the pipeline on this machine (sdserve bench --help)
  --version  print the version
)";

}  // namespace

namespace sdserve {
std::chrono::steady_clock::time_point process_start_time() {
  static const auto start = std::chrono::steady_clock::now();
  return start;
}
}  // namespace sdserve

int main(int argc, char** argv) {
  sdserve::process_start_time();
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") {
    std::cout << "sdserve " << SDSERVE_VERSION << "\n";
    return 0;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  try {
    if (command == "generate") return sdserve::run_generate(args);
    if (command == "serve") return sdserve::run_serve(args);
    if (command == "bench") return sdserve::run_bench(args);
    std::cerr << "sdserve: unknown command '" << command << "'\n" << kUsage;
    return 2;
  } catch (const sdserve::UsageError& e) {
    std::cerr << "sdserve " << command << ": " << e.what() << "\n(see: sdserve " << command
              << " --help)\n";
    return 2;
  } catch (const sdserve::pipeline::RequestError& e) {
    std::cerr << "sdserve " << command << ": " << e.what() << "\n";
    return 2;
  } catch (const sdserve::pipeline::ModelError& e) {
    std::cerr << "sdserve " << command << ": model error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "sdserve " << command << ": error: " << e.what() << "\n";
    return 1;
  }
}
