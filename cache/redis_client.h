// A small synchronous Redis client for the embedding cache: GET, pipelined GETs and SET with a
// TTL over one hiredis connection, with short timeouts and a back-off so that a slow or absent
// Redis costs a request at most one timeout and then nothing until the back-off has passed
// (a cache that is down must never make generation slower than no cache at all).
//
// Thread safety: RedisClient is thread-safe; one mutex serialises the commands of all threads on
// its single connection. parse_redis_url and to_string are pure.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

struct redisContext;

namespace sdserve::cache {

struct RedisEndpoint {
  std::string host = "127.0.0.1";
  int port = 6379;
  std::string username, password;  // empty username with a password: AUTH password
  int db = 0;
};

// redis://[[user]:password@]host[:port][/db], user and password percent-decoded. Throws
// std::invalid_argument("redis_url: ...") naming what is wrong (rediss:// says TLS is not
// supported). The message never repeats the URL, which may hold a password.
RedisEndpoint parse_redis_url(const std::string& url);

// kDown: the client is in its back-off after a failure and made no attempt.
enum class RedisErrorKind { kConnect, kTimeout, kIo, kProtocol, kReply, kDown };

// "connect", "timeout", "io", "protocol", "reply", "down": stable, for a Prometheus label.
std::string to_string(RedisErrorKind kind);

class RedisError : public std::runtime_error {
 public:
  RedisError(RedisErrorKind kind, const std::string& what);
  RedisErrorKind kind;
};

struct RedisOptions {
  std::string url;  // see parse_redis_url
  // Connecting, and each command as a whole (every write and read of it, however the server
  // paces its reply): past it the command fails as kTimeout and the connection is dropped.
  std::chrono::milliseconds timeout{50};
  // After a failure no attempt is made for backoff_min, doubling per further failure up to
  // backoff_max; a success resets it.
  std::chrono::milliseconds backoff_min{100}, backoff_max{10000};
};

// One lazily opened connection. What fails how:
// - connect refused / unreachable / AUTH or SELECT refused: kConnect; timeouts (connect or
//   command): kTimeout; the connection breaking mid-command: kIo; an unparsable reply: kProtocol.
//   Each drops the connection and starts the back-off (the client is "down"); calls during the
//   back-off throw kDown at once without touching the network. The next success makes it "up".
// - an error reply to a command (e.g. WRONGTYPE): kReply, but the connection is healthy and stays
//   up, so one odd key cannot take the cache down for everyone.
// A broken connection that had been idle (EOF or reset on a reused connection, e.g. a server
// restart or an idle timeout) is reopened and the command retried once before it counts as down;
// GET and SET are idempotent.
class RedisClient {
 public:
  // Called once per transition (never per request), with the client's lock held so transitions
  // arrive in order: it must not call the client's commands (up() is fine), nor take a lock that
  // is held around them. `reason` is "connected to 127.0.0.1:6379 db 0" or the failure, e.g.
  // "redis timeout: GET on 127.0.0.1:6379 timed out after 50 ms".
  using StateCallback = std::function<void(bool up, const std::string& reason)>;
  // Called after each command round trip that got a reply (including error replies), outside the
  // lock, with the command ("get", "get_many", "set") and the network time (not lock waiting).
  using LatencyCallback = std::function<void(std::string_view command, std::chrono::nanoseconds)>;

  // Throws std::invalid_argument for a bad URL or options; connects on first use, not here.
  explicit RedisClient(RedisOptions options, StateCallback on_state = {},
                       LatencyCallback on_latency = {});
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // nullopt: no such key. Keys and values are binary-safe.
  std::optional<std::string> get(const std::string& key);
  // All keys in one round trip (pipelined); the result has one entry per key, in order.
  std::vector<std::optional<std::string>> get_many(const std::vector<std::string>& keys);
  // SET key value EX ttl. ttl must be positive (std::invalid_argument otherwise).
  void set(const std::string& key, std::string_view value, std::chrono::seconds ttl);

  // True after a success and until the next failure; false before the first command.
  bool up() const;
  const RedisEndpoint& endpoint() const { return endpoint_; }

 private:
  struct ContextDeleter {
    void operator()(redisContext* context) const;
  };
  using Context = std::unique_ptr<redisContext, ContextDeleter>;
  using Clock = std::chrono::steady_clock;
  enum class State { kUnknown, kUp, kDown };

  // Runs `exchange` on a live connection under the lock (back-off check, lazy connect, one retry
  // on a stale connection, state transitions), then reports its latency outside the lock.
  void run(std::string_view command, const std::function<void(redisContext*)>& exchange);
  void connect_locked();
  void mark_up_locked();
  void mark_down_locked(const RedisError& error);

  const RedisOptions options_;
  const RedisEndpoint endpoint_;
  const StateCallback on_state_;
  const LatencyCallback on_latency_;

  std::atomic<bool> up_{false};  // mirrors state_ == kUp, readable without the lock

  std::mutex mutex_;  // guards everything below
  Context context_;   // null while disconnected
  State state_ = State::kUnknown;
  Clock::time_point retry_at_{};
  std::chrono::milliseconds backoff_{0};  // the current back-off; 0 after a success
  std::string last_failure_;
};

}  // namespace sdserve::cache
