#include "server/a1111_progress.h"

#include <algorithm>

#include "server/handlers.h"

namespace sdserve::server::a1111 {

bool Tracker::is_final(const std::string& id, const engine::Engine* engine) {
  const auto it = jobs_.find(id);
  if (it == jobs_.end() || it->second.final) return true;
  if (!engine) return false;
  // A caller that went away stopped receiving events: ask the engine. Its lock is never held
  // while it calls back into this class, so taking it under mutex_ cannot deadlock.
  const auto job = engine->get(id);
  if (job && !engine::is_final(job->status)) return false;
  it->second.final = true;
  return true;
}

bool Tracker::forget_final(std::deque<std::string>& mine, size_t keep,
                           const engine::Engine* engine) {
  for (auto it = mine.begin(); mine.size() > keep && it != mine.end();) {
    if (is_final(*it, engine)) {
      jobs_.erase(*it);
      it = mine.erase(it);
    } else {
      ++it;
    }
  }
  return mine.empty();
}

void Tracker::started(const std::string& caller, const std::string& job_id,
                      const engine::Engine* engine) {
  std::lock_guard<std::mutex> lock(mutex_);
  jobs_[job_id].caller = caller;
  auto& mine = owned_[caller];
  mine.push_back(job_id);
  forget_final(mine, kJobsPerCaller, engine);
  callers_.erase(std::remove(callers_.begin(), callers_.end(), caller), callers_.end());
  callers_.push_back(caller);
  // Past kCallers, the least recent callers whose jobs have all ended go.
  for (auto it = callers_.begin(); callers_.size() > kCallers && it != callers_.end();) {
    auto& theirs = owned_[*it];
    if (*it != caller && forget_final(theirs, 0, engine)) {
      owned_.erase(*it);
      it = callers_.erase(it);
    } else {
      ++it;
    }
  }
}

void Tracker::event(const engine::JobEvent& e) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = jobs_.find(e.job_id);
  if (it == jobs_.end()) return;
  JobRecord& j = it->second;
  switch (e.type) {
    case engine::EventType::kStarted:
      j.running = true;
      j.started = std::chrono::steady_clock::now();
      [[fallthrough]];
    case engine::EventType::kProgress:
      j.evaluations = e.evaluations;
      j.evaluations_total = e.evaluations_total;
      j.steps = e.steps;
      break;
    case engine::EventType::kPreview:
      if (e.image == 0 && e.binary) j.preview = e.binary;  // the first image, as A1111 shows
      j.evaluations = e.evaluations;
      j.evaluations_total = e.evaluations_total;
      break;
    default:
      if (engine::is_final(e.type)) j.final = true;
      j.running = false;
      break;
  }
}

std::vector<std::string> Tracker::active_jobs(const std::string& caller,
                                              const engine::Engine* engine) const {
  std::deque<std::string> mine;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = owned_.find(caller);
    if (it != owned_.end()) mine = it->second;
  }
  std::vector<std::string> out;
  for (const auto& id : mine) {
    const auto job = engine ? engine->get(id) : std::nullopt;
    if (job &&
        (job->status == engine::JobStatus::kQueued || job->status == engine::JobStatus::kRunning))
      out.push_back(id);
  }
  return out;
}

Json Tracker::progress(const std::string& caller, const engine::Engine* engine) const {
  const auto active = active_jobs(caller, engine);
  Json state = {
      {"skipped", false}, {"interrupted", false},       {"stopping_generation", false},
      {"job", ""},        {"job_count", active.size()}, {"job_timestamp", job_timestamp()},
      {"job_no", 0},      {"sampling_step", 0},         {"sampling_steps", 0}};
  Json out = {{"progress", 0.0},
              {"eta_relative", 0.0},
              {"state", state},
              {"current_image", nullptr},
              {"textinfo", nullptr}};
  if (active.empty()) return out;
  const std::string& id = active.front();  // the oldest: the one A1111 would be running
  const auto job = engine->get(id);
  JobRecord j;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = jobs_.find(id);
    if (it != jobs_.end()) j = it->second;
  }
  out["state"]["job"] = id;
  if (job && job->status == engine::JobStatus::kQueued) {
    out["textinfo"] = "queued at position " + std::to_string(job->queue_position + 1);
    return out;
  }
  const double progress =
      j.evaluations_total > 0 ? static_cast<double>(j.evaluations) / j.evaluations_total : 0.0;
  out["progress"] = progress;
  out["state"]["sampling_steps"] = j.steps;
  out["state"]["sampling_step"] = engine::steps_done(j.evaluations, j.evaluations_total, j.steps);
  if (j.running && progress > 0) {
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - j.started).count();
    out["eta_relative"] = elapsed / progress - elapsed;
  }
  if (j.preview) out["current_image"] = base64(*j.preview);
  return out;
}

}  // namespace sdserve::server::a1111
