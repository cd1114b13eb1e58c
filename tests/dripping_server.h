// A hostile Redis for tests: it accepts connections on a loopback port and answers whatever it
// is sent with a well-formed reply written one byte every `interval` (a server that is slow, not
// dead: every read(2) returns quickly, so per-read socket timeouts never fire). The real
// redis-server cannot be made to do this; everything else in the tests uses the real one.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace sdserve::test {

// A listening TCP socket on 127.0.0.1 at a port the kernel picks; returns its fd and sets *port.
inline int listen_on_loopback(int* port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(fd, 16) != 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("cannot open a listening socket");
  }
  *port = ntohs(addr.sin_port);
  return fd;
}

class DrippingServer {
 public:
  // `reply` is sent (dripped) after each chunk received: "$-1\r\n" is GET's "no such key".
  explicit DrippingServer(std::chrono::milliseconds interval, std::string reply = "$-1\r\n")
      : interval_(interval), reply_(std::move(reply)), fd_(listen_on_loopback(&port_)) {
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~DrippingServer() {
    stop_ = true;
    ::shutdown(fd_, SHUT_RDWR);
    acceptor_.join();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (int c : clients_) ::shutdown(c, SHUT_RDWR);
    }
    for (auto& t : connections_) t.join();
    for (int c : clients_) ::close(c);
    ::close(fd_);
  }
  DrippingServer(const DrippingServer&) = delete;
  DrippingServer& operator=(const DrippingServer&) = delete;

  int port() const { return port_; }
  std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_); }
  int connections() const { return accepted_.load(); }

 private:
  void accept_loop() {
    while (!stop_) {
      const int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) return;
      ++accepted_;
      std::lock_guard<std::mutex> lock(mutex_);
      clients_.push_back(c);
      connections_.emplace_back([this, c] { serve(c); });
    }
  }
  void serve(int c) {
    char buf[4096];
    while (!stop_ && ::recv(c, buf, sizeof buf, 0) > 0) {
      for (char byte : reply_) {
        if (stop_ || ::send(c, &byte, 1, MSG_NOSIGNAL) != 1) return;
        std::this_thread::sleep_for(interval_);
      }
    }
  }

  std::chrono::milliseconds interval_;
  std::string reply_;
  int port_ = 0;  // before fd_: listen_on_loopback() sets it while fd_ is initialised
  int fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::mutex mutex_;
  std::vector<int> clients_;
  std::vector<std::thread> connections_;
  std::thread acceptor_;
};

}  // namespace sdserve::test
