// Finished images in memory, bounded by age (TTL) and by total bytes; the oldest job's images go
// first when the cap is reached. A job whose images were evicted answers "expired" (HTTP 410).
//
// Thread safety: none; the engine guards it with its mutex.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sdserve::engine {

using Png = std::shared_ptr<const std::vector<uint8_t>>;

class ResultStore {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  ResultStore(std::chrono::duration<double> ttl, uint64_t max_bytes)
      : ttl_(ttl), max_bytes_(max_bytes) {}

  // Adds one image of a job (index k). Evicts the oldest jobs if over the byte cap and returns
  // the ids of jobs whose results were evicted.
  std::vector<std::string> add(const std::string& job_id, int k, Png png, TimePoint now);
  // Null when absent (never stored, or evicted).
  Png get(const std::string& job_id, int k) const;
  bool has_job(const std::string& job_id) const { return jobs_.count(job_id) != 0; }
  void erase(const std::string& job_id);
  // Drops jobs older than the TTL; returns their ids.
  std::vector<std::string> expire(TimePoint now);
  uint64_t bytes() const { return bytes_; }

 private:
  struct Entry {
    TimePoint created;
    std::map<int, Png> images;
    uint64_t bytes = 0;
    std::list<std::string>::iterator order;
  };
  std::chrono::duration<double> ttl_;
  uint64_t max_bytes_;
  uint64_t bytes_ = 0;
  std::map<std::string, Entry> jobs_;
  std::list<std::string> order_;  // oldest first
};

}  // namespace sdserve::engine
