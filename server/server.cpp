#include "server/server.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "server/context.h"
#include "server/http_session.h"
#include "server/ws_session.h"

namespace sdserve::server {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

struct Server::Impl {
  explicit Impl(const config::ServiceConfig& config)
      : ioc(config.http_threads),
        acceptor(ioc),
        retry_timer(ioc),
        // SIGHUP drains like SIGTERM (there is no reload: restart to change the configuration);
        // by default it would kill the process with jobs in flight.
        signals(ioc, SIGINT, SIGTERM, SIGHUP),
        ctx(std::make_shared<Context>(config)) {}

  ~Impl() { stop_threads(); }

  void listen() {
    const auto& cfg = ctx->config();
    tcp::resolver resolver(ioc);
    boost::system::error_code ec;
    const auto results =
        resolver.resolve(cfg.host, std::to_string(cfg.port), tcp::resolver::passive, ec);
    if (ec || results.empty())
      throw std::runtime_error("cannot resolve host '" + cfg.host + "': " + ec.message());
    const tcp::endpoint endpoint = results.begin()->endpoint();
    acceptor.open(endpoint.protocol(), ec);
    if (!ec) acceptor.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor.bind(endpoint, ec);
    if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
      throw std::runtime_error("cannot listen on " + cfg.host + ":" + std::to_string(cfg.port) +
                               ": " + ec.message());
    port = acceptor.local_endpoint().port();
    const std::string host =
        cfg.host.find(':') != std::string::npos ? "[" + cfg.host + "]" : cfg.host;
    spdlog::info("listening on http://{}:{}", host, port);
  }

  // Past max_connections: a 503 written without waiting (a fresh socket's buffer takes it, or
  // the client gets nothing), then closed. Each open connection costs a descriptor and a read
  // buffer; without a cap, a client could open them until accept() failed for everyone.
  void refuse(tcp::socket& socket) {
    static const std::string busy =
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        "Retry-After: 1\r\nConnection: close\r\nContent-Length: 106\r\n\r\n"
        "{\"error\":{\"type\":\"too_many_connections\",\"message\":\"max_connections are "
        "open; retry shortly\",\"field\":null}}";
    boost::system::error_code ignored;
    socket.non_blocking(true, ignored);
    socket.write_some(asio::buffer(busy), ignored);
    socket.shutdown(tcp::socket::shutdown_both, ignored);
    socket.close(ignored);
    ctx->metrics().connection_refused();
  }

  void do_accept() {
    acceptor.async_accept(
        asio::make_strand(ioc), [this](boost::system::error_code ec, tcp::socket socket) {
          if (ec == asio::error::operation_aborted || !acceptor.is_open()) return;
          if (ec) {
            // Typically out of file descriptors: wait a little instead of spinning.
            spdlog::warn("accept failed: {}", ec.message());
            retry_timer.expires_after(std::chrono::milliseconds(100));
            retry_timer.async_wait([this](boost::system::error_code) { do_accept(); });
            return;
          }
          boost::system::error_code ignored;
          if (ctx->open_connections.load() >= ctx->config().max_connections) {
            refuse(socket);
          } else {
            socket.set_option(tcp::no_delay(true), ignored);
            std::make_shared<HttpSession>(std::move(socket), ctx)->run();
          }
          do_accept();
        });
  }

  void wait_signal() {
    signals.async_wait([this](boost::system::error_code ec, int signo) {
      if (ec) return;
      if (!stop_requested()) {
        ctx->begin_shutdown();  // new jobs get 503 from now on, before the log line says so
        spdlog::info("received {}: shutting down", signo == SIGTERM  ? "SIGTERM"
                                                   : signo == SIGHUP ? "SIGHUP"
                                                                     : "SIGINT");
        request_stop();
        wait_signal();
      } else {
        spdlog::warn("second signal: exiting now without draining");
        std::_Exit(1);
      }
    });
  }

  void request_stop() {
    std::lock_guard<std::mutex> lock(mutex);
    stop = true;
    cv.notify_all();
  }

  bool stop_requested() {
    std::lock_guard<std::mutex> lock(mutex);
    return stop;
  }

  void stop_threads() {
    guard.reset();
    ioc.stop();
    for (auto& t : threads)
      if (t.joinable()) t.join();
    threads.clear();
    // No network thread runs now: end what is still subscribed, then let the engine go while
    // the io_context (which its callbacks post to) still exists.
    ctx->unsubscribe_all();
    ctx->reset_backend();
  }

  asio::io_context ioc;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard;
  tcp::acceptor acceptor;
  asio::steady_timer retry_timer;
  asio::signal_set signals;
  std::shared_ptr<Context> ctx;
  std::vector<std::thread> threads;
  unsigned short port = 0;
  std::mutex mutex;
  std::condition_variable cv;
  bool stop = false;
  bool shut_down = false;
};

Server::Server(const config::ServiceConfig& config) : impl_(std::make_unique<Impl>(config)) {
  impl_->listen();
}

Server::~Server() = default;

unsigned short Server::port() const {
  return impl_->port;
}

void Server::start() {
  impl_->guard.emplace(impl_->ioc.get_executor());
  impl_->wait_signal();
  impl_->do_accept();
  for (int i = 0; i < impl_->ctx->config().http_threads; ++i) {
    impl_->threads.emplace_back([this] {
      for (;;) {
        try {
          impl_->ioc.run();
          return;
        } catch (const std::exception& e) {
          spdlog::error("network thread: {}", e.what());
        }
      }
    });
  }
}

void Server::set_catalog(std::shared_ptr<engine::ModelCatalog> catalog, std::string default_model) {
  impl_->ctx->set_catalog(std::move(catalog), std::move(default_model));
}

void Server::on_refresh(std::function<void()> callback) {
  impl_->ctx->on_refresh(std::move(callback));
}

void Server::set_backend(std::shared_ptr<engine::Engine> engine,
                         std::shared_ptr<pipeline::Model> model) {
  impl_->ctx->set_backend(std::move(engine), std::move(model));
}

void Server::wait_for_stop() {
  std::unique_lock<std::mutex> lock(impl_->mutex);
  impl_->cv.wait(lock, [this] { return impl_->stop; });
}

void Server::request_stop() {
  impl_->request_stop();
}

bool Server::stop_requested() const {
  return impl_->stop_requested();
}

void Server::shutdown() {
  if (impl_->shut_down) return;
  impl_->shut_down = true;
  auto& ctx = *impl_->ctx;
  ctx.begin_shutdown();
  const double grace = ctx.config().shutdown_grace_s;
  if (auto engine = ctx.engine()) {
    spdlog::info("draining: no new jobs; running and queued jobs get up to {} s", grace);
    engine->shutdown(std::chrono::steady_clock::now() +
                     std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                         std::chrono::duration<double>(grace)));
    spdlog::info("engine drained");
  }
  asio::post(impl_->ioc, [this] {
    boost::system::error_code ec;
    impl_->acceptor.close(ec);
    impl_->signals.cancel(ec);
  });
  // Every job is final now, but its last events may still be on their way to the sockets: let
  // the per-job sockets send them and close normally, briefly, before closing what is left.
  auto now = std::chrono::steady_clock::now;
  for (const auto until = now() + std::chrono::seconds(2); now() < until;) {
    const auto open = ctx.websockets();
    if (std::none_of(open.begin(), open.end(),
                     [](const auto& ws) { return ws->mode() == WsSession::Mode::kJob; }))
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (const auto& ws : ctx.websockets()) ws->close_for_shutdown();
  // Let close handshakes and responses still being written finish, briefly.
  const auto deadline = now() + std::chrono::seconds(3);
  while (std::chrono::steady_clock::now() < deadline &&
         (!ctx.websockets().empty() || ctx.requests_in_flight.load() > 0))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  impl_->stop_threads();
  spdlog::info("stopped");
}

}  // namespace sdserve::server
