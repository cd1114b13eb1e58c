#include "bench/embedding_cache.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cache/embedding_cache.h"
#include "cache/sha256.h"
#include "pipeline/bench_support.h"

namespace sdserve::bench {
namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

}  // namespace

CacheBenchReport run_cache_bench(const pipeline::Model& model, const std::string& redis_url,
                                 int jobs) {
  cache::ValueCodec codec;
  codec.to_bytes = [&model](const void* v) {
    return model.embedding_to_bytes(*static_cast<const pipeline::Embedding*>(v));
  };
  codec.from_bytes = [&model](std::string_view b) -> std::shared_ptr<const void> {
    return model.embedding_from_bytes(b);
  };
  // Distinct prompts per job (a run-unique prefix keeps earlier runs' Redis entries out), and
  // the negative prompt most requests share.
  const auto run_id = std::to_string(Clock::now().time_since_epoch().count());
  std::vector<std::vector<std::string>> prompts;
  std::vector<std::vector<std::string>> keys;
  for (int j = 0; j < jobs; ++j) {
    prompts.push_back({"a photograph of subject " + std::to_string(j) + ", detailed, " + run_id,
                       "blurry, low quality, " + run_id + " " + std::to_string(j)});
    keys.push_back({cache::sha256_hex(prompts.back()[0]), cache::sha256_hex(prompts.back()[1])});
  }
  model.encode_texts(prompts.front());  // warm the encoder
  pipeline::bench_support::synchronize(model);

  CacheBenchReport r;
  r.jobs = jobs;
  std::vector<std::vector<pipeline::EmbeddingPtr>> encoded;
  std::vector<double> cold, memory, shared;
  for (const auto& p : prompts) {
    const auto start = Clock::now();
    encoded.push_back(model.encode_texts(p));
    pipeline::bench_support::synchronize(model);
    cold.push_back(ms_since(start));
  }
  r.cold_ms = median(cold);

  cache::TieredCacheOptions mo;
  cache::TieredEmbeddingCache lru(mo);
  for (int j = 0; j < jobs; ++j)
    for (int k = 0; k < 2; ++k)
      lru.store("bench", keys[j][k], encoded[j][k], pipeline::Model::embedding_size(*encoded[j][k]),
                codec);
  for (int j = 0; j < jobs; ++j) {
    const auto start = Clock::now();
    const auto found = lru.find_many("bench", keys[j], codec);
    memory.push_back(ms_since(start));
    if (!found[0] || !found[1]) throw std::runtime_error("the LRU lost an entry");
  }
  r.memory_ms = median(memory);

  if (redis_url.empty()) return r;
  cache::TieredCacheOptions wo;
  wo.redis_url = redis_url;
  wo.redis_timeout = std::chrono::milliseconds(1000);
  {
    cache::TieredEmbeddingCache writer(wo);
    for (int j = 0; j < jobs; ++j)
      for (int k = 0; k < 2; ++k) writer.store("bench", keys[j][k], encoded[j][k], 0, codec);
    // Writes are asynchronous: wait until a reader without a memory tier sees the last one.
    cache::TieredCacheOptions ro = wo;
    ro.memory_bytes = 0;
    cache::TieredEmbeddingCache probe(ro);
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (!probe.find("bench", keys.back()[1], codec)) {
      if (Clock::now() > deadline)
        throw std::runtime_error("Redis at " + redis_url + " is unusable");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  cache::TieredCacheOptions ro = wo;
  ro.memory_bytes = 0;  // every lookup goes to Redis
  cache::TieredEmbeddingCache reader(ro);
  for (int j = 0; j < jobs; ++j) {
    const auto start = Clock::now();
    const auto found = reader.find_many("bench", keys[j], codec);
    pipeline::bench_support::synchronize(model);
    shared.push_back(ms_since(start));
    if (!found[0] || !found[1]) throw std::runtime_error("a Redis lookup missed");
  }
  r.redis_ms = median(shared);
  return r;
}

std::string CacheBenchReport::to_table() const {
  std::ostringstream s;
  s << "text encoding per job (prompt + negative prompt), median of " << jobs << " jobs:\n"
    << "| cache | ms per job |\n|---|---|\n"
    << "| cold (text encoder) | " << cold_ms << " |\n"
    << "| in-process LRU hit | " << memory_ms << " |\n";
  if (redis_ms >= 0) s << "| Redis hit | " << redis_ms << " |\n";
  return s.str();
}

std::string CacheBenchReport::to_json() const {
  nlohmann::json j = {{"jobs", jobs}, {"cold_ms", cold_ms}, {"memory_ms", memory_ms}};
  if (redis_ms >= 0) j["redis_ms"] = redis_ms;
  return j.dump(2);
}

}  // namespace sdserve::bench
