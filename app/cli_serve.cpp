// `sdserve serve`: configuration, model, engine, and the HTTP/WebSocket server around them.
#include <spdlog/spdlog.h>
#include <algorithm>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <list>
#include <mutex>
#include <thread>

#include "app/cli.h"
#include "cache/embedding_cache.h"
#include "cache/redis_client.h"
#include "config/config.h"
#include "engine/engine.h"
#include "engine/model_catalog.h"
#include "engine/model_runner.h"
#include "pipeline/errors.h"
#include "pipeline/pipeline.h"
#include "pipeline/textual_inversion.h"
#include "server/logging.h"
#include "server/server.h"

namespace sdserve {
namespace {

engine::EngineOptions engine_options(const config::ServiceConfig& c) {
  engine::EngineOptions o;
  o.max_queue = c.max_queue;
  o.max_batch = c.max_batch;
  o.light_load_efficiency = c.light_load_efficiency;
  o.light_load_max_wait_s = c.light_load_max_wait_s;
  o.decode_batch = c.decode_batch;
  o.warm_up_budget_s = c.warm_up_budget_s;
  o.batch_buckets = c.batch_buckets;
  o.default_timeout_s = c.default_timeout_s;
  o.max_timeout_s = c.max_timeout_s;
  o.max_run_s = c.max_run_s;
  o.max_memory_bytes = static_cast<uint64_t>(c.max_memory_mb) << 20;
  o.model_memory_bytes = static_cast<uint64_t>(c.model_memory_mb) << 20;
  o.result_ttl_s = c.result_ttl_s;
  o.result_max_bytes = static_cast<uint64_t>(c.result_max_mb) << 20;
  return o;
}

std::shared_ptr<cache::EmbeddingCache> make_cache(const config::ServiceConfig& c) {
  cache::TieredCacheOptions o;
  o.memory_bytes = static_cast<uint64_t>(c.embedding_cache_mb) << 20;
  o.memory_on_host = c.embedding_cache_on_host;
  o.redis_url = c.redis_url;
  o.redis_timeout = std::chrono::milliseconds(c.redis_timeout_ms);
  o.redis_ttl = std::chrono::seconds(c.redis_ttl_s);
  if (!o.redis_url.empty())
    spdlog::info("embedding cache: {} MiB in memory, shared through Redis", c.embedding_cache_mb);
  return std::make_shared<cache::TieredEmbeddingCache>(o, [](bool error, const std::string& line) {
    if (error)
      spdlog::warn("{}", line);
    else
      spdlog::info("{}", line);
  });
}

// The folder's usable embeddings, read.
std::vector<pipeline::TextualInversionPtr> textual_inversions(const engine::ModelCatalog& catalog) {
  std::vector<pipeline::TextualInversionPtr> out;
  for (const auto& e : catalog.list(engine::ModelKind::kEmbedding)) {
    if (!e.error.empty()) continue;
    try {
      out.push_back(pipeline::TextualInversion::load(e.path));
    } catch (const std::exception& ex) {  // changed since the scan: the next refresh lists why
      spdlog::warn("embedding {} cannot be used: {}", e.name, ex.what());
    }
  }
  return out;
}

// LoRA files read for jobs, kept while they are used within a bound of host memory (least
// recently used first), so a LoRA many jobs use is read once. Thread-safe.
class LoraFiles {
 public:
  explicit LoraFiles(uint64_t max_bytes) : max_bytes_(max_bytes) {}
  std::shared_ptr<const pipeline::Lora> get(const std::string& path) {
    std::error_code ec;
    const auto mtime = std::filesystem::last_write_time(path, ec).time_since_epoch().count();
    const std::string key = path + "\n" + std::to_string(mtime);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = files_.begin(); it != files_.end(); ++it)
        if (it->first == key) {
          files_.splice(files_.begin(), files_, it);
          return it->second;
        }
    }
    auto lora = pipeline::Lora::load(path);  // outside the lock: other jobs' LoRAs go on
    std::lock_guard<std::mutex> lock(mutex_);
    files_.emplace_front(key, lora);
    uint64_t bytes = 0;
    for (auto it = files_.begin(); it != files_.end();) {
      bytes += it->second->info().bytes;
      if (bytes > max_bytes_ && it != files_.begin())
        it = files_.erase(it);
      else
        ++it;
    }
    return lora;
  }

 private:
  const uint64_t max_bytes_;
  std::mutex mutex_;
  std::list<std::pair<std::string, std::shared_ptr<const pipeline::Lora>>> files_;
};

// The engine's side of a models folder: checkpoints loaded by name, described without loading
// (a request's limits), hashed for the PNGs.
void add_models(std::shared_ptr<engine::ModelCatalog> catalog, const pipeline::LoadOptions& load,
                const std::string& default_name, engine::EngineOptions* o) {
  o->default_model = default_name;
  o->load_model = [catalog, load](const std::string& name, const std::string& device) {
    const auto e = catalog->find(engine::ModelKind::kCheckpoint, name);
    if (!e) throw std::runtime_error("checkpoint '" + name + "' is no longer in the models folder");
    if (!e->error.empty()) throw std::runtime_error(e->error);
    auto options = load;
    options.device = device;
    auto model = pipeline::Model::load(e->path, options);
    const auto& info = model->info();
    spdlog::info("model {} ({}, {}) loaded on {} in {:.1f} s", name,
                 pipeline::family_display_name(info.family), info.layout, info.device,
                 info.load_seconds);
    return engine::pipeline_runner(std::move(model));
  };
  o->describe_model = [catalog](const std::string& name) {
    const auto e = catalog->find(engine::ModelKind::kCheckpoint, name);
    if (!e) throw pipeline::RequestError("model", "no checkpoint named '" + name + "'");
    if (!e->error.empty())
      throw pipeline::RequestError("model",
                                   "checkpoint '" + name + "' cannot be used: " + e->error);
    return e->info;
  };
  // 2 GiB of LoRA files in host memory: ~15 SDXL LoRAs of rank 32, ~70 SD 1.5 ones.
  auto files = std::make_shared<LoraFiles>(uint64_t{2} << 30);
  o->load_lora = [files](const std::string& path) {
    auto file = files->get(path);
    const bool text_encoder = file->info().text_encoder;
    return engine::EngineOptions::LoadedLora{std::move(file), text_encoder};
  };
  o->model_hash = [catalog](const std::string& name) {
    const auto e = catalog->find(engine::ModelKind::kCheckpoint, name);
    return e ? e->autov2() : std::string();
  };
}

}  // namespace

int run_serve(const std::vector<std::string>& args) {
  config::Loaded loaded;
  try {
    loaded = config::load(args, config::process_environment());
  } catch (const config::ConfigError& e) {
    throw UsageError(e.what());
  }
  if (loaded.help) {
    std::cout << config::help_text();
    return 0;
  }
  const config::ServiceConfig& cfg = loaded.config;
  if (!cfg.redis_url.empty()) {
    try {
      cache::parse_redis_url(cfg.redis_url);
    } catch (const std::invalid_argument& e) {
      throw UsageError(e.what());
    }
  }
  setup_logging(cfg.log_level, cfg.log_format);
  spdlog::info("sdserve {} starting", SDSERVE_VERSION);
  if (!loaded.config_file.empty()) spdlog::info("config file: {}", loaded.config_file);
  spdlog::debug("configuration: {}", config::to_json(cfg));

  pipeline::LoadOptions load;
  load.device = cfg.device;
  load.precision = cfg.precision;
  load.vae_precision = cfg.vae_precision;
  load.single_file_config = cfg.single_file_config;

  // The models folder, when there is one: checkpoints chosen per request. The default model is
  // --model, else default_model (or the first by name) of the folder, else the bundled one.
  std::shared_ptr<engine::ModelCatalog> catalog;
  std::string model_path = cfg.model;
  std::string default_name;
  if (!cfg.models_dir.empty()) {
    std::error_code ec;
    if (!std::filesystem::is_directory(cfg.models_dir, ec))
      throw UsageError("models_dir '" + cfg.models_dir + "' is not a folder");
    engine::CatalogOptions c;
    c.models_dir = cfg.models_dir;
    c.embeddings_dir = cfg.embeddings_dir;
    c.hash_cache = cfg.hash_cache;
    c.load = load;
    if (!cfg.model.empty()) c.extra_checkpoints = {cfg.model};
    // Embeddings are read whole to say why one cannot be used (they are small); other files'
    // headers are checked, and a LoRA's tensors when a request first uses it.
    c.check = [](engine::ModelKind kind, const std::string& path) -> std::string {
      try {
        if (kind == engine::ModelKind::kEmbedding)
          pipeline::TextualInversion::load(path);
        else
          pipeline::check_safetensors_file(path);
      } catch (const std::exception& e) {
        return e.what();
      }
      return "";
    };
    catalog = std::make_shared<engine::ModelCatalog>(c);
    for (const auto& e : catalog->list(engine::ModelKind::kCheckpoint))
      if (!e.error.empty()) spdlog::warn("checkpoint {} cannot be used: {}", e.name, e.error);
    if (!cfg.default_model.empty() && cfg.model.empty()) {
      const auto e = catalog->find(engine::ModelKind::kCheckpoint, cfg.default_model);
      if (!e) throw UsageError("default_model '" + cfg.default_model + "' is not in models_dir");
      if (!e->error.empty())
        throw UsageError("default_model '" + cfg.default_model + "' cannot be used: " + e->error);
    }
    if (const auto e = catalog->default_checkpoint(cfg.model.empty() ? cfg.default_model : "")) {
      model_path = e->path;
      default_name = e->name;
    }
    spdlog::info("models folder {}: {} checkpoints, {} LoRAs, {} VAEs, {} embeddings",
                 cfg.models_dir, catalog->list(engine::ModelKind::kCheckpoint).size(),
                 catalog->list(engine::ModelKind::kLora).size(),
                 catalog->list(engine::ModelKind::kVae).size(),
                 catalog->list(engine::ModelKind::kEmbedding).size());
  }
  if (model_path.empty()) {
    model_path = pipeline::bundled_model_path();
    spdlog::info("no --model given: using the bundled tiny model at {} (for tests and demos only)",
                 model_path);
  }

  // Listen first: /healthz answers and /readyz says 503 while the model loads.
  server::Server server(cfg);
  if (catalog) server.set_catalog(catalog, default_name);
  server.start();

  // Buckets are counted in images; a UNet batch has one row per image, two with guidance.
  load.batch_buckets.clear();
  for (int b : cfg.batch_buckets)
    for (int rows : {b, 2 * b})
      if (std::find(load.batch_buckets.begin(), load.batch_buckets.end(), rows) ==
          load.batch_buckets.end())
        load.batch_buckets.push_back(rows);
  // One worker per GPU: with device "auto" and several GPUs, a copy of the model on each.
  std::vector<std::string> devices = {cfg.device};
  if (cfg.device == "auto" && pipeline::cuda_device_count() > 1) {
    devices.clear();
    for (int i = 0; i < pipeline::cuda_device_count(); ++i)
      devices.push_back("cuda:" + std::to_string(i));
  }
  std::vector<std::shared_ptr<pipeline::Model>> models;
  for (const auto& device : devices) {
    load.device = device;
    models.push_back(pipeline::Model::load(model_path, load));
    const auto& info = models.back()->info();
    spdlog::info("model {} ({}, {}, native {} px) on {} in {}, loaded in {:.1f} s", info.name,
                 pipeline::family_display_name(info.family), info.layout, info.native_size,
                 info.device, info.precision, info.load_seconds);
  }
  const auto model = models.front();

  if (!server.stop_requested()) {
    auto options = engine_options(cfg);
    if (catalog) add_models(catalog, load, default_name, &options);
    std::shared_ptr<engine::Engine> engine =
        engine::Engine::create(options, models, make_cache(cfg));
    if (catalog) {
      engine->set_textual_inversions(textual_inversions(*catalog));
      server.on_refresh([catalog, weak = std::weak_ptr<engine::Engine>(engine)] {
        if (const auto e = weak.lock()) e->set_textual_inversions(textual_inversions(*catalog));
      });
    }
    server.set_backend(engine, model);
    // Jobs queue during warm-up; /readyz turns ready once it has worked everywhere.
    while (!server.stop_requested() && !engine->warm_up_done())
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (!server.stop_requested() && !engine->ready()) {
      spdlog::error("warm-up failed on every device ({}); the model cannot run here, exiting",
                    engine->warm_up_error());
      server.shutdown();
      return 1;
    }
    for (const auto& w : engine->workers())
      if (w.state == "failed")
        spdlog::error("worker on {} failed its warm-up and takes no jobs: {}", w.device, w.error);
    spdlog::info("accepting jobs (max_queue {}, max_batch {})", cfg.max_queue, cfg.max_batch);
  }
  server.wait_for_stop();
  server.shutdown();
  return 0;
}

}  // namespace sdserve
