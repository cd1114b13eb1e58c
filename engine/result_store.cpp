#include "engine/result_store.h"

namespace sdserve::engine {

std::vector<std::string> ResultStore::add(const std::string& job_id, int k, Png png,
                                          TimePoint now) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) {
    order_.push_back(job_id);
    Entry e;
    e.created = now;
    e.order = std::prev(order_.end());
    it = jobs_.emplace(job_id, std::move(e)).first;
  }
  const uint64_t size = png ? png->size() : 0;
  it->second.images[k] = std::move(png);
  it->second.bytes += size;
  bytes_ += size;
  std::vector<std::string> evicted;
  // Never evict the job being added: its client is about to ask for it.
  while (bytes_ > max_bytes_ && !order_.empty() && order_.front() != job_id) {
    evicted.push_back(order_.front());
    erase(order_.front());
  }
  return evicted;
}

Png ResultStore::get(const std::string& job_id, int k) const {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return nullptr;
  auto img = it->second.images.find(k);
  return img == it->second.images.end() ? nullptr : img->second;
}

void ResultStore::erase(const std::string& job_id) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  bytes_ -= it->second.bytes;
  order_.erase(it->second.order);
  jobs_.erase(it);
}

std::vector<std::string> ResultStore::expire(TimePoint now) {
  std::vector<std::string> gone;
  while (!order_.empty()) {
    const auto& oldest = jobs_.at(order_.front());
    if (now - oldest.created < ttl_) break;
    gone.push_back(order_.front());
    erase(order_.front());
  }
  return gone;
}

}  // namespace sdserve::engine
