// Prompt embeddings, cached: the engine looks every prompt up here before running the text
// encoder. Values are opaque to the cache (the pipeline's embedding handles); a ValueCodec turns
// them into bytes and back for the shared tier.
//
// Two tiers (TieredEmbeddingCache): an in-process LRU bounded in bytes, holding values where
// the caller made them (on a worker's GPU), keyed by (scope, key) so each device keeps its own
// (or, with memory_on_host, their bytes in host memory, shared by every device);
// and, optionally, Redis shared by every replica, keyed by `key` alone. Redis is a bonus, never a
// requirement: when it is absent, down, slow or holds garbage, a lookup is a miss and the text
// encoder runs. Writes to Redis happen on a background thread, so a worker never waits for them.
//
// Thread safety: implementations are safe to call from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "cache/histogram.h"

namespace sdserve::cache {

class LruCache;
class RedisClient;

// How the shared tier stores a value it did not make. from_bytes throws when the bytes are not a
// valid value (then they are counted as corrupt and ignored).
struct ValueCodec {
  std::function<std::string(const void* value)> to_bytes;
  std::function<std::shared_ptr<const void>(std::string_view bytes)> from_bytes;
};

struct CacheStats {
  uint64_t memory_hits = 0, memory_misses = 0;
  uint64_t redis_hits = 0, redis_misses = 0;
  uint64_t bytes = 0, entries = 0;  // the memory tier
  bool redis_configured = false;
  bool redis_up = false;
  uint64_t redis_corrupt = 0;                    // values that failed to decode, ignored
  std::map<std::string, uint64_t> redis_errors;  // by kind: connect, timeout, io, ...
  HistogramCounts redis_latency{fast_latency_buckets()};
};

class EmbeddingCache {
 public:
  virtual ~EmbeddingCache() = default;
  // Null when absent in every tier. A value found in a shared tier is decoded with `codec` and
  // kept in the memory tier under `scope`.
  virtual std::shared_ptr<const void> find(const std::string& scope, const std::string& key,
                                           const ValueCodec& codec) = 0;
  // Several keys at once (one Redis round trip for the memory tier's misses).
  virtual std::vector<std::shared_ptr<const void>> find_many(const std::string& scope,
                                                             const std::vector<std::string>& keys,
                                                             const ValueCodec& codec);
  virtual void store(const std::string& scope, const std::string& key,
                     std::shared_ptr<const void> value, uint64_t bytes,
                     const ValueCodec& codec) = 0;
  virtual CacheStats stats() const { return {}; }
};

// Caches nothing: every lookup misses, so every prompt is encoded.
class PassThroughCache final : public EmbeddingCache {
 public:
  std::shared_ptr<const void> find(const std::string&, const std::string&,
                                   const ValueCodec&) override {
    return nullptr;
  }
  void store(const std::string&, const std::string&, std::shared_ptr<const void>, uint64_t,
             const ValueCodec&) override {}
};

struct TieredCacheOptions {
  uint64_t memory_bytes = 256ull << 20;  // 0: no memory tier
  // Keep the memory tier as bytes in host memory (shared by every device; a hit is copied to
  // the device) instead of tensors on each device (no copy; costs device memory).
  bool memory_on_host = false;
  std::string redis_url;  // empty: no Redis
  std::chrono::milliseconds redis_timeout{50};
  std::chrono::seconds redis_ttl{7 * 24 * 3600};
  std::string key_prefix = "sdserve:emb:v1:";
  size_t max_pending_writes = 1024;  // beyond: writes are dropped (Redis is slower than we are)
};

class TieredEmbeddingCache final : public EmbeddingCache {
 public:
  // `log` receives one line per Redis state change (never one per request). Throws
  // std::invalid_argument for a malformed redis_url.
  TieredEmbeddingCache(TieredCacheOptions options,
                       std::function<void(bool error, const std::string& line)> log = {});
  ~TieredEmbeddingCache() override;

  std::shared_ptr<const void> find(const std::string& scope, const std::string& key,
                                   const ValueCodec& codec) override;
  std::vector<std::shared_ptr<const void>> find_many(const std::string& scope,
                                                     const std::vector<std::string>& keys,
                                                     const ValueCodec& codec) override;
  void store(const std::string& scope, const std::string& key, std::shared_ptr<const void> value,
             uint64_t bytes, const ValueCodec& codec) override;
  CacheStats stats() const override;

 private:
  struct Write {
    std::string key;         // without the Redis prefix
    std::string memory_key;  // in the memory tier (host mode)
    std::shared_ptr<const void> value;
    ValueCodec codec;
  };
  void writer_loop();
  std::string memory_tier_key(const std::string& scope, const std::string& key) const;
  void count_error(const std::string& kind);

  TieredCacheOptions options_;
  std::unique_ptr<LruCache> memory_;
  std::unique_ptr<RedisClient> redis_;  // null without a redis_url

  mutable std::mutex stats_mutex_;
  CacheStats counts_;  // hits, misses, errors, latency (the memory tier's size is read live)

  std::mutex write_mutex_;
  std::condition_variable write_cv_;
  std::deque<Write> writes_;
  bool write_exit_ = false;
  std::thread writer_;
};

}  // namespace sdserve::cache
