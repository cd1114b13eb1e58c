#include "cache/lru_cache.h"

#include <iterator>
#include <utility>

namespace sdserve::cache {

LruCache::LruCache(uint64_t capacity_bytes) : capacity_(capacity_bytes) {
  stats_.capacity = capacity_bytes;
}

std::shared_ptr<const void> LruCache::find(const std::string& key) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = index_.find(key);
  if (it == index_.end()) {
    ++stats_.misses;
    return nullptr;
  }
  ++stats_.hits;
  order_.splice(order_.begin(), order_, it->second);  // O(1); iterators stay valid
  return it->second->value;
}

bool LruCache::insert(const std::string& key, std::shared_ptr<const void> value, uint64_t bytes) {
  // Written so that a huge `bytes` cannot wrap the sum around.
  if (capacity_ == 0 || bytes > capacity_ || key.size() > capacity_ - bytes) return false;
  const uint64_t charge = bytes + key.size();

  // What this call drops, released after the lock: a value's destructor may be slow (device
  // memory) or use the cache. Victims move here by splice, which cannot throw half-way.
  std::shared_ptr<const void> replaced;
  List evicted;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = index_.find(key);
    if (found != index_.end()) {
      Entry& entry = *found->second;
      stats_.bytes -= entry.charge;
      replaced = std::exchange(entry.value, std::move(value));
      entry.charge = charge;
      order_.splice(order_.begin(), order_, found->second);
    } else {
      order_.push_front(Entry{key, std::move(value), charge});
      try {
        index_.emplace(order_.front().key, order_.begin());
      } catch (...) {  // out of memory: leave the cache as it was
        order_.pop_front();
        throw;
      }
      ++stats_.entries;
    }
    stats_.bytes += charge;
    // The new entry is at the front and fits alone, so this stops before reaching it.
    while (stats_.bytes > capacity_) {
      const List::iterator victim = std::prev(order_.end());
      stats_.bytes -= victim->charge;
      --stats_.entries;
      ++stats_.evictions;
      index_.erase(victim->key);
      evicted.splice(evicted.end(), order_, victim);
    }
  }
  return true;
}

bool LruCache::erase(const std::string& key) {
  // Declared before the lock, so destroyed after it is released (as in insert()).
  std::shared_ptr<const void> dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  const auto found = index_.find(key);
  if (found == index_.end()) return false;
  const List::iterator entry = found->second;
  stats_.bytes -= entry->charge;
  --stats_.entries;
  dropped = std::move(entry->value);
  index_.erase(found);
  order_.erase(entry);
  return true;
}

LruCache::Stats LruCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace sdserve::cache
