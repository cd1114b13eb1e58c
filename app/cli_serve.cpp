// `sdserve serve`: configuration, model, engine, and the HTTP/WebSocket server around them.
#include <spdlog/spdlog.h>
#include <algorithm>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "app/cli.h"
#include "cache/embedding_cache.h"
#include "cache/redis_client.h"
#include "config/config.h"
#include "engine/engine.h"
#include "pipeline/pipeline.h"
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

  std::string model_path = cfg.model;
  if (model_path.empty()) {
    model_path = pipeline::bundled_model_path();
    spdlog::info("no --model given: using the bundled tiny model at {} (for tests and demos only)",
                 model_path);
  }

  // Listen first: /healthz answers and /readyz says 503 while the model loads.
  server::Server server(cfg);
  server.start();

  pipeline::LoadOptions load;
  load.device = cfg.device;
  load.precision = cfg.precision;
  load.vae_precision = cfg.vae_precision;
  load.single_file_config = cfg.single_file_config;
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
    std::shared_ptr<engine::Engine> engine =
        engine::Engine::create(engine_options(cfg), models, make_cache(cfg));
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
