// What every connection of the server shares: configuration, metrics, the engine (null until
// the model is loaded), the live subscriptions and WebSockets (so that shutdown can reach them).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "engine/engine.h"
#include "engine/model_catalog.h"
#include "pipeline/pipeline.h"
#include "server/a1111_progress.h"
#include "server/metrics.h"

namespace sdserve::server {

class WsSession;

class Context {
 public:
  explicit Context(config::ServiceConfig config)
      : config_(std::move(config)), metrics_(config_.gpu_metrics_interval_s, config_.max_queue) {}

  const config::ServiceConfig& config() const { return config_; }
  Metrics& metrics() { return metrics_; }
  a1111::Tracker& a1111() { return a1111_; }

  void set_backend(std::shared_ptr<engine::Engine> engine, std::shared_ptr<pipeline::Model> model);
  // Drops the server's reference: the engine is destroyed here unless someone holds another.
  void reset_backend();
  std::shared_ptr<engine::Engine> engine() const;
  std::shared_ptr<pipeline::Model> model() const;  // the default model (its worker's first)

  // The models folder (null: one model, `--model`) and the default checkpoint's name in it. Set
  // before the server starts, read-only after.
  void set_catalog(std::shared_ptr<engine::ModelCatalog> catalog, std::string default_model) {
    catalog_ = std::move(catalog);
    default_model_ = std::move(default_model);
  }
  engine::ModelCatalog* catalog() const { return catalog_.get(); }
  // Runs after each refresh of the catalog (set before the server starts).
  void on_refresh(std::function<void()> callback) { on_refresh_ = std::move(callback); }
  void refreshed() const {
    if (on_refresh_) on_refresh_();
  }
  const std::string& default_model() const { return default_model_; }
  // A request's model name (or hash, or A1111 title) as the catalog knows it; "" for the
  // default. Throws ApiError 400 naming `field` for one that is unknown or cannot be used.
  std::string resolve_model(const std::string& name, const std::string& field) const;
  // What a checkpoint is (the default: as loaded); null for an unknown name.
  std::optional<pipeline::ModelInfo> model_info(const std::string& resolved) const;
  // The request's LoRAs: its prompt's <lora:...> tags (A1111 syntax) first, then its `loras`,
  // each resolved in the models folder (name, path, hash). Throws ApiError 400 naming "prompt"
  // (a tag) or "loras" for one that is unknown or cannot be used.
  void resolve_loras(engine::JobRequest* request) const;
  // Its SHA-256 ("" while unknown).
  std::string model_sha256(const std::string& resolved) const;
  // The checkpoint A1111 callers without override_settings get (POST /sdapi/v1/options): per
  // caller (API key) when keys are set, else one for the whole service; "" = the default.
  std::string a1111_model(const std::string& caller) const;
  void set_a1111_model(const std::string& caller, const std::string& resolved);

  bool shutting_down() const { return shutting_down_.load(); }
  void begin_shutdown() { shutting_down_.store(true); }

  // Engine subscriptions, remembered so that teardown can end the ones still open. 0 when the
  // job is unknown (or no engine yet).
  uint64_t subscribe(const std::string& job_id, engine::EventCallback callback);
  void unsubscribe(const std::string& job_id, uint64_t token);  // idempotent
  void unsubscribe_all();

  // Live WebSockets, for a clean close at shutdown.
  void add_websocket(const std::shared_ptr<WsSession>& ws);
  void remove_websocket(const WsSession* ws);
  std::vector<std::shared_ptr<WsSession>> websockets() const;

  // HTTP requests between header read and response written (shutdown waits for them).
  std::atomic<int> requests_in_flight{0};
  std::atomic<int> open_connections{0};  // HttpSession and WsSession objects alive

 private:
  const config::ServiceConfig config_;
  Metrics metrics_;
  a1111::Tracker a1111_;
  std::atomic<bool> shutting_down_{false};
  mutable std::mutex mutex_;
  std::shared_ptr<engine::Engine> engine_;
  std::shared_ptr<pipeline::Model> model_;
  std::shared_ptr<engine::ModelCatalog> catalog_;
  std::string default_model_;
  std::function<void()> on_refresh_;
  std::map<std::string, std::string> a1111_models_;  // guarded by mutex_: caller -> model
  std::map<uint64_t, std::string> subscriptions_;    // token -> job id
  std::map<const WsSession*, std::weak_ptr<WsSession>> websockets_;
};

// Counts one open connection in Context::open_connections for as long as it lives (a member of
// HttpSession, then of the WsSession an upgrade hands the socket to).
class ConnectionCount {
 public:
  explicit ConnectionCount(std::atomic<int>& n) : n_(n) { ++n_; }
  ~ConnectionCount() { --n_; }
  ConnectionCount(const ConnectionCount&) = delete;
  ConnectionCount& operator=(const ConnectionCount&) = delete;

 private:
  std::atomic<int>& n_;
};

}  // namespace sdserve::server
