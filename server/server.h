// The HTTP/WebSocket server: listens at construction (so the port is known before the model is
// loaded: /healthz answers, /readyz says 503 until the engine is set), serves on http_threads
// threads, and turns SIGTERM/SIGINT into a graceful drain.
//
// Typical use (cli_serve.cpp):
//   Server server(config);            // binds; logs "listening on http://HOST:PORT"
//   server.start();                   // threads + signal handling
//   ... load the model, create the engine ...
//   server.set_backend(engine, model);
//   server.wait_for_stop();           // until SIGTERM/SIGINT
//   server.shutdown();                // drain, close sockets, stop threads, drop the engine
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "config/config.h"

namespace sdserve::engine {
class Engine;
class ModelCatalog;
}  // namespace sdserve::engine
namespace sdserve::pipeline {
class Model;
}

namespace sdserve::server {

class Server {
 public:
  // Throws std::runtime_error when the address cannot be bound.
  explicit Server(const config::ServiceConfig& config);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  unsigned short port() const;
  // The models folder and the default checkpoint's name in it; before start().
  void set_catalog(std::shared_ptr<engine::ModelCatalog> catalog, std::string default_model);
  // Called after each refresh of the models folder (embeddings to reload); before start().
  void on_refresh(std::function<void()> callback);
  void start();
  // The server becomes the engine's owner (it is destroyed in shutdown(), after every
  // subscription has ended).
  void set_backend(std::shared_ptr<engine::Engine> engine, std::shared_ptr<pipeline::Model> model);

  void wait_for_stop();  // blocks until SIGTERM/SIGINT or request_stop()
  void request_stop();
  bool stop_requested() const;

  // Refuses new jobs (503), lets the engine finish within shutdown_grace_s, closes WebSockets
  // with a close frame, stops the threads and destroys the engine.
  void shutdown();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace sdserve::server
