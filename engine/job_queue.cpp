#include "engine/job_queue.h"

#include <algorithm>

namespace sdserve::engine {

bool BoundedPriorityQueue::push(const std::string& id, Priority priority) {
  if (size() >= capacity_) return false;
  levels_[static_cast<int>(priority)].push_back(id);
  return true;
}

std::optional<std::string> BoundedPriorityQueue::front() const {
  for (const auto& level : levels_)
    if (!level.empty()) return level.front();
  return std::nullopt;
}

std::vector<std::string> BoundedPriorityQueue::in_order(std::size_t most) const {
  std::vector<std::string> out;
  for (const auto& level : levels_)
    for (const auto& id : level) {
      if (out.size() >= most) return out;
      out.push_back(id);
    }
  return out;
}

bool BoundedPriorityQueue::remove(const std::string& id) {
  for (auto& level : levels_) {
    auto it = std::find(level.begin(), level.end(), id);
    if (it != level.end()) {
      level.erase(it);
      return true;
    }
  }
  return false;
}

int BoundedPriorityQueue::position(const std::string& id) const {
  int before = 0;
  for (const auto& level : levels_) {
    auto it = std::find(level.begin(), level.end(), id);
    if (it != level.end()) return before + static_cast<int>(it - level.begin());
    before += static_cast<int>(level.size());
  }
  return -1;
}

std::size_t BoundedPriorityQueue::size() const {
  std::size_t n = 0;
  for (const auto& level : levels_) n += level.size();
  return n;
}

}  // namespace sdserve::engine
