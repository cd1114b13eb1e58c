// The seam for caching prompt embeddings. The engine looks every prompt up here before running
// the text encoder. Values are opaque to the cache (the pipeline's embedding handles); a later
// issue adds an in-process LRU and Redis behind this interface.
//
// Thread safety: implementations must be safe to call from any thread.
#pragma once

#include <memory>
#include <string>

namespace sdserve::cache {

class EmbeddingCache {
 public:
  virtual ~EmbeddingCache() = default;
  // Null when absent.
  virtual std::shared_ptr<const void> find(const std::string& key) = 0;
  virtual void store(const std::string& key, std::shared_ptr<const void> value) = 0;
};

// Caches nothing: every lookup misses, so every prompt is encoded.
class PassThroughCache final : public EmbeddingCache {
 public:
  std::shared_ptr<const void> find(const std::string&) override { return nullptr; }
  void store(const std::string&, std::shared_ptr<const void>) override {}
};

}  // namespace sdserve::cache
