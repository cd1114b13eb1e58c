// One run of traffic against one server: open loop (Poisson arrivals) or closed loop (N clients),
// for a duration or a number of jobs, then a bounded drain; Ctrl-C aware.
#pragma once

#include "sdload/net.h"
#include "sdload/options.h"
#include "sdload/record.h"
#include "sdload/workload.h"

namespace sdload {

// Ctrl-C / SIGTERM: the first stops submissions (jobs in flight are waited for, within the drain
// timeout), the second abandons the jobs in flight, the third exits at once.
void install_signal_handlers();
int interrupt_count();

// Runs `spec` with its own copy of `workload` (a fresh copy replays the same jobs).
RunResult run_once(const Options& options, const Server& server, const RunSpec& spec,
                   Workload workload);

}  // namespace sdload
