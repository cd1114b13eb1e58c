// The Redis client against a real redis-server started per test (tests/redis_server.h): URL
// parsing, binary-safe round trips, TTL, AUTH/SELECT, and the failure modes the embedding cache
// relies on (server killed, server silent, back-off, no SIGPIPE).
#include "cache/redis_client.h"

#include <gtest/gtest.h>
#include <hiredis/hiredis.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

#include "tests/dripping_server.h"
#include "tests/redis_server.h"

namespace sdserve::cache {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using test::RedisServer;

// ---------------------------------------------------------------------------------------------
// URL parsing

TEST(RedisUrl, Defaults) {
  const RedisEndpoint e = parse_redis_url("redis://cache.internal");
  EXPECT_EQ(e.host, "cache.internal");
  EXPECT_EQ(e.port, 6379);
  EXPECT_EQ(e.db, 0);
  EXPECT_EQ(e.username, "");
  EXPECT_EQ(e.password, "");
  EXPECT_EQ(parse_redis_url("redis://h/").db, 0);
  EXPECT_EQ(parse_redis_url("REDIS://h").host, "h");
}

TEST(RedisUrl, PortAndDb) {
  const RedisEndpoint e = parse_redis_url("redis://10.0.0.7:6380/3");
  EXPECT_EQ(e.host, "10.0.0.7");
  EXPECT_EQ(e.port, 6380);
  EXPECT_EQ(e.db, 3);
  EXPECT_EQ(parse_redis_url("redis://h:65535").port, 65535);
}

TEST(RedisUrl, Ipv6HostLosesItsBrackets) {
  const RedisEndpoint e = parse_redis_url("redis://[::1]:7000/2");
  EXPECT_EQ(e.host, "::1");
  EXPECT_EQ(e.port, 7000);
  EXPECT_EQ(e.db, 2);
}

TEST(RedisUrl, PasswordOnly) {
  const RedisEndpoint e = parse_redis_url("redis://:pw@h:1/2");
  EXPECT_EQ(e.username, "");
  EXPECT_EQ(e.password, "pw");
  EXPECT_EQ(e.host, "h");
  EXPECT_EQ(e.port, 1);
  EXPECT_EQ(e.db, 2);
}

TEST(RedisUrl, UserAndPassword) {
  const RedisEndpoint e = parse_redis_url("redis://alice:s3cret@h");
  EXPECT_EQ(e.username, "alice");
  EXPECT_EQ(e.password, "s3cret");
}

TEST(RedisUrl, PercentDecodesUserAndPassword) {
  // '+' is a literal plus in a URL's userinfo (only forms turn it into a space).
  const RedisEndpoint e = parse_redis_url("redis://b%C3%B6b%3A1:a+b%2Fc%40d%3A%25@h:1");
  EXPECT_EQ(e.username,
            "b\xC3\xB6"
            "b:1");
  EXPECT_EQ(e.password, "a+b/c@d:%");
  EXPECT_EQ(e.host, "h");
}

void expect_refused(const std::string& url, const std::string& expected) {
  try {
    parse_redis_url(url);
    ADD_FAILURE() << url << " was accepted";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    EXPECT_EQ(message.rfind("redis_url: ", 0), 0u) << message;
    EXPECT_NE(message.find(expected), std::string::npos)
        << url << " -> '" << message << "', expected it to mention '" << expected << "'";
  }
}

TEST(RedisUrl, Refusals) {
  expect_refused("rediss://h:6380", "TLS is not supported");
  expect_refused("http://h:6379", "scheme 'http' is not supported");
  expect_refused("redis://h:abc", "port 'abc' is not a number");
  expect_refused("redis://h:abc/1", "port 'abc' is not a number");
  expect_refused("redis://h:", "port is empty");
  expect_refused("redis://h:0", "port 0 is out of range 1..65535");
  expect_refused("redis://h:70000", "port 70000 is out of range 1..65535");
  expect_refused("redis://h:99999999999999999999", "out of range");
  expect_refused("redis://h/x", "database 'x' is not a non-negative number");
  expect_refused("redis://h/-1", "database '-1'");
  expect_refused("redis://h/1/2", "database '1/2'");
  expect_refused("redis://h/99999999999", "database");
  expect_refused("garbage", "not a valid URL");
  expect_refused("", "not a valid URL");
  expect_refused("redis://a b", "not a valid URL");
  expect_refused("redis://", "no host");
  expect_refused("redis:h", "no host");
  expect_refused("redis://h/0?timeout=1", "query parameters are not supported");
  expect_refused("redis://h/0#x", "fragment");
  expect_refused("redis://hunter2@h", "a user without a password");
}

TEST(RedisUrl, MessagesNeverShowThePassword) {
  for (const std::string url :
       {"redis://u:hunter2@h:0", "redis://:hunter2@h/x", "redis://hunter2@h", "rediss://:hunter2@h",
        "redis://:hunter2@h a"}) {
    try {
      parse_redis_url(url);
      ADD_FAILURE() << url << " was accepted";
    } catch (const std::invalid_argument& error) {
      EXPECT_EQ(std::string(error.what()).find("hunter2"), std::string::npos) << error.what();
    }
  }
}

TEST(RedisErrorKind, LabelsAreStable) {
  EXPECT_EQ(to_string(RedisErrorKind::kConnect), "connect");
  EXPECT_EQ(to_string(RedisErrorKind::kTimeout), "timeout");
  EXPECT_EQ(to_string(RedisErrorKind::kIo), "io");
  EXPECT_EQ(to_string(RedisErrorKind::kProtocol), "protocol");
  EXPECT_EQ(to_string(RedisErrorKind::kReply), "reply");
  EXPECT_EQ(to_string(RedisErrorKind::kDown), "down");
  const RedisError error(RedisErrorKind::kTimeout, "GET took too long");
  EXPECT_EQ(error.kind, RedisErrorKind::kTimeout);
  EXPECT_STREQ(error.what(), "redis timeout: GET took too long");
}

// ---------------------------------------------------------------------------------------------
// Against a real server

// Counts state transitions; the callback runs on whichever thread saw the change.
struct Transitions {
  std::mutex mutex;
  int ups = 0;
  int downs = 0;
  std::string last_reason;

  RedisClient::StateCallback callback() {
    return [this](bool up, const std::string& reason) {
      std::lock_guard<std::mutex> lock(mutex);
      (up ? ups : downs)++;
      last_reason = reason;
    };
  }
  int up_count() {
    std::lock_guard<std::mutex> lock(mutex);
    return ups;
  }
  int down_count() {
    std::lock_guard<std::mutex> lock(mutex);
    return downs;
  }
  std::string reason() {
    std::lock_guard<std::mutex> lock(mutex);
    return last_reason;
  }
};

RedisOptions options_for(const std::string& url, milliseconds backoff = milliseconds(300)) {
  RedisOptions options;
  options.url = url;
  options.timeout = milliseconds(50);
  options.backoff_min = backoff;
  options.backoff_max = backoff * 8;
  return options;
}

// Runs `call`, expects a RedisError, returns its kind.
template <typename Call>
RedisErrorKind error_kind_of(Call&& call) {
  try {
    call();
  } catch (const RedisError& error) {
    return error.kind;
  }
  ADD_FAILURE() << "no RedisError was thrown";
  return RedisErrorKind::kDown;
}

std::string random_bytes(size_t size, uint32_t seed) {
  std::mt19937 generator(seed);
  std::string bytes(size, '\0');
  for (char& byte : bytes) byte = static_cast<char>(generator() & 0xff);
  return bytes;
}

double elapsed_ms(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - since)
      .count();
}

// Writes through a plain hiredis connection, for data the client cannot create (a list).
void raw_command(const RedisServer& server, const std::string& command) {
  std::unique_ptr<redisContext, decltype(&redisFree)> context(
      redisConnect("127.0.0.1", server.port()), &redisFree);
  ASSERT_TRUE(context && !context->err);
  auto* reply = static_cast<redisReply*>(redisCommand(context.get(), command.c_str()));
  ASSERT_NE(reply, nullptr);
  freeReplyObject(reply);
}

class RedisClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!RedisServer::available()) GTEST_SKIP() << test::kRedisServerBinary << " is not installed";
  }
};

TEST_F(RedisClientTest, BinaryValuesRoundTrip) {
  RedisServer server;
  Transitions transitions;
  RedisClient client(options_for(server.url()), transitions.callback());
  EXPECT_FALSE(client.up()) << "nothing has been tried yet";

  const std::string key("emb\0key\xff", 8);
  const std::string value("\0a\0\0b\r\n$-1\r\n\0", 13);
  client.set(key, value, seconds(60));
  EXPECT_TRUE(client.up());
  EXPECT_EQ(transitions.up_count(), 1);
  EXPECT_EQ(transitions.reason(),
            "connected to 127.0.0.1:" + std::to_string(server.port()) + " db 0");
  EXPECT_EQ(client.get(key), value);
  EXPECT_EQ(client.get(std::string("emb\0key", 7)), std::nullopt) << "the key is binary too";

  const std::string big = random_bytes(1 << 20, 7);  // 1 MiB, with NULs
  client.set("big", big, seconds(60));
  const auto got = client.get("big");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->size(), big.size());
  EXPECT_TRUE(*got == big);

  client.set("empty", "", seconds(60));
  EXPECT_EQ(client.get("empty"), std::string());
  EXPECT_EQ(transitions.up_count(), 1) << "one transition, not one per request";
  EXPECT_EQ(transitions.down_count(), 0);
}

TEST_F(RedisClientTest, MissingKeyIsNullopt) {
  RedisServer server;
  RedisClient client(options_for(server.url()));
  EXPECT_EQ(client.get("no-such-key"), std::nullopt);
  EXPECT_TRUE(client.up());
}

TEST_F(RedisClientTest, GetManyMixesPresentAndMissing) {
  RedisServer server;
  RedisClient client(options_for(server.url()));
  client.set("a", std::string("A\0", 2), seconds(60));
  client.set("c", "C", seconds(60));
  const auto values = client.get_many({"a", "b", "c", "d", "a"});
  ASSERT_EQ(values.size(), 5u);
  EXPECT_EQ(values[0], std::string("A\0", 2));
  EXPECT_EQ(values[1], std::nullopt);
  EXPECT_EQ(values[2], "C");
  EXPECT_EQ(values[3], std::nullopt);
  EXPECT_EQ(values[4], std::string("A\0", 2));
  EXPECT_TRUE(client.get_many({}).empty());

  std::vector<std::string> many;
  for (int i = 0; i < 1000; ++i) many.push_back("k" + std::to_string(i));
  const auto all_missing = client.get_many(many);
  EXPECT_EQ(all_missing.size(), many.size());
  for (const auto& value : all_missing) EXPECT_EQ(value, std::nullopt);
}

TEST_F(RedisClientTest, LatencyCallbackSeesEachRoundTrip) {
  RedisServer server;
  std::vector<std::pair<std::string, std::chrono::nanoseconds>> seen;
  RedisClient client(options_for(server.url()), {},
                     [&](std::string_view command, std::chrono::nanoseconds elapsed) {
                       seen.emplace_back(std::string(command), elapsed);
                     });
  client.set("k", "v", seconds(60));
  client.get("k");
  client.get_many({"k", "x"});
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0].first, "set");
  EXPECT_EQ(seen[1].first, "get");
  EXPECT_EQ(seen[2].first, "get_many");
  for (const auto& [command, elapsed] : seen) {
    EXPECT_GT(elapsed.count(), 0) << command;
    EXPECT_LT(elapsed, std::chrono::milliseconds(50)) << command;
  }
}

TEST_F(RedisClientTest, TtlExpires) {
  RedisServer server;
  RedisClient client(options_for(server.url()));
  client.set("short", "lived", seconds(1));
  EXPECT_EQ(client.get("short"), "lived");
  std::this_thread::sleep_for(milliseconds(1600));
  EXPECT_EQ(client.get("short"), std::nullopt);
  EXPECT_THROW(client.set("k", "v", seconds(0)), std::invalid_argument);
}

TEST_F(RedisClientTest, SelectsTheDatabase) {
  RedisServer server;
  RedisClient db1(options_for(server.url() + "/1"));
  RedisClient db2(options_for(server.url() + "/2"));
  db1.set("k", "one", seconds(60));
  EXPECT_EQ(db1.get("k"), "one");
  EXPECT_EQ(db2.get("k"), std::nullopt);
}

TEST_F(RedisClientTest, PasswordIsSentOnConnect) {
  const std::string password = "p@ss/w+rd";  // percent-encoded in the URL
  RedisServer server(password);
  RedisClient client(options_for(server.url(":p%40ss%2Fw+rd@")));
  client.set("k", "v", seconds(60));
  EXPECT_EQ(client.get("k"), "v");
  EXPECT_TRUE(client.up());

  // Redis 7's ACL: requirepass is the password of the user "default".
  RedisClient with_user(options_for(server.url("default:p%40ss%2Fw+rd@")));
  EXPECT_EQ(with_user.get("k"), "v");
}

// A refused AUTH is a connection failure (kConnect): the connection is unusable until the
// configuration is fixed, so the client goes down and backs off like for any other.
TEST_F(RedisClientTest, WrongPasswordIsAConnectFailure) {
  RedisServer server("right");
  Transitions transitions;
  RedisClient client(options_for(server.url(":wrong@")), transitions.callback());
  try {
    client.get("k");
    ADD_FAILURE() << "a wrong password was accepted";
  } catch (const RedisError& error) {
    EXPECT_EQ(error.kind, RedisErrorKind::kConnect) << error.what();
    EXPECT_NE(std::string(error.what()).find("AUTH refused"), std::string::npos) << error.what();
    EXPECT_EQ(std::string(error.what()).find("wrong"), std::string::npos) << "no password shown";
  }
  EXPECT_FALSE(client.up());
  EXPECT_EQ(transitions.down_count(), 1);
  EXPECT_EQ(error_kind_of([&] { client.get("k"); }), RedisErrorKind::kDown);
}

TEST_F(RedisClientTest, ServerKilledThenRestarted) {
  RedisServer server;
  Transitions transitions;
  const milliseconds backoff(300);
  RedisClient client(options_for(server.url(), backoff), transitions.callback());
  client.set("k", "v", seconds(60));
  ASSERT_TRUE(client.up());
  ASSERT_EQ(transitions.up_count(), 1);

  server.stop(SIGKILL);
  const RedisErrorKind kind = error_kind_of([&] { client.get("k"); });
  const auto failed_at = std::chrono::steady_clock::now();
  EXPECT_TRUE(kind == RedisErrorKind::kIo || kind == RedisErrorKind::kConnect ||
              kind == RedisErrorKind::kTimeout)
      << to_string(kind);
  EXPECT_FALSE(client.up());
  EXPECT_EQ(transitions.down_count(), 1);

  // Within the back-off: kDown at once, no network, no new transition.
  for (int i = 0; i < 20; ++i) {
    const auto start = std::chrono::steady_clock::now();
    try {
      if (i % 2 == 0) {
        client.get("k");
      } else {
        client.set("k", "v", seconds(60));
      }
      ADD_FAILURE() << "a call succeeded during the back-off";
    } catch (const RedisError& error) {
      EXPECT_EQ(error.kind, RedisErrorKind::kDown) << error.what();
      EXPECT_NE(std::string(error.what()).find("next attempt in"), std::string::npos);
    }
    EXPECT_LT(elapsed_ms(start), 5.0);
  }
  EXPECT_EQ(transitions.down_count(), 1);
  EXPECT_EQ(transitions.up_count(), 1);

  server.restart();
  std::this_thread::sleep_until(failed_at + backoff + milliseconds(50));
  EXPECT_EQ(client.get("k"), std::nullopt) << "the restarted server has no data";
  EXPECT_TRUE(client.up());
  EXPECT_EQ(transitions.up_count(), 2);
  EXPECT_EQ(transitions.down_count(), 1);
}

// A connection closed while idle (here a clean restart) is reopened once, without going down.
TEST_F(RedisClientTest, StaleConnectionIsReopenedOnce) {
  RedisServer server;
  Transitions transitions;
  RedisClient client(options_for(server.url()), transitions.callback());
  client.set("k", "v", seconds(60));
  server.stop(SIGTERM);
  server.restart();
  EXPECT_EQ(client.get("k"), std::nullopt);
  EXPECT_TRUE(client.up());
  EXPECT_EQ(transitions.down_count(), 0);
  EXPECT_EQ(transitions.up_count(), 1);
}

TEST_F(RedisClientTest, BackoffDoublesUpToItsMaximum) {
  const int port = test::free_loopback_port();  // nothing listens there
  RedisOptions options = options_for("redis://127.0.0.1:" + std::to_string(port));
  options.backoff_min = milliseconds(200);
  options.backoff_max = milliseconds(400);
  Transitions transitions;
  RedisClient client(options, transitions.callback());

  EXPECT_EQ(error_kind_of([&] { client.get("k"); }), RedisErrorKind::kConnect);
  std::this_thread::sleep_for(milliseconds(250));  // past 200 ms: tries, fails, waits 400
  EXPECT_EQ(error_kind_of([&] { client.get("k"); }), RedisErrorKind::kConnect);
  std::this_thread::sleep_for(milliseconds(250));
  EXPECT_EQ(error_kind_of([&] { client.get("k"); }), RedisErrorKind::kDown);
  std::this_thread::sleep_for(milliseconds(250));  // past 400 ms: tries, fails, waits 400 (cap)
  EXPECT_EQ(error_kind_of([&] { client.get("k"); }), RedisErrorKind::kConnect);
  std::this_thread::sleep_for(milliseconds(450));
  EXPECT_EQ(error_kind_of([&] { client.get("k"); }), RedisErrorKind::kConnect);
  EXPECT_EQ(transitions.down_count(), 1);
  EXPECT_EQ(transitions.up_count(), 0);
}

// A listening socket that never accepts: the kernel completes the handshake, nobody answers.
class SilentListener {
 public:
  SilentListener() : fd_(test::listen_on_loopback(&port_)) {}
  ~SilentListener() { ::close(fd_); }
  int port() const { return port_; }

 private:
  int port_ = 0;  // before fd_: listen_on_loopback() sets it while fd_ is initialised
  int fd_ = -1;
};

TEST_F(RedisClientTest, SilentServerTimesOut) {
  SilentListener listener;
  Transitions transitions;
  RedisClient client(options_for("redis://127.0.0.1:" + std::to_string(listener.port())),
                     transitions.callback());
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(error_kind_of([&] { client.get("k"); }), RedisErrorKind::kTimeout);
  EXPECT_LT(elapsed_ms(start), 500.0);
  EXPECT_GE(elapsed_ms(start), 45.0) << "it did wait for the timeout";
  EXPECT_FALSE(client.up());
  EXPECT_EQ(transitions.down_count(), 1);
}

// A server that answers, but one byte every 40 ms: each read(2) returns at once, so only a
// deadline on the whole command stops it (a per-read timeout let three one-step jobs take 82 s).
// Every command type gets the 50 ms deadline; then the back-off keeps calls off the server.
TEST(RedisClientDeadline, DrippingServerHitsTheWholeCommandsDeadline) {
  test::DrippingServer server(milliseconds(40), "$5\r\nhello\r\n");  // 11 bytes: 440 ms
  Transitions transitions;
  RedisClient client(options_for(server.url(), milliseconds(100)), transitions.callback());
  const auto timed = [&](auto&& call) {
    const auto start = std::chrono::steady_clock::now();
    EXPECT_EQ(error_kind_of(call), RedisErrorKind::kTimeout);
    const double ms = elapsed_ms(start);
    EXPECT_GE(ms, 45.0) << "it waited for the deadline";
    EXPECT_LT(ms, 250.0) << "50 ms deadline + one 40 ms drip + scheduling slack";
    EXPECT_FALSE(client.up());
  };
  timed([&] { client.get("k"); });
  // Within the back-off a call fails at once, without touching the server.
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(error_kind_of([&] { client.get("k"); }), RedisErrorKind::kDown);
  EXPECT_LT(elapsed_ms(start), 20.0);
  EXPECT_EQ(server.connections(), 1);
  std::this_thread::sleep_for(milliseconds(400));  // past the (doubled) back-off
  timed([&] { client.get_many({"a", "b", "c"}); });
  std::this_thread::sleep_for(milliseconds(800));
  timed([&] { client.set("k", "v", seconds(60)); });
  EXPECT_EQ(server.connections(), 3) << "each timeout dropped its connection";
}

// A paused server mid-session: the timed-out GET's connection is dropped, so its late reply can
// never be taken for the answer to a later command.
TEST_F(RedisClientTest, PausedServerTimesOutAndRecovers) {
  RedisServer server;
  Transitions transitions;
  const milliseconds backoff(100);
  RedisClient client(options_for(server.url(), backoff), transitions.callback());
  client.set("a", "A", seconds(60));
  client.set("b", "B", seconds(60));

  server.pause();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(error_kind_of([&] { client.get("a"); }), RedisErrorKind::kTimeout);
  EXPECT_LT(elapsed_ms(start), 500.0);
  EXPECT_FALSE(client.up());
  server.resume();

  std::this_thread::sleep_for(backoff + milliseconds(50));
  EXPECT_EQ(client.get("b"), "B");
  EXPECT_EQ(client.get("a"), "A");
  EXPECT_TRUE(client.up());
  EXPECT_EQ(transitions.down_count(), 1);
  EXPECT_EQ(transitions.up_count(), 2);
}

// An error reply (a key of another type) fails that call only: the connection stays up and in
// sync, including in a pipeline.
TEST_F(RedisClientTest, ErrorReplyKeepsTheConnection) {
  RedisServer server;
  Transitions transitions;
  RedisClient client(options_for(server.url()), transitions.callback());
  client.set("s", "S", seconds(60));
  raw_command(server, "RPUSH list x");

  EXPECT_EQ(error_kind_of([&] { client.get("list"); }), RedisErrorKind::kReply);
  EXPECT_TRUE(client.up());
  EXPECT_EQ(error_kind_of([&] { client.get_many({"s", "list", "s"}); }), RedisErrorKind::kReply);
  EXPECT_EQ(client.get_many({"s", "missing"}),
            (std::vector<std::optional<std::string>>{"S", std::nullopt}));
  EXPECT_EQ(transitions.down_count(), 0);
  EXPECT_EQ(transitions.up_count(), 1);
}

// hiredis writes with write(2): without the client's guard, a large SET to a server that died
// raises SIGPIPE and kills the process.
TEST_F(RedisClientTest, ServerDyingDuringALargeSetDoesNotRaiseSigpipe) {
  RedisServer server;
  RedisOptions options = options_for(server.url());
  options.timeout = milliseconds(1000);
  RedisClient client(options);
  const std::string big = random_bytes(4 << 20, 1);
  client.set("big", "small first, to open the connection", seconds(60));
  server.stop(SIGKILL);
  const RedisErrorKind kind = error_kind_of([&] { client.set("big", big, seconds(60)); });
  EXPECT_TRUE(kind == RedisErrorKind::kIo || kind == RedisErrorKind::kConnect) << to_string(kind);
}

TEST_F(RedisClientTest, ThreadsShareOneClient) {
  RedisServer server;
  RedisOptions options = options_for(server.url());
  options.timeout = milliseconds(2000);  // a loaded 2-core CI machine, 8 threads
  RedisClient client(options);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) {
        const std::string key = "t" + std::to_string(t) + ":" + std::to_string(i);
        const std::string value = random_bytes(100 + i, t * 1000 + i);
        client.set(key, value, seconds(60));
        if (client.get(key) != value) ++wrong;
        const auto both = client.get_many({key, "missing"});
        if (both.size() != 2 || both[0] != value || both[1]) ++wrong;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(wrong.load(), 0);
}

// Many threads through crashes and restarts: every call returns or throws RedisError, and the
// callback reports alternating transitions, one each.
TEST_F(RedisClientTest, ThreadsThroughServerCrashes) {
  RedisServer server;
  std::mutex mutex;
  std::vector<bool> states;
  const milliseconds backoff(50);
  RedisOptions options = options_for(server.url(), backoff);
  options.backoff_max = backoff;
  RedisClient client(options, [&](bool up, const std::string&) {
    std::lock_guard<std::mutex> lock(mutex);
    states.push_back(up);
  });
  std::atomic<bool> stop{false};
  std::atomic<int> successes{0}, failures{0}, wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const std::string key = "t" + std::to_string(t);
      for (int i = 0; !stop; ++i) {
        try {
          const std::string value = std::to_string(i);
          client.set(key, value, seconds(60));
          const auto got = client.get(key);
          // A restart between the two loses the value; anything else is a desync.
          if (got && *got != value) ++wrong;
          ++successes;
        } catch (const RedisError&) {
          ++failures;
        }
      }
    });
  }
  for (int crash = 0; crash < 3; ++crash) {
    std::this_thread::sleep_for(milliseconds(200));
    server.stop(SIGKILL);
    std::this_thread::sleep_for(milliseconds(100));
    server.restart();
  }
  std::this_thread::sleep_for(milliseconds(300));
  stop = true;
  for (auto& thread : threads) thread.join();

  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(successes.load(), 0);
  EXPECT_GT(failures.load(), 0);
  EXPECT_TRUE(client.up());
  std::lock_guard<std::mutex> lock(mutex);
  ASSERT_FALSE(states.empty());
  for (size_t i = 0; i < states.size(); ++i) EXPECT_EQ(states[i], i % 2 == 0) << "transition " << i;
  EXPECT_EQ(states.size(), 7u) << "up, then down and up again per crash";
}

TEST(RedisClientOptions, RejectsBadOptionsAtConstruction) {
  RedisOptions options;
  options.url = "rediss://h";
  EXPECT_THROW(RedisClient{options}, std::invalid_argument);
  options.url = "redis://h";
  options.timeout = milliseconds(0);
  EXPECT_THROW(RedisClient{options}, std::invalid_argument);
  options.timeout = milliseconds(50);
  options.backoff_max = milliseconds(10);
  EXPECT_THROW(RedisClient{options}, std::invalid_argument);
}

}  // namespace
}  // namespace sdserve::cache
