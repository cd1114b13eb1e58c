// A1111's progress and interrupt (/sdapi/v1/progress, /sdapi/v1/interrupt) for many users: which
// caller's jobs are running, how far along, and their latest step preview.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "server/a1111.h"
#include "server/api_json.h"

namespace sdserve::server::a1111 {

// Progress of each caller's A1111 jobs, for GET /sdapi/v1/progress and POST .../interrupt. A
// caller is an API key, or a client address where no keys are configured: A1111 has one user,
// sdserve many, and each sees its own jobs. Thread-safe: events arrive on engine threads.
//
// Bounded: a caller's finished jobs past kJobsPerCaller, and callers past kCallers whose jobs are
// all finished, are forgotten, least recent first. Jobs not yet final are never forgotten (the
// engine's queue bounds them), so that an interrupt reaches every one of them.
class Tracker {
 public:
  // `engine` says which remembered jobs are final (may be null: none is known final).
  void started(const std::string& caller, const std::string& job_id, const engine::Engine* engine);
  void event(const engine::JobEvent& e);
  // {progress, eta_relative, state, current_image, textinfo} for the caller's latest job.
  Json progress(const std::string& caller, const engine::Engine* engine) const;
  // The caller's jobs not yet final (for interrupt).
  std::vector<std::string> active_jobs(const std::string& caller,
                                       const engine::Engine* engine) const;

 private:
  struct JobRecord {
    std::string caller;
    int evaluations = 0, evaluations_total = 0, steps = 0;
    std::chrono::steady_clock::time_point started{};
    bool running = false;
    bool final = false;                                   // its final event arrived
    std::shared_ptr<const std::vector<uint8_t>> preview;  // latest step preview (PNG)
  };
  static constexpr size_t kJobsPerCaller = 16;
  static constexpr size_t kCallers = 256;

  // Under mutex_: whether a remembered job is final (its event, else the engine's word).
  bool is_final(const std::string& id, const engine::Engine* engine);
  // Under mutex_: forgets the caller's oldest final jobs while it has more than `keep`; true when
  // none is left.
  bool forget_final(std::deque<std::string>& mine, size_t keep, const engine::Engine* engine);

  mutable std::mutex mutex_;
  std::map<std::string, JobRecord> jobs_;                 // guarded by mutex_
  std::map<std::string, std::deque<std::string>> owned_;  // caller -> job ids, oldest first
  std::deque<std::string> callers_;                       // least recently submitting first
};

}  // namespace sdserve::server::a1111
