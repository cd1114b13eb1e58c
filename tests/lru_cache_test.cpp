// The in-process LRU: counting, recency, byte-bounded eviction, sharing of values, and a
// multi-threaded stress test that checks the invariants afterwards.
#include "cache/lru_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace sdserve::cache {
namespace {

std::shared_ptr<const void> value_of(int v) {
  return std::make_shared<const int>(v);
}

int int_of(const std::shared_ptr<const void>& p) {
  return *static_cast<const int*>(p.get());
}

// "a", "b", ... for i = 0, 1, ...
std::string letter(int i) {
  return std::string(1, static_cast<char>('a' + i));
}

// Keys of one byte keep the arithmetic readable: an entry costs `bytes` + 1.
TEST(LruCache, CountsHitsAndMisses) {
  LruCache cache(1000);
  EXPECT_EQ(cache.find("a"), nullptr);
  ASSERT_TRUE(cache.insert("a", value_of(1), 10));
  ASSERT_NE(cache.find("a"), nullptr);
  EXPECT_EQ(int_of(cache.find("a")), 1);
  EXPECT_EQ(cache.find("b"), nullptr);
  const LruCache::Stats s = cache.stats();
  EXPECT_EQ(s.hits, 2u);
  EXPECT_EQ(s.misses, 2u);
  EXPECT_EQ(s.entries, 1u);
  EXPECT_EQ(s.bytes, 11u);
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_EQ(s.capacity, 1000u);
}

TEST(LruCache, KeyBytesCountTowardTheBudget) {
  LruCache cache(100);
  ASSERT_TRUE(cache.insert(std::string(30, 'k'), value_of(1), 70));  // exactly the capacity
  EXPECT_EQ(cache.stats().bytes, 100u);
  // 71 bytes of value would fit without the key; with it the entry is too big.
  EXPECT_FALSE(cache.insert(std::string(30, 'j'), value_of(2), 71));
  EXPECT_EQ(cache.stats().entries, 1u);
}

TEST(LruCache, AFoundEntrySurvivesEvictionOverAnOlderOne) {
  LruCache cache(30);  // room for three entries of 10
  ASSERT_TRUE(cache.insert("a", value_of(1), 9));
  ASSERT_TRUE(cache.insert("b", value_of(2), 9));
  ASSERT_TRUE(cache.insert("c", value_of(3), 9));
  ASSERT_NE(cache.find("a"), nullptr);  // "b" is now the least recently used
  ASSERT_TRUE(cache.insert("d", value_of(4), 9));
  EXPECT_EQ(cache.find("b"), nullptr);
  EXPECT_NE(cache.find("a"), nullptr);
  EXPECT_NE(cache.find("c"), nullptr);
  EXPECT_NE(cache.find("d"), nullptr);
  EXPECT_EQ(cache.stats().evictions, 1u);
}

TEST(LruCache, ABigValueEvictsSeveralSmallOnesOldestFirst) {
  LruCache cache(100);
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(cache.insert(letter(i), value_of(i), 9));
  EXPECT_EQ(cache.stats().bytes, 100u);
  // 36 bytes need four entries of 10 to go: the four oldest, a..d.
  ASSERT_TRUE(cache.insert("Z", value_of(99), 35));
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(cache.find(letter(i)) != nullptr, i >= 4) << letter(i);
  }
  const LruCache::Stats s = cache.stats();
  EXPECT_EQ(s.evictions, 4u);
  EXPECT_EQ(s.entries, 7u);
  EXPECT_EQ(s.bytes, 96u);
}

TEST(LruCache, ReplacingAKeyUpdatesItsBytesAndValue) {
  LruCache cache(100);
  ASSERT_TRUE(cache.insert("a", value_of(1), 9));
  ASSERT_TRUE(cache.insert("b", value_of(2), 9));
  ASSERT_TRUE(cache.insert("a", value_of(3), 49));  // grows; nothing needs to go
  LruCache::Stats s = cache.stats();
  EXPECT_EQ(s.entries, 2u);
  EXPECT_EQ(s.bytes, 60u);
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_EQ(int_of(cache.find("a")), 3);
  ASSERT_TRUE(cache.insert("a", value_of(4), 4));  // shrinks
  EXPECT_EQ(cache.stats().bytes, 15u);
  EXPECT_EQ(int_of(cache.find("a")), 4);
}

TEST(LruCache, ReplacingAKeyMakesItTheMostRecentAndEvictsOthersToFit) {
  LruCache cache(30);
  ASSERT_TRUE(cache.insert("a", value_of(1), 9));
  ASSERT_TRUE(cache.insert("b", value_of(2), 9));
  ASSERT_TRUE(cache.insert("c", value_of(3), 9));
  // "a" becomes the most recent and grows by 10, so the oldest other entry, "b", goes.
  ASSERT_TRUE(cache.insert("a", value_of(4), 19));
  EXPECT_EQ(cache.find("b"), nullptr);
  EXPECT_EQ(int_of(cache.find("a")), 4);
  EXPECT_EQ(int_of(cache.find("c")), 3);
  const LruCache::Stats s = cache.stats();
  EXPECT_EQ(s.evictions, 1u);
  EXPECT_EQ(s.entries, 2u);
  EXPECT_EQ(s.bytes, 30u);
}

TEST(LruCache, ATooBigValueIsRefusedAndEvictsNothing) {
  LruCache cache(30);
  ASSERT_TRUE(cache.insert("a", value_of(1), 9));
  ASSERT_TRUE(cache.insert("b", value_of(2), 9));
  EXPECT_FALSE(cache.insert("c", value_of(3), 30));          // 31 with the key
  EXPECT_FALSE(cache.insert("a", value_of(4), 30));          // nor does it replace "a"
  EXPECT_FALSE(cache.insert("d", value_of(5), UINT64_MAX));  // no wrap-around
  EXPECT_EQ(int_of(cache.find("a")), 1);
  EXPECT_NE(cache.find("b"), nullptr);
  EXPECT_EQ(cache.find("c"), nullptr);
  const LruCache::Stats s = cache.stats();
  EXPECT_EQ(s.entries, 2u);
  EXPECT_EQ(s.bytes, 20u);
  EXPECT_EQ(s.evictions, 0u);
}

TEST(LruCache, CapacityZeroStoresNothing) {
  LruCache cache(0);
  EXPECT_FALSE(cache.insert("a", value_of(1), 1));
  EXPECT_FALSE(cache.insert("", value_of(2), 0));  // even an entry that costs nothing
  EXPECT_EQ(cache.find("a"), nullptr);
  EXPECT_EQ(cache.find(""), nullptr);
  const LruCache::Stats s = cache.stats();
  EXPECT_EQ(s.entries, 0u);
  EXPECT_EQ(s.bytes, 0u);
  EXPECT_EQ(s.misses, 2u);
  EXPECT_EQ(s.capacity, 0u);
}

TEST(LruCache, EraseRemovesAnEntry) {
  LruCache cache(100);
  ASSERT_TRUE(cache.insert("a", value_of(1), 9));
  ASSERT_TRUE(cache.insert("b", value_of(2), 9));
  EXPECT_TRUE(cache.erase("a"));
  EXPECT_FALSE(cache.erase("a"));
  EXPECT_EQ(cache.find("a"), nullptr);
  EXPECT_NE(cache.find("b"), nullptr);
  const LruCache::Stats s = cache.stats();
  EXPECT_EQ(s.entries, 1u);
  EXPECT_EQ(s.bytes, 10u);
  EXPECT_EQ(s.evictions, 0u);
}

// Counts live instances, to see exactly when the cache lets go of a value.
struct Tracked {
  Tracked(std::atomic<int>* counter, int value) : live(counter), v(value) { ++*live; }
  ~Tracked() { --*live; }
  std::atomic<int>* live;
  int v;
};

TEST(LruCache, AnEvictedValueStaysUsableByAHolder) {
  std::atomic<int> live{0};
  LruCache cache(20);
  ASSERT_TRUE(cache.insert("a", std::make_shared<const Tracked>(&live, 7), 9));
  std::shared_ptr<const void> held = cache.find("a");
  ASSERT_TRUE(cache.insert("b", std::make_shared<const Tracked>(&live, 8), 9));
  ASSERT_TRUE(cache.insert("c", std::make_shared<const Tracked>(&live, 9), 9));  // evicts "a"
  EXPECT_EQ(cache.find("a"), nullptr);
  EXPECT_EQ(live.load(), 3);  // "a" lives on in `held`
  EXPECT_EQ(static_cast<const Tracked*>(held.get())->v, 7);
  held.reset();
  EXPECT_EQ(live.load(), 2);
  // Unheld, an evicted or replaced value is released at once.
  ASSERT_TRUE(cache.insert("d", std::make_shared<const Tracked>(&live, 10), 9));  // evicts "b"
  ASSERT_TRUE(cache.insert("c", std::make_shared<const Tracked>(&live, 11), 9));  // replaces "c"
  EXPECT_EQ(live.load(), 2);
}

// A value's destructor may use the cache: the cache releases values outside its lock.
struct CallsBack {
  explicit CallsBack(LruCache* c) : cache(c) {}
  ~CallsBack() { cache->find("other"); }
  LruCache* cache;
};

TEST(LruCache, AValueDestructorMayCallTheCache) {
  LruCache cache(10);
  ASSERT_TRUE(cache.insert("a", std::make_shared<const CallsBack>(&cache), 9));
  ASSERT_TRUE(cache.insert("b", value_of(1), 9));  // evicts "a", whose destructor calls find()
  ASSERT_TRUE(cache.insert("b", std::make_shared<const CallsBack>(&cache), 9));
  EXPECT_TRUE(cache.erase("b"));
  EXPECT_EQ(cache.stats().misses, 2u);
}

// What the stress test stores: enough to check that a key finds its own value, and what it cost.
struct StressValue {
  StressValue(std::atomic<int>* counter, int k, uint64_t n) : live(counter), key(k), bytes(n) {
    ++*live;
  }
  ~StressValue() { --*live; }
  std::atomic<int>* live;
  int key;
  uint64_t bytes;
};

TEST(LruCache, ConcurrentFindAndInsertKeepTheInvariants) {
  constexpr int kThreads = 8, kOpsPerThread = 20000, kKeys = 200;
  constexpr uint64_t kCapacity = 64 * 1024;  // ~1/6 of what all keys would take: many evictions
  std::atomic<int> live{0};
  std::atomic<uint64_t> finds{0}, stored{0}, refused{0}, wrong_values{0};
  {
    LruCache cache(kCapacity);
    const auto key_name = [](int k) { return "key-" + std::to_string(k); };
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937 rng(1234 + t);  // seeded: the same mix of operations every run
        std::uniform_int_distribution<int> key_dist(0, kKeys - 1), op_dist(0, 99);
        std::uniform_int_distribution<uint64_t> size_dist(1, 4096);
        for (int i = 0; i < kOpsPerThread; ++i) {
          const int k = key_dist(rng);
          const int op = op_dist(rng);
          if (op < 60) {
            ++finds;
            const std::shared_ptr<const void> v = cache.find(key_name(k));
            if (v && static_cast<const StressValue*>(v.get())->key != k) ++wrong_values;
          } else if (op < 98) {
            const uint64_t bytes = size_dist(rng);
            const bool ok = cache.insert(
                key_name(k), std::make_shared<const StressValue>(&live, k, bytes), bytes);
            ++(ok ? stored : refused);
          } else if (op < 99) {
            cache.erase(key_name(k));
          } else {  // too big: refused without touching anything
            const bool ok = cache.insert(
                key_name(k), std::make_shared<const StressValue>(&live, k, kCapacity), kCapacity);
            ++(ok ? stored : refused);
          }
        }
      });
    }
    for (std::thread& th : threads) th.join();

    const LruCache::Stats s = cache.stats();
    EXPECT_EQ(wrong_values.load(), 0u);
    EXPECT_LE(s.bytes, kCapacity);
    EXPECT_EQ(s.capacity, kCapacity);
    EXPECT_EQ(s.hits + s.misses, finds.load());
    EXPECT_GT(s.hits, 0u);
    EXPECT_GT(s.evictions, 0u);
    EXPECT_GT(refused.load(), 0u);
    EXPECT_LE(s.evictions, stored.load());
    EXPECT_LE(s.entries, static_cast<uint64_t>(kKeys));
    // Nothing leaked or was lost: the values alive are exactly those the cache holds.
    EXPECT_EQ(live.load(), static_cast<int>(s.entries));

    // Walk every key: the entries found, and their costs, add up to what stats() says.
    uint64_t entries = 0, bytes = 0;
    for (int k = 0; k < kKeys; ++k) {
      const std::string key = key_name(k);
      if (const std::shared_ptr<const void> v = cache.find(key)) {
        const auto* sv = static_cast<const StressValue*>(v.get());
        EXPECT_EQ(sv->key, k);
        ++entries;
        bytes += sv->bytes + key.size();
      }
    }
    const LruCache::Stats after = cache.stats();
    EXPECT_EQ(entries, s.entries);
    EXPECT_EQ(bytes, s.bytes);
    EXPECT_EQ(after.entries, s.entries);
    EXPECT_EQ(after.bytes, s.bytes);
    EXPECT_EQ(after.evictions, s.evictions);
    EXPECT_EQ(after.hits + after.misses, finds.load() + kKeys);
  }
  EXPECT_EQ(live.load(), 0);  // the cache released everything when destroyed
}

}  // namespace
}  // namespace sdserve::cache
