// The service configuration through config::apply_json()/validate() and config::load().
// Input: the config file's text, optionally followed by a NUL byte and then command-line
// arguments and environment variables, one per line ("SDSERVE_KEY=value" lines are the
// environment, every other line an argument). The file is written to a memfd and passed as
// --config /proc/self/fd/N; arguments naming another config file are left out, so the fuzzer
// cannot make it read /dev/zero. Documented: ConfigError. Property: an accepted configuration,
// rendered by to_json() and applied again, is accepted and renders the same.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "config/config.h"
#include "finding.h"

namespace cfg = sdserve::config;

namespace {

std::string config_file(const std::string& text) {
  static const int fd = [] {
    const int fd = ::memfd_create("fuzz_config", MFD_CLOEXEC);
    if (fd < 0) finding("memfd_create failed");
    return fd;
  }();
  if (::ftruncate(fd, 0) != 0) finding("ftruncate failed");
  for (size_t done = 0; done < text.size();) {
    const ssize_t n = ::pwrite(fd, text.data() + done, text.size() - done, done);
    if (n <= 0) finding("pwrite failed");
    done += static_cast<size_t>(n);
  }
  return "/proc/self/fd/" + std::to_string(fd);
}

void check_round_trip(const cfg::ServiceConfig& c) {
  const std::string first = cfg::to_json(c);
  cfg::ServiceConfig again;
  try {
    cfg::apply_json(again, first, "round trip");
    cfg::validate(again);
  } catch (const cfg::ConfigError& e) {
    finding("an accepted configuration, rendered as " + first + ", is refused: " + e.what());
  }
  const std::string second = cfg::to_json(again);
  if (second != first) finding("to_json differs after a round trip:\n" + first + "\n" + second);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string file_text = input.substr(0, nul);

  // The file layer alone.
  try {
    cfg::ServiceConfig c;
    cfg::apply_json(c, file_text, "fuzz");
    cfg::validate(c);
    check_round_trip(c);
  } catch (const cfg::ConfigError&) {
  }

  // Every layer, as `sdserve serve` reads them.
  std::vector<std::string> args = {"--config", config_file(file_text)};
  std::map<std::string, std::string> env;
  if (nul != std::string::npos) {
    size_t pos = nul + 1;
    while (pos <= input.size()) {
      size_t end = input.find('\n', pos);
      if (end == std::string::npos) end = input.size();
      const std::string line = input.substr(pos, end - pos);
      pos = end + 1;
      const size_t eq = line.find('=');
      if (line.rfind("SDSERVE_", 0) == 0 && eq != std::string::npos) {
        const std::string name = line.substr(0, eq);
        if (name != "SDSERVE_CONFIG") env[name] = line.substr(eq + 1);
      } else if (line.rfind("--config", 0) != 0) {
        args.push_back(line);
      }
    }
  }
  try {
    const cfg::Loaded loaded = cfg::load(args, env);
    if (!loaded.help) check_round_trip(loaded.config);
  } catch (const cfg::ConfigError&) {
  }
  return 0;
}
