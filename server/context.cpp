#include "server/context.h"

namespace sdserve::server {

void Context::set_backend(std::shared_ptr<engine::Engine> engine,
                          std::shared_ptr<pipeline::Model> model) {
  std::lock_guard<std::mutex> lock(mutex_);
  engine_ = std::move(engine);
  model_ = std::move(model);
}

void Context::reset_backend() {
  std::shared_ptr<engine::Engine> engine;
  std::shared_ptr<pipeline::Model> model;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    engine.swap(engine_);
    model.swap(model_);
  }
  engine.reset();  // outside the lock: joins the workers
}

std::shared_ptr<engine::Engine> Context::engine() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return engine_;
}

std::shared_ptr<pipeline::Model> Context::model() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return model_;
}

uint64_t Context::subscribe(const std::string& job_id, engine::EventCallback callback) {
  const auto e = engine();
  if (!e) return 0;
  const uint64_t token = e->subscribe(job_id, std::move(callback));
  if (token != 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    subscriptions_[token] = job_id;
  }
  return token;
}

void Context::unsubscribe(const std::string& job_id, uint64_t token) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (subscriptions_.erase(token) == 0) return;
  }
  if (const auto e = engine()) e->unsubscribe(job_id, token);
}

void Context::unsubscribe_all() {
  std::map<uint64_t, std::string> left;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    left.swap(subscriptions_);
  }
  if (const auto e = engine())
    for (const auto& [token, id] : left) e->unsubscribe(id, token);
}

void Context::add_websocket(const std::shared_ptr<WsSession>& ws) {
  std::lock_guard<std::mutex> lock(mutex_);
  websockets_[ws.get()] = ws;
}

void Context::remove_websocket(const WsSession* ws) {
  std::lock_guard<std::mutex> lock(mutex_);
  websockets_.erase(ws);
}

std::vector<std::shared_ptr<WsSession>> Context::websockets() const {
  std::vector<std::shared_ptr<WsSession>> out;
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& [ptr, weak] : websockets_)
    if (auto s = weak.lock()) out.push_back(std::move(s));
  return out;
}

}  // namespace sdserve::server
