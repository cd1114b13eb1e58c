// The in-process tier of the embedding cache: a byte-bounded least-recently-used map from a key
// (in practice a SHA-256 hex digest) to an opaque value the caller sizes.
//
// Budget: an entry costs its value's bytes (as the caller states them) plus the key's length.
// The bookkeeping per entry (a list node and a hash slot, ~100 bytes) is not counted; keys are
// short next to embeddings (64 bytes against ~230 KB for a 77x768 float tensor).
//
// Values are shared: an evicted or replaced value lives on for as long as anyone still holds it;
// the cache only drops its own reference. It drops those references outside its lock, so a
// value's destructor may be slow or call back into the cache.
//
// Thread safety: every member function may be called from any thread at once (one mutex, held
// for O(1) work per call).
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

namespace sdserve::cache {

class LruCache {
 public:
  // A capacity of 0 stores nothing (every insert returns false).
  explicit LruCache(uint64_t capacity_bytes);
  LruCache(const LruCache&) = delete;
  LruCache& operator=(const LruCache&) = delete;

  // The value under `key`, or null when absent (counted as a miss). A hit makes the entry the
  // most recently used.
  std::shared_ptr<const void> find(const std::string& key);

  // Stores `value` under `key` as the most recently used entry, replacing any value already
  // there, then evicts least-recently-used entries until the total fits the capacity. An entry
  // that alone exceeds the capacity (`bytes` + key length) is refused: it returns false and
  // changes nothing (no eviction, and an older value under `key` stays). True when stored.
  bool insert(const std::string& key, std::shared_ptr<const void> value, uint64_t bytes);

  // Removes `key`; false when it was absent. Not counted as an eviction.
  bool erase(const std::string& key);

  struct Stats {
    uint64_t entries = 0;
    uint64_t bytes = 0;      // value bytes + key bytes of the entries held; <= capacity
    uint64_t hits = 0;       // find() calls that returned a value
    uint64_t misses = 0;     // find() calls that returned null
    uint64_t evictions = 0;  // entries dropped to make room (not replacements, not erase())
    uint64_t capacity = 0;
  };
  Stats stats() const;

 private:
  struct Entry {
    std::string key;
    std::shared_ptr<const void> value;
    uint64_t charge;  // value bytes + key bytes
  };
  using List = std::list<Entry>;

  const uint64_t capacity_;
  mutable std::mutex mutex_;
  List order_;  // most recently used first; guarded by mutex_
  // Views of the keys in order_'s nodes, which never move, so each key is stored once.
  std::unordered_map<std::string_view, List::iterator> index_;  // guarded by mutex_
  Stats stats_;                                                 // guarded by mutex_
};

}  // namespace sdserve::cache
