// Reading model files safely: a path may name a FIFO, a device or a huge file by accident or
// on purpose; none of them may block or exhaust the process.
#pragma once

#include <cstddef>
#include <string>

namespace sdserve::pipeline {

// Opens `path` read-only without blocking (O_NONBLOCK, so a FIFO cannot stall the open) and
// returns the descriptor of a regular file; throws ModelError for anything else. The caller closes
// it.
int open_regular_file(const std::string& path);

// The whole content of a small regular file (a config.json, a vocabulary); throws ModelError
// when it is not a regular file, cannot be read, or is larger than `max_bytes`.
std::string read_regular_file(const std::string& path, std::size_t max_bytes);

}  // namespace sdserve::pipeline
