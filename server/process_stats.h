// The process's own resource use, read from /proc for the Prometheus process_* families
// (process_resident_memory_bytes, process_open_fds, ...) that other exporters also give. Linux
// only; a value that cannot be read is negative.
#pragma once

namespace sdserve::server {

struct ProcessStats {
  double resident_bytes = -1;  // VmRSS
  double open_fds = -1;        // entries of /proc/self/fd
  double max_fds = -1;         // RLIMIT_NOFILE's soft limit
  double cpu_seconds = -1;     // user + system time
  double start_time_s = -1;    // since the Unix epoch
};

// Reads them now (a few small /proc reads; safe from any thread).
ProcessStats read_process_stats();

}  // namespace sdserve::server
