#include "server/context.h"

#include "pipeline/errors.h"
#include "pipeline/extra_networks.h"
#include "server/api_json.h"

namespace sdserve::server {

std::string Context::resolve_model(const std::string& name, const std::string& field) const {
  if (name.empty() || name == default_model_) return "";
  if (!catalog_) {
    const auto m = model();
    // Without a models folder A1111 titles of the one model ("name.safetensors [hash]") still
    // name it.
    if (m && name.rfind(m->info().name, 0) == 0) return "";
    throw ApiError(400, "validation_error",
                   field + ": this service runs one model ('" +
                       (m ? m->info().name : std::string("none")) + "'), not '" + name +
                       "'; start it with --models-dir to choose models per request",
                   field);
  }
  const auto entry = catalog_->find(engine::ModelKind::kCheckpoint, name);
  if (!entry)
    throw ApiError(400, "validation_error",
                   field + ": no checkpoint named '" + name +
                       "' (GET /v1/models lists them; POST /v1/models/refresh finds new files)",
                   field);
  if (!entry->error.empty())
    throw ApiError(400, "validation_error",
                   field + ": checkpoint '" + entry->name + "' cannot be used: " + entry->error,
                   field);
  return entry->name == default_model_ ? "" : entry->name;
}

void Context::resolve_loras(engine::JobRequest* request) const {
  std::vector<engine::JobRequest::Lora> all;
  if (request->prompt_syntax == pipeline::PromptSyntax::kA1111) {
    try {
      for (const auto& t : pipeline::lora_tags(request->prompt, "prompt"))
        all.push_back({t.name, "", "", t.te_weight, t.unet_weight, nullptr, false});
    } catch (const pipeline::RequestError& e) {
      throw ApiError(400, "validation_error", e.what(), e.field());
    }
  }
  const size_t tags = all.size();
  for (auto& l : request->loras) all.push_back(std::move(l));
  for (size_t i = 0; i < all.size(); ++i) {
    auto& l = all[i];
    const std::string field = i < tags ? "prompt" : "loras";
    const auto entry = catalog_ ? catalog_->find(engine::ModelKind::kLora, l.name) : std::nullopt;
    if (!entry)
      throw ApiError(400, "validation_error",
                     field + ": no LoRA named '" + l.name + "'" +
                         (catalog_ ? " (GET /sdapi/v1/loras lists them; POST "
                                     "/sdapi/v1/refresh-loras finds new files)"
                                   : " (LoRAs come from --models-dir, which this service lacks)"),
                     field);
    if (!entry->error.empty())
      throw ApiError(400, "validation_error",
                     field + ": LoRA '" + entry->name + "' cannot be used: " + entry->error, field);
    l.name = entry->name;
    l.path = entry->path;
    l.sha256 = entry->sha256;
  }
  request->loras = std::move(all);
}

std::optional<pipeline::ModelInfo> Context::model_info(const std::string& resolved) const {
  if (resolved.empty()) {
    const auto m = model();
    if (!m) return std::nullopt;
    return m->info();
  }
  if (!catalog_) return std::nullopt;
  const auto entry = catalog_->find(engine::ModelKind::kCheckpoint, resolved);
  if (!entry) return std::nullopt;
  return entry->info;
}

std::string Context::model_sha256(const std::string& resolved) const {
  if (catalog_) {
    const auto entry = catalog_->find(engine::ModelKind::kCheckpoint,
                                      resolved.empty() ? default_model_ : resolved);
    return entry ? entry->sha256 : "";
  }
  const auto e = engine();
  return e ? e->model_sha256() : "";
}

std::string Context::a1111_model(const std::string& caller) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = a1111_models_.find(config_.api_keys.empty() ? "" : caller);
  return it == a1111_models_.end() ? "" : it->second;
}

void Context::set_a1111_model(const std::string& caller, const std::string& resolved) {
  std::lock_guard<std::mutex> lock(mutex_);
  a1111_models_[config_.api_keys.empty() ? "" : caller] = resolved;
}

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
