// A real redis-server for tests: started on a free loopback port in its own temporary directory,
// without persistence (--save "" --appendonly no), optionally with --requirepass. The constructor
// returns once it answers PING; stop() / restart() (same port) and pause() / resume() (SIGSTOP /
// SIGCONT) inject faults. The destructor kills it, so nothing outlives a test, failed or not;
// PR_SET_PDEATHSIG kills it too if the test process dies first.
//
// Not thread-safe: drive one from the test's thread.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace sdserve::test {

inline constexpr const char* kRedisServerBinary = "/usr/bin/redis-server";

// A loopback TCP port that was free a moment ago (bound to port 0, then released).
inline int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("socket() failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("cannot find a free loopback port");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

class RedisServer {
 public:
  static bool available() { return ::access(kRedisServerBinary, X_OK) == 0; }

  explicit RedisServer(std::string password = "") : password_(std::move(password)) {
    std::string dir_template =
        (std::filesystem::temp_directory_path() / "sdserve-redis-XXXXXX").string();
    if (!::mkdtemp(dir_template.data())) throw std::runtime_error("mkdtemp failed");
    dir_ = dir_template;
    // Another process may take the port between probing and binding it: try a few.
    for (int attempt = 0;; ++attempt) {
      port_ = free_loopback_port();
      try {
        start();
        return;
      } catch (const std::exception&) {
        if (attempt == 4) {
          std::error_code ignored;
          std::filesystem::remove_all(dir_, ignored);
          throw;
        }
      }
    }
  }

  ~RedisServer() {
    kill_and_reap(SIGKILL);
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  int port() const { return port_; }
  bool running() const { return pid_ > 0; }
  // redis://127.0.0.1:PORT, with the given userinfo ("user:pass@" or ":pass@", already encoded).
  std::string url(const std::string& userinfo = "") const {
    return "redis://" + userinfo + "127.0.0.1:" + std::to_string(port_);
  }

  // Stops the server with `signal` (SIGKILL: crash; SIGTERM: clean shutdown) and waits for it.
  void stop(int signal = SIGKILL) { kill_and_reap(signal); }
  // Starts it again on the same port (stopping it first if it runs).
  void restart() {
    kill_and_reap(SIGKILL);
    start();
  }
  // A paused server still completes TCP handshakes (the kernel does) but never answers.
  void pause() { ::kill(pid_, SIGSTOP); }
  void resume() { ::kill(pid_, SIGCONT); }

 private:
  void start() {
    std::vector<std::string> args = {kRedisServerBinary,
                                     "--port",
                                     std::to_string(port_),
                                     "--bind",
                                     "127.0.0.1",
                                     "--save",
                                     "",
                                     "--appendonly",
                                     "no",
                                     "--dir",
                                     dir_.string(),
                                     "--daemonize",
                                     "no",
                                     "--logfile",
                                     ""};
    if (!password_.empty()) {
      args.push_back("--requirepass");
      args.push_back(password_);
    }
    // Everything the child needs is prepared before fork(): only async-signal-safe calls after.
    std::vector<char*> argv;
    for (auto& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    const std::string log = (dir_ / "redis.log").string();
    const pid_t parent = ::getpid();

    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);  // the parent died before prctl
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
      if (fd >= 0) {
        ::dup2(fd, STDOUT_FILENO);
        ::dup2(fd, STDERR_FILENO);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    pid_ = pid;

    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!answers_ping()) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("redis-server exited at start: " + read_log());
      }
      if (std::chrono::steady_clock::now() > deadline) {
        kill_and_reap(SIGKILL);
        throw std::runtime_error("redis-server did not answer PING within 10 s: " + read_log());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  // Any reply counts (with --requirepass, PING answers -NOAUTH): the server is serving.
  bool answers_ping() const {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return false;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port_));
    bool ok = false;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      const char ping[] = "PING\r\n";
      pollfd readable{fd, POLLIN, 0};
      char reply[64];
      ok = ::send(fd, ping, sizeof ping - 1, MSG_NOSIGNAL) == sizeof ping - 1 &&
           ::poll(&readable, 1, 500) == 1 && ::recv(fd, reply, sizeof reply, 0) > 0 &&
           (reply[0] == '+' || reply[0] == '-');
    }
    ::close(fd);
    return ok;
  }

  void kill_and_reap(int signal) {
    if (pid_ <= 0) return;
    ::kill(pid_, signal);
    ::kill(pid_, SIGCONT);  // a paused server acts on SIGTERM only once it runs again
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    int status = 0;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    pid_ = -1;
  }

  std::string read_log() const {
    std::ifstream in(dir_ / "redis.log");
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
  }

  std::string password_;
  std::filesystem::path dir_;
  int port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace sdserve::test
