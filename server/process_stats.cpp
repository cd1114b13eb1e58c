#include "server/process_stats.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace sdserve::server {
namespace {

// /proc/self/stat's fields after the command name (which may hold spaces and parentheses):
// fields[0] is the state (field 3 in proc(5)).
std::vector<std::string> stat_fields() {
  std::ifstream in("/proc/self/stat");
  std::string line;
  std::getline(in, line);
  const auto close = line.rfind(')');
  std::vector<std::string> out;
  if (close == std::string::npos) return out;
  std::istringstream rest(line.substr(close + 1));
  for (std::string f; rest >> f;) out.push_back(f);
  return out;
}

// The boot time (btime in /proc/stat), seconds since the epoch; -1 when unknown.
double boot_time_s() {
  std::ifstream in("/proc/stat");
  std::string key;
  double value;
  while (in >> key) {
    if (key == "btime" && in >> value) return value;
    in.ignore(1 << 20, '\n');
  }
  return -1;
}

}  // namespace

ProcessStats read_process_stats() {
  ProcessStats s;
  const long page = sysconf(_SC_PAGESIZE);
  const long ticks = sysconf(_SC_CLK_TCK);
  {
    std::ifstream in("/proc/self/statm");
    double size = 0, resident = 0;
    if (in >> size >> resident && page > 0) s.resident_bytes = resident * static_cast<double>(page);
  }
  if (DIR* dir = opendir("/proc/self/fd")) {
    double n = 0;
    while (const dirent* e = readdir(dir))
      if (e->d_name[0] != '.') ++n;
    closedir(dir);
    s.open_fds = n - 1;  // less the one reading the folder
  }
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
    s.max_fds = static_cast<double>(limit.rlim_cur);
  const auto f = stat_fields();
  // utime, stime and starttime are fields 14, 15 and 22 of proc(5): 11, 12 and 19 here.
  if (f.size() > 19 && ticks > 0) {
    s.cpu_seconds = (std::stod(f[11]) + std::stod(f[12])) / static_cast<double>(ticks);
    const double boot = boot_time_s();
    if (boot >= 0) s.start_time_s = boot + std::stod(f[19]) / static_cast<double>(ticks);
  }
  return s;
}

}  // namespace sdserve::server
