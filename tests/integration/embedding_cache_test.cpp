// The prompt-embedding cache through the real service: the in-process tier, and Redis shared by
// two `sdserve serve` processes, with a real redis-server the test starts (and kills, and fills
// with garbage). Redis is a bonus: whatever happens to it, jobs succeed.
#include <signal.h>

#include "pipeline/image.h"
#include "tests/dripping_server.h"
#include "tests/integration/harness.h"
#include "tests/redis_server.h"

namespace sdserve::itest {
namespace {

const std::string kLookups = "sdserve_embedding_cache_lookups_total";
std::string lookups(const std::string& tier, const std::string& result) {
  return kLookups + "{result=\"" + result + "\",tier=\"" + tier + "\"}";
}

// The pixels of a PNG (its text chunks name the prompt as spelt, so compare pixels).
std::vector<uint8_t> pixels(const std::string& png) {
  return pipeline::decode_png(std::vector<uint8_t>(png.begin(), png.end())).pixels;
}

// Runs one job to the end; returns its first image's PNG bytes.
std::string run_job(int port, const std::string& prompt, uint64_t seed = 1) {
  const auto job = submit(port, small_job(prompt, 2, seed));
  const std::string id = job.value("id", "");
  EXPECT_EQ(wait_final(port, id), "succeeded") << prompt;
  return get(port, "/v1/jobs/" + id + "/images/0").body;
}

// redis-cli against the test's server: its output.
std::string redis_cli(const test::RedisServer& redis, std::vector<std::string> args) {
  std::vector<std::string> argv = {"/usr/bin/redis-cli", "-p", std::to_string(redis.port())};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_program(argv, {}, seconds(10)).second;
}

std::vector<std::string> cached_keys(const test::RedisServer& redis) {
  std::istringstream in(redis_cli(redis, {"--scan", "--pattern", "sdserve:emb:*"}));
  std::vector<std::string> keys;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) keys.push_back(line);
  return keys;
}

// The service writes to Redis on a background thread: wait for `n` keys.
bool wait_keys(const test::RedisServer& redis, size_t n) {
  for (int i = 0; i < 200; ++i) {
    if (cached_keys(redis).size() >= n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

#define REQUIRE_REDIS() \
  if (!test::RedisServer::available()) GTEST_SKIP() << "redis-server is not installed"

TEST(EmbeddingCacheTest, RepeatedPromptsHitMemoryAndGiveTheSamePixels) {
  ServerProcess server;
  const int port = server.port();
  const auto first = run_job(port, "a red fox in the snow");
  EXPECT_EQ(metric(port, lookups("memory", "hit")), 0);
  EXPECT_EQ(metric(port, lookups("memory", "miss")), 2);  // the prompt and the empty negative
  EXPECT_EQ(metric(port, "sdserve_embedding_cache_entries"), 2);
  EXPECT_GT(metric(port, "sdserve_embedding_cache_bytes"), 0);
  // The same prompt spelt differently (CLIP lower-cases and folds spaces) hits, and an image
  // from cached embeddings is the image from encoded ones, byte for byte.
  const auto second = run_job(port, "A  Red fox IN the   snow");
  EXPECT_EQ(metric(port, lookups("memory", "hit")), 2);
  EXPECT_TRUE(pixels(second) == pixels(first));
  // None configured: no series at all (an alert on 0 would fire on every Redis-less service).
  EXPECT_EQ(get(port, "/metrics").body.find("\nsdserve_redis_up"), std::string::npos);
  EXPECT_GE(metric(port, "sdserve_text_encode_seconds_count"), 1);
}

TEST(EmbeddingCacheTest, HostMemoryTierHitsAndGivesTheSamePixels) {
  ServerProcess server({"--embedding-cache-on-host", "true"});
  const int port = server.port();
  const auto first = run_job(port, "a blue heron");
  // The bytes are written in the background.
  ASSERT_TRUE(wait_metric(port, "sdserve_embedding_cache_entries", 2));
  const auto second = run_job(port, "a blue heron");
  EXPECT_EQ(metric(port, lookups("memory", "hit")), 2);
  EXPECT_TRUE(pixels(second) == pixels(first));
}

TEST(EmbeddingCacheTest, TwoServersShareOneRedis) {
  REQUIRE_REDIS();
  test::RedisServer redis;
  ServerProcess a({"--redis-url", redis.url()});
  const auto from_a = run_job(a.port(), "a lighthouse at dusk");
  ASSERT_TRUE(wait_keys(redis, 2));
  EXPECT_EQ(metric(a.port(), "sdserve_redis_up"), 1);
  EXPECT_EQ(metric(a.port(), lookups("redis", "miss")), 2);
  // A second replica finds the first one's embeddings in Redis.
  ServerProcess b({"--redis-url", redis.url()});
  const auto from_b = run_job(b.port(), "a lighthouse at dusk");
  EXPECT_EQ(metric(b.port(), lookups("redis", "hit")), 2);
  EXPECT_EQ(metric(b.port(), "sdserve_text_encode_seconds_count"), 0);
  EXPECT_TRUE(pixels(from_b) == pixels(from_a));  // same pixels from Redis as from the encoder
  // Keys are digests; prompts are not stored as keys.
  for (const auto& k : cached_keys(redis)) EXPECT_EQ(k.find("lighthouse"), std::string::npos);
}

TEST(EmbeddingCacheTest, JobsSucceedWhileRedisIsDownAndItRecovers) {
  REQUIRE_REDIS();
  test::RedisServer redis;
  ServerProcess server({"--redis-url", redis.url()});
  const int port = server.port();
  run_job(port, "before the outage");
  EXPECT_EQ(metric(port, "sdserve_redis_up"), 1);
  redis.stop(SIGKILL);
  run_job(port, "during the outage");
  EXPECT_TRUE(wait_metric(port, "sdserve_redis_up", 0));
  EXPECT_TRUE(server.wait_log("redis is down"));
  run_job(port, "still during the outage");
  redis.restart();
  // After the back-off a lookup reconnects; jobs keep succeeding meanwhile.
  bool up = false;
  for (int i = 0; i < 40 && !up; ++i) {
    run_job(port, "after the outage " + std::to_string(i));
    up = metric(port, "sdserve_redis_up") == 1;
  }
  EXPECT_TRUE(up);
  EXPECT_TRUE(server.wait_log("redis is up"));
}

// A Redis that accepts and answers, one byte every 40 ms: each lookup costs its 50 ms deadline
// (redis_timeout_ms) at most, then the back-off keeps jobs off it. With a per-read timeout three
// one-step jobs took 82 s; now well under a second each.
TEST(EmbeddingCacheTest, ADrippingRedisCostsALookupItsDeadlineOnly) {
  // A 400-byte value, dripped: 16 s a reply, and every read(2) returns at once.
  test::DrippingServer redis(std::chrono::milliseconds(40),
                             "$400\r\n" + std::string(400, 'x') + "\r\n");
  ServerProcess server({"--redis-url", redis.url()});
  const int port = server.port();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 3; ++i) run_job(port, "a slow dependency " + std::to_string(i));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(s, 15.0) << "three one-step jobs beside a dripping Redis";
  EXPECT_GE(redis.connections(), 1);
  EXPECT_EQ(metric(port, "sdserve_redis_up"), 0);
  EXPECT_TRUE(server.wait_log("timed out after 50 ms"));
}

TEST(EmbeddingCacheTest, GarbageInRedisIsIgnoredAndReplaced) {
  REQUIRE_REDIS();
  test::RedisServer redis;
  std::string from_a;
  {
    ServerProcess a({"--redis-url", redis.url()});
    from_a = run_job(a.port(), "a quiet harbour");
    ASSERT_TRUE(wait_keys(redis, 2));
  }
  // Overwrite every cached value: one with garbage, one with a header of a future version.
  const auto keys = cached_keys(redis);
  ASSERT_EQ(keys.size(), 2u);
  redis_cli(redis, {"SET", keys[0], "not an embedding"});
  redis_cli(redis, {"SET", keys[1], "SDEM\x02\x01\x01\x01rest"});  // format version 0x01010102
  ServerProcess b({"--redis-url", redis.url()});
  const auto from_b = run_job(b.port(), "a quiet harbour");
  EXPECT_TRUE(pixels(from_b) == pixels(from_a));  // encoded again, not decoded from garbage
  EXPECT_EQ(metric(b.port(), "sdserve_redis_corrupt_values_total"), 2);
  EXPECT_EQ(metric(b.port(), lookups("redis", "hit")), 0);
  // The encoder's values replace the garbage.
  for (int i = 0; i < 100; ++i) {
    if (redis_cli(redis, {"GET", keys[0]}).rfind("SDEM", 0) == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(redis_cli(redis, {"GET", keys[0]}).rfind("SDEM", 0), 0u);
}

TEST(EmbeddingCacheTest, RedisEntriesExpireAfterTheTtl) {
  REQUIRE_REDIS();
  test::RedisServer redis;
  ServerProcess server({"--redis-url", redis.url(), "--redis-ttl-s", "2"});
  run_job(server.port(), "a short-lived prompt");
  ASSERT_TRUE(wait_keys(redis, 2));
  const auto keys = cached_keys(redis);
  const auto ttl = redis_cli(redis, {"TTL", keys[0]});
  EXPECT_TRUE(ttl.rfind("1", 0) == 0 || ttl.rfind("2", 0) == 0) << ttl;
  std::this_thread::sleep_for(std::chrono::milliseconds(2600));
  EXPECT_TRUE(cached_keys(redis).empty());
}

TEST(EmbeddingCacheTest, BadRedisUrlStopsStartUpNamingIt) {
  const auto [status, out] = run_to_exit({"--redis-url", "rediss://127.0.0.1:6379"});
  EXPECT_EQ(status, 2);
  EXPECT_NE(out.find("redis_url"), std::string::npos) << out;
}

TEST(EmbeddingCacheTest, RedisPasswordNeverReachesTheLog) {
  REQUIRE_REDIS();
  test::RedisServer redis("s3cret+pw");
  ServerProcess server({"--redis-url", redis.url(":s3cret%2Bpw@"), "--log-level", "debug"});
  run_job(server.port(), "a secret garden");
  EXPECT_EQ(metric(server.port(), "sdserve_redis_up"), 1);
  EXPECT_EQ(server.log().find("s3cret"), std::string::npos) << server.log();
}

}  // namespace
}  // namespace sdserve::itest
