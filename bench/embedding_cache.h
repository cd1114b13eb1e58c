// `sdserve bench --embedding-cache`: what a job's text encoding costs with a cold cache, an
// in-process LRU hit and a Redis hit (issue #9's benchmark). Torch-free header.
#pragma once

#include <string>

#include "pipeline/pipeline.h"

namespace sdserve::bench {

struct CacheBenchReport {
  int jobs = 0;  // distinct (prompt, negative prompt) pairs timed per tier
  // Median milliseconds per job (two embeddings), until they are usable on the model's device.
  double cold_ms = 0;    // the text encoder
  double memory_ms = 0;  // LRU hit
  double redis_ms = -1;  // Redis hit (bytes fetched, checked, copied to the device); -1: no Redis
  std::string to_table() const;
  std::string to_json() const;
};

// Throws std::runtime_error when the Redis at `redis_url` (empty: skip that tier) cannot be used.
CacheBenchReport run_cache_bench(const pipeline::Model& model, const std::string& redis_url,
                                 int jobs);

}  // namespace sdserve::bench
