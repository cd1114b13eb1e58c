// The --chart of a --sweep: latency percentiles and completed throughput against offered load,
// drawn by Debian's gnuplot run as a subprocess on a generated script (no plotting library).
#pragma once

#include <string>
#include <vector>

#include "sdload/report.h"

namespace sdload {

// Draws every target's sweep into `png_path`. Returns false, having said why on stderr, when no
// chart was drawn (gnuplot not installed, or it failed): a missing chart never fails the run.
bool draw_chart(const std::string& png_path, const std::vector<TargetResult>& targets);

}  // namespace sdload
