#include "cache/redis_client.h"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <limits>

// Boost.URL is used header-only (Debian's Boost 1.81 ships no libboost_url): its sources are
// compiled here, so no other translation unit linked with sdcache may include this header.
#include <boost/url/parse.hpp>
#include <boost/url/src.hpp>
#include <boost/url/url_view.hpp>

namespace sdserve::cache {
namespace {

constexpr const char* kUrlForm = "expected redis://[[user]:password@]host[:port][/db]";

[[noreturn]] void bad_url(const std::string& what) {
  throw std::invalid_argument("redis_url: " + what);
}

bool all_digits(std::string_view text) {
  return !text.empty() &&
         std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

// Digits only, at most `max`; nullopt otherwise (including overflow).
std::optional<long> parse_number(std::string_view text, long max) {
  if (!all_digits(text) || text.size() > 10) return std::nullopt;
  const long value = std::stol(std::string(text));
  if (value > max) return std::nullopt;
  return value;
}

struct ReplyDeleter {
  void operator()(redisReply* reply) const { freeReplyObject(reply); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

std::string where(const RedisEndpoint& endpoint) {
  return endpoint.host + ":" + std::to_string(endpoint.port);
}

bool is_timeout(int saved_errno, const char* errstr) {
  // hiredis 0.14 has no REDIS_ERR_TIMEOUT: a socket timeout is REDIS_ERR_IO with errno EAGAIN
  // (SO_RCVTIMEO/SO_SNDTIMEO), a connect timeout REDIS_ERR_IO with ETIMEDOUT. The text is checked
  // too in case errno was overwritten on the way out.
  if (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK || saved_errno == ETIMEDOUT) return true;
  return std::strcmp(errstr, std::strerror(EAGAIN)) == 0 ||
         std::strcmp(errstr, std::strerror(ETIMEDOUT)) == 0;
}

RedisError timed_out(const std::string& doing, std::chrono::milliseconds timeout) {
  return RedisError(RedisErrorKind::kTimeout,
                    doing + " timed out after " + std::to_string(timeout.count()) + " ms");
}

// The one place where hiredis's error codes become typed errors.
RedisError context_error(const redisContext* context, int saved_errno, bool connecting,
                         const std::string& doing, std::chrono::milliseconds timeout) {
  const std::string detail = context->errstr;
  switch (context->err) {
    case REDIS_ERR_IO:
      if (is_timeout(saved_errno, context->errstr)) return timed_out(doing, timeout);
      return RedisError(connecting ? RedisErrorKind::kConnect : RedisErrorKind::kIo,
                        doing + " failed: " + detail);
    case REDIS_ERR_EOF:
      return RedisError(connecting ? RedisErrorKind::kConnect : RedisErrorKind::kIo,
                        doing + " failed: the server closed the connection");
    case REDIS_ERR_PROTOCOL:
      return RedisError(RedisErrorKind::kProtocol, doing + " failed: protocol error: " + detail);
    default:  // REDIS_ERR_OTHER (e.g. name resolution), REDIS_ERR_OOM
      return RedisError(connecting ? RedisErrorKind::kConnect : RedisErrorKind::kIo,
                        doing + " failed: " + detail);
  }
}

// hiredis writes with write(2), not send(MSG_NOSIGNAL): writing to a connection the server has
// reset raises SIGPIPE, whose default action kills the process. Block it in this thread for the
// exchange and discard one that arrived (the write then fails with EPIPE, which we handle).
class SigpipeGuard {
 public:
  SigpipeGuard() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigemptyset(&pending);
    sigpending(&pending);
    // One already pending belongs to someone else: leave it alone.
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~SigpipeGuard() {
    if (!was_pending_) {
      sigset_t pending;
      sigemptyset(&pending);
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        const timespec zero{0, 0};
        while (sigtimedwait(&pipe_, nullptr, &zero) == -1 && errno == EINTR) {
        }
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeGuard(const SigpipeGuard&) = delete;
  SigpipeGuard& operator=(const SigpipeGuard&) = delete;

 private:
  sigset_t pipe_;
  sigset_t old_;
  bool was_pending_ = false;
};

timeval to_timeval(std::chrono::milliseconds duration) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(duration.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((duration.count() % 1000) * 1000);
  return tv;
}

}  // namespace

RedisEndpoint parse_redis_url(const std::string& url) {
  const auto parsed = boost::urls::parse_uri(url);
  if (!parsed) bad_url("not a valid URL (" + parsed.error().message() + "); " + kUrlForm);
  const boost::urls::url_view& u = *parsed;

  const std::string scheme(u.scheme());
  if (iequals(scheme, "rediss")) {
    bad_url("rediss:// asks for TLS, and TLS is not supported (hiredis 0.14); use redis://");
  }
  if (!iequals(scheme, "redis")) bad_url("scheme '" + scheme + "' is not supported; " + kUrlForm);
  if (!u.has_authority() || u.host_address().empty()) bad_url(std::string("no host; ") + kUrlForm);
  if (u.has_query()) bad_url("query parameters are not supported; put the db in the path (/db)");
  if (u.has_fragment()) bad_url("a fragment (#...) is not allowed");

  RedisEndpoint endpoint;
  // IPv6 without its brackets, which is what getaddrinfo wants.
  endpoint.host = std::string(u.host_address());

  std::string_view path(u.encoded_path());
  if (u.has_port()) {
    std::string_view port(u.port());
    // Boost.URL 1.81 reads "h:abc" as an empty port followed by the path "abc".
    if (port.empty() && !path.empty() && path.front() != '/') {
      bad_url("port '" + std::string(path.substr(0, path.find('/'))) + "' is not a number");
    }
    if (port.empty()) bad_url("the port is empty; leave out ':' for the default 6379");
    if (!all_digits(port)) bad_url("port '" + std::string(port) + "' is not a number");
    const auto number = parse_number(port, 65535);
    if (!number || *number == 0) {
      bad_url("port " + std::string(port) + " is out of range 1..65535");
    }
    endpoint.port = static_cast<int>(*number);
  }

  if (!path.empty() && path != "/") {
    if (path.front() != '/') bad_url(std::string("unexpected text after the host; ") + kUrlForm);
    const std::string_view db = path.substr(1);
    const auto number = parse_number(db, std::numeric_limits<int>::max());
    if (!number) bad_url("database '" + std::string(db) + "' is not a non-negative number");
    endpoint.db = static_cast<int>(*number);
  }

  if (u.has_userinfo()) {
    endpoint.username = std::string(u.user());
    endpoint.password = std::string(u.password());
    if (!u.has_password() || endpoint.password.empty()) {
      // Not echoed: people often write their password here by mistake.
      bad_url(
          "a user without a password; for a password only write "
          "redis://:password@host");
    }
  }
  return endpoint;
}

std::string to_string(RedisErrorKind kind) {
  switch (kind) {
    case RedisErrorKind::kConnect:
      return "connect";
    case RedisErrorKind::kTimeout:
      return "timeout";
    case RedisErrorKind::kIo:
      return "io";
    case RedisErrorKind::kProtocol:
      return "protocol";
    case RedisErrorKind::kReply:
      return "reply";
    case RedisErrorKind::kDown:
      return "down";
  }
  return "unknown";
}

RedisError::RedisError(RedisErrorKind kind, const std::string& what)
    : std::runtime_error("redis " + to_string(kind) + ": " + what), kind(kind) {}

void RedisClient::ContextDeleter::operator()(redisContext* context) const {
  redisFree(context);
}

RedisClient::RedisClient(RedisOptions options, StateCallback on_state, LatencyCallback on_latency)
    : options_(std::move(options)),
      endpoint_(parse_redis_url(options_.url)),
      on_state_(std::move(on_state)),
      on_latency_(std::move(on_latency)) {
  // A zero socket timeout would mean "wait forever" to hiredis.
  if (options_.timeout.count() <= 0) throw std::invalid_argument("redis timeout must be positive");
  if (options_.backoff_min.count() < 0 || options_.backoff_max < options_.backoff_min) {
    throw std::invalid_argument("redis back-off must satisfy 0 <= backoff_min <= backoff_max");
  }
}

RedisClient::~RedisClient() = default;

bool RedisClient::up() const {
  return up_.load(std::memory_order_relaxed);
}

void RedisClient::connect_locked() {
  const std::string at = where(endpoint_);
  const timeval timeout = to_timeval(options_.timeout);
  errno = 0;
  Context context(redisConnectWithTimeout(endpoint_.host.c_str(), endpoint_.port, timeout));
  const int saved_errno = errno;
  if (!context) throw RedisError(RedisErrorKind::kConnect, "out of memory creating a connection");
  if (context->err) {
    throw context_error(context.get(), saved_errno, true, "connecting to " + at, options_.timeout);
  }
  // hiredis 0.14 applies the connect timeout to connect(2) only; reads and writes need their own.
  if (redisSetTimeout(context.get(), timeout) != REDIS_OK) {
    throw RedisError(RedisErrorKind::kConnect,
                     "setting socket timeouts for " + at + " failed: " + context->errstr);
  }

  // AUTH and SELECT are part of connecting: a refusal is a configuration error (kConnect), and the
  // connection is useless until it is fixed.
  const auto handshake = [&](const std::string& doing, Reply reply_or_null) {
    const int command_errno = errno;
    if (!reply_or_null) {
      throw context_error(context.get(), command_errno, true, doing + " on " + at,
                          options_.timeout);
    }
    if (reply_or_null->type == REDIS_REPLY_ERROR) {
      throw RedisError(
          RedisErrorKind::kConnect,
          doing + " refused by " + at + ": " + std::string(reply_or_null->str, reply_or_null->len));
    }
  };
  if (!endpoint_.password.empty()) {
    errno = 0;
    if (endpoint_.username.empty()) {
      handshake("AUTH", Reply(static_cast<redisReply*>(redisCommand(context.get(), "AUTH %b",
                                                                    endpoint_.password.data(),
                                                                    endpoint_.password.size()))));
    } else {
      handshake("AUTH", Reply(static_cast<redisReply*>(
                            redisCommand(context.get(), "AUTH %b %b", endpoint_.username.data(),
                                         endpoint_.username.size(), endpoint_.password.data(),
                                         endpoint_.password.size()))));
    }
  }
  if (endpoint_.db != 0) {
    errno = 0;
    handshake(
        "SELECT " + std::to_string(endpoint_.db),
        Reply(static_cast<redisReply*>(redisCommand(context.get(), "SELECT %d", endpoint_.db))));
  }
  context_ = std::move(context);
}

void RedisClient::mark_up_locked() {
  backoff_ = std::chrono::milliseconds(0);
  last_failure_.clear();
  if (state_ == State::kUp) return;
  state_ = State::kUp;
  up_.store(true, std::memory_order_relaxed);
  if (on_state_) {
    on_state_(true, "connected to " + where(endpoint_) + " db " + std::to_string(endpoint_.db));
  }
}

void RedisClient::mark_down_locked(const RedisError& error) {
  context_.reset();
  backoff_ =
      backoff_.count() == 0 ? options_.backoff_min : std::min(backoff_ * 2, options_.backoff_max);
  retry_at_ = Clock::now() + backoff_;
  last_failure_ = error.what();
  if (state_ == State::kDown) return;
  state_ = State::kDown;
  up_.store(false, std::memory_order_relaxed);
  if (on_state_) on_state_(false, error.what());
}

void RedisClient::run(std::string_view command,
                      const std::function<void(redisContext*)>& exchange) {
  std::chrono::nanoseconds elapsed{0};
  std::optional<RedisError> reply_error;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!context_ && state_ == State::kDown) {
      const auto now = Clock::now();
      if (now < retry_at_) {
        const auto wait = std::chrono::ceil<std::chrono::milliseconds>(retry_at_ - now);
        throw RedisError(RedisErrorKind::kDown,
                         "not connected to " + where(endpoint_) + " (next attempt in " +
                             std::to_string(wait.count()) + " ms); last failure: " + last_failure_);
      }
    }
    SigpipeGuard sigpipe_guard;
    for (;;) {
      // Every command that ran on a kept connection succeeded, so an existing one is idle/reused.
      const bool reused = context_ != nullptr;
      try {
        if (!context_) connect_locked();
        const auto start = Clock::now();
        try {
          exchange(context_.get());
        } catch (const RedisError& error) {
          // An error reply: the server answered and the connection is in sync.
          if (error.kind != RedisErrorKind::kReply) throw;
          reply_error = error;
        }
        elapsed = Clock::now() - start;
        mark_up_locked();
        break;
      } catch (const RedisError& error) {
        context_.reset();
        // A reused connection that broke was most likely closed while idle (server restart,
        // idle timeout): one fresh attempt tells that apart from a server that is gone.
        if (reused && error.kind == RedisErrorKind::kIo) continue;
        mark_down_locked(error);
        throw;
      } catch (...) {
        // E.g. bad_alloc halfway through a pipeline: the connection may be out of sync.
        context_.reset();
        throw;
      }
    }
  }
  if (on_latency_) on_latency_(command, elapsed);
  if (reply_error) throw *reply_error;
}

namespace {

using Deadline = std::chrono::steady_clock::time_point;

// Reads one reply before `deadline` (a missing reply is a connection failure, typed from
// hiredis's error). hiredis's redisGetReply re-arms the socket timeout for each read(2), so a
// server that drips its reply a byte at a time would hold the caller for as long as it likes;
// here each write and read may wait only for what is left of the command's deadline.
Reply read_reply(redisContext* context, const std::string& doing, Deadline deadline,
                 std::chrono::milliseconds timeout) {
  const auto fail = [&](int saved_errno) {
    return context_error(context, saved_errno, false, doing, timeout);
  };
  const auto arm = [&] {
    const auto left =
        std::chrono::ceil<std::chrono::microseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) throw timed_out(doing, timeout);
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(left.count() / 1000000);
    tv.tv_usec = static_cast<suseconds_t>(left.count() % 1000000);
    if (redisSetTimeout(context, tv) != REDIS_OK) throw fail(errno);
  };
  for (int written = 0; !written;) {  // what redisAppendCommand queued
    arm();
    errno = 0;
    if (redisBufferWrite(context, &written) != REDIS_OK) throw fail(errno);
  }
  for (;;) {
    void* raw = nullptr;
    if (redisGetReplyFromReader(context, &raw) != REDIS_OK) throw fail(errno);
    if (raw) return Reply(static_cast<redisReply*>(raw));
    arm();
    errno = 0;
    if (redisBufferRead(context) != REDIS_OK) throw fail(errno);
  }
}

RedisError reply_error(const redisReply& reply, const std::string& doing) {
  return RedisError(RedisErrorKind::kReply,
                    doing + " answered: " + std::string(reply.str, reply.len));
}

std::optional<std::string> string_or_nil(const redisReply& reply, const std::string& doing) {
  switch (reply.type) {
    case REDIS_REPLY_STRING:
      return std::string(reply.str, reply.len);
    case REDIS_REPLY_NIL:
      return std::nullopt;
    case REDIS_REPLY_ERROR:
      throw reply_error(reply, doing);
    default:
      throw RedisError(RedisErrorKind::kProtocol,
                       doing + ": unexpected reply type " + std::to_string(reply.type));
  }
}

void append_get(redisContext* context, const std::string& key) {
  if (redisAppendCommand(context, "GET %b", key.data(), key.size()) != REDIS_OK) {
    throw RedisError(RedisErrorKind::kIo, std::string("queueing GET failed: ") + context->errstr);
  }
}

}  // namespace

std::optional<std::string> RedisClient::get(const std::string& key) {
  std::optional<std::string> value;
  const std::string doing = "GET on " + where(endpoint_);
  run("get", [&](redisContext* context) {
    const Deadline deadline = Clock::now() + options_.timeout;
    append_get(context, key);
    value = string_or_nil(*read_reply(context, doing, deadline, options_.timeout), doing);
  });
  return value;
}

std::vector<std::optional<std::string>> RedisClient::get_many(
    const std::vector<std::string>& keys) {
  std::vector<std::optional<std::string>> values;
  if (keys.empty()) return values;
  const std::string doing = "GET (pipelined) on " + where(endpoint_);
  run("get_many", [&](redisContext* context) {
    const Deadline deadline = Clock::now() + options_.timeout;  // one for the whole pipeline
    values.assign(keys.size(), std::nullopt);
    for (const std::string& key : keys) append_get(context, key);
    // Read every reply even after an error reply, so the connection stays in sync.
    std::optional<RedisError> first_error;
    for (auto& value : values) {
      Reply reply = read_reply(context, doing, deadline, options_.timeout);
      try {
        value = string_or_nil(*reply, doing);
      } catch (const RedisError& error) {
        if (!first_error) first_error = error;
      }
    }
    if (first_error) throw *first_error;
  });
  return values;
}

void RedisClient::set(const std::string& key, std::string_view value, std::chrono::seconds ttl) {
  if (ttl.count() <= 0) throw std::invalid_argument("redis SET: ttl must be positive");
  const std::string doing = "SET on " + where(endpoint_);
  run("set", [&](redisContext* context) {
    const Deadline deadline = Clock::now() + options_.timeout;
    const long long seconds = ttl.count();
    if (redisAppendCommand(context, "SET %b %b EX %lld", key.data(), key.size(), value.data(),
                           value.size(), seconds) != REDIS_OK) {
      throw RedisError(RedisErrorKind::kIo, std::string("queueing SET failed: ") + context->errstr);
    }
    Reply reply = read_reply(context, doing, deadline, options_.timeout);
    if (reply->type == REDIS_REPLY_ERROR) throw reply_error(*reply, doing);
    if (reply->type != REDIS_REPLY_STATUS) {
      throw RedisError(RedisErrorKind::kProtocol,
                       doing + ": unexpected reply type " + std::to_string(reply->type));
    }
  });
}

}  // namespace sdserve::cache
