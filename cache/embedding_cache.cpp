#include "cache/embedding_cache.h"

#include "cache/lru_cache.h"
#include "cache/redis_client.h"

namespace sdserve::cache {
namespace {}  // namespace

// On a device, each device keeps its own tensors; host bytes serve every device.
std::string TieredEmbeddingCache::memory_tier_key(const std::string& scope,
                                                  const std::string& key) const {
  return options_.memory_on_host ? key : scope + '\n' + key;
}

std::vector<std::shared_ptr<const void>> EmbeddingCache::find_many(
    const std::string& scope, const std::vector<std::string>& keys, const ValueCodec& codec) {
  std::vector<std::shared_ptr<const void>> out;
  out.reserve(keys.size());
  for (const auto& k : keys) out.push_back(find(scope, k, codec));
  return out;
}

TieredEmbeddingCache::TieredEmbeddingCache(TieredCacheOptions options,
                                           std::function<void(bool, const std::string&)> log)
    : options_(std::move(options)), memory_(std::make_unique<LruCache>(options_.memory_bytes)) {
  if (!options_.redis_url.empty()) {
    RedisOptions r;
    r.url = options_.redis_url;
    r.timeout = options_.redis_timeout;
    redis_ = std::make_unique<RedisClient>(r, [this, log](bool up, const std::string& reason) {
      {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        counts_.redis_up = up;
      }
      if (log)
        log(!up, up ? "redis is up: the embedding cache is shared"
                    : "redis is down (" + reason + "); prompts are encoded here until it is back");
    });
    counts_.redis_configured = true;
  }
  // The writer turns values into bytes off the caller's thread: for Redis, and for a memory tier
  // kept in host memory.
  if (redis_ || options_.memory_on_host) writer_ = std::thread([this] { writer_loop(); });
}

TieredEmbeddingCache::~TieredEmbeddingCache() {
  if (!writer_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(write_mutex_);
    write_exit_ = true;
  }
  write_cv_.notify_all();
  writer_.join();
}

std::shared_ptr<const void> TieredEmbeddingCache::find(const std::string& scope,
                                                       const std::string& key,
                                                       const ValueCodec& codec) {
  return find_many(scope, {key}, codec).front();
}

std::vector<std::shared_ptr<const void>> TieredEmbeddingCache::find_many(
    const std::string& scope, const std::vector<std::string>& keys, const ValueCodec& codec) {
  std::vector<std::shared_ptr<const void>> out(keys.size());
  std::vector<size_t> missing;
  for (size_t i = 0; i < keys.size(); ++i) {
    out[i] = memory_->find(memory_tier_key(scope, keys[i]));
    if (out[i] && options_.memory_on_host) {
      // Host bytes this process wrote; the upload to the caller's device happens here.
      try {
        out[i] = codec.from_bytes(*static_cast<const std::string*>(out[i].get()));
      } catch (const std::exception&) {
        out[i] = nullptr;
      }
    }
    if (!out[i]) missing.push_back(i);
  }
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    counts_.memory_hits += keys.size() - missing.size();
    counts_.memory_misses += missing.size();
  }
  if (!redis_ || missing.empty()) return out;

  std::vector<std::string> redis_keys;
  for (size_t i : missing) redis_keys.push_back(options_.key_prefix + keys[i]);
  std::vector<std::optional<std::string>> values;
  const auto start = std::chrono::steady_clock::now();
  try {
    values = redis_->get_many(redis_keys);
  } catch (const RedisError& e) {
    // Down (in back-off) is not a new error: the state change was logged and counted once.
    if (e.kind != RedisErrorKind::kDown) count_error(to_string(e.kind));
    return out;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  uint64_t hits = 0, misses = 0, corrupt = 0;
  for (size_t j = 0; j < missing.size(); ++j) {
    const size_t i = missing[j];
    if (!values[j]) {
      ++misses;
      continue;
    }
    try {
      out[i] = codec.from_bytes(*values[j]);
    } catch (const std::exception&) {
      out[i] = nullptr;
    }
    if (!out[i]) {  // never trusted: a miss, and the encoder's value replaces it
      ++corrupt;
      ++misses;
      continue;
    }
    ++hits;
    if (options_.memory_on_host) {
      const auto size = values[j]->size();
      memory_->insert(memory_tier_key(scope, keys[i]),
                      std::make_shared<const std::string>(std::move(*values[j])), size);
    } else {
      memory_->insert(memory_tier_key(scope, keys[i]), out[i], values[j]->size());
    }
  }
  std::lock_guard<std::mutex> lock(stats_mutex_);
  counts_.redis_latency.observe(seconds);
  counts_.redis_hits += hits;
  counts_.redis_misses += misses;
  counts_.redis_corrupt += corrupt;
  return out;
}

void TieredEmbeddingCache::store(const std::string& scope, const std::string& key,
                                 std::shared_ptr<const void> value, uint64_t bytes,
                                 const ValueCodec& codec) {
  if (!value) return;
  if (!options_.memory_on_host) memory_->insert(memory_tier_key(scope, key), value, bytes);
  if (!redis_ && !options_.memory_on_host) return;
  {
    std::lock_guard<std::mutex> lock(write_mutex_);
    if (writes_.size() >= options_.max_pending_writes) return;  // the writer is behind: skip
    writes_.push_back({key, memory_tier_key(scope, key), std::move(value), codec});
  }
  write_cv_.notify_one();
}

void TieredEmbeddingCache::writer_loop() {
  for (;;) {
    Write w;
    {
      std::unique_lock<std::mutex> lock(write_mutex_);
      write_cv_.wait(lock, [&] { return write_exit_ || !writes_.empty(); });
      if (write_exit_) return;  // pending writes are a cache's, not a user's: drop them
      w = std::move(writes_.front());
      writes_.pop_front();
    }
    try {
      auto bytes = std::make_shared<const std::string>(w.codec.to_bytes(w.value.get()));
      if (options_.memory_on_host) memory_->insert(w.memory_key, bytes, bytes->size());
      if (!redis_) continue;
      const auto start = std::chrono::steady_clock::now();
      redis_->set(options_.key_prefix + w.key, *bytes, options_.redis_ttl);
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::lock_guard<std::mutex> lock(stats_mutex_);
      counts_.redis_latency.observe(seconds);
    } catch (const RedisError& e) {
      if (e.kind != RedisErrorKind::kDown) count_error(to_string(e.kind));
    } catch (const std::exception&) {
      count_error("encode");
    }
  }
}

void TieredEmbeddingCache::count_error(const std::string& kind) {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  ++counts_.redis_errors[kind];
}

CacheStats TieredEmbeddingCache::stats() const {
  CacheStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    s = counts_;
  }
  const auto m = memory_->stats();
  s.bytes = m.bytes;
  s.entries = m.entries;
  if (redis_) s.redis_up = redis_->up();
  return s;
}

}  // namespace sdserve::cache
