// Configuration of `sdserve serve`: one struct, filled from four layers in this order (a later
// layer wins): built-in defaults < JSON config file (--config FILE or SDSERVE_CONFIG) <
// SDSERVE_* environment variables < command-line flags.
//
// Every key has the same name everywhere: `max_queue` in the file, SDSERVE_MAX_QUEUE in the
// environment, --max-queue (or --max_queue) on the command line. An unknown key or a bad value
// in any layer is a ConfigError whose message names the key and where it came from.
//
// A leaf library: no engine, server or torch dependencies. keys.cpp holds the key table (and
// --help), values.cpp reads and checks one value, validate.cpp checks across keys, load.cpp
// reads the layers.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace sdserve::config {

// A bad configuration: the process should print the message and exit with status 2.
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct ServiceConfig {
  // Network
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port (the bound one is logged)
  int http_threads = 2;
  // 48 MiB: a JSON body with a 2048x2048 PNG of RGBA noise and a mask of the same size, both
  // base64 (2 x 22.4 MB), fits; so does the same as multipart/form-data.
  int64_t max_body_bytes = 48 << 20;
  int max_header_bytes = 16 << 10;
  int max_connections = 1000;  // open HTTP and WebSocket connections; beyond, new ones get 503
  double read_timeout_s = 30;  // a request must arrive within this; idle keep-alive closes then
  int ws_queue_limit = 64;     // events queued per WebSocket before progress/previews are dropped
  std::vector<std::string> api_keys;  // empty: no authentication
  // Browser origins ("https://app.example.com", or "*") whose pages may call the API (CORS);
  // empty: none, so only same-origin pages (the one at /) can.
  std::vector<std::string> cors_allow_origins;
  // Host names (the Host header, port ignored) this service answers to besides localhost and the
  // loopback addresses, or "*" for any. When set, or when `host` is a loopback address, a
  // request naming another host is refused (DNS rebinding); bound to all interfaces without
  // it, any Host is accepted.
  std::vector<std::string> allowed_hosts;
  bool metrics_auth = false;
  double gpu_metrics_interval_s = 5;  // NVML sampling for /metrics; 0: off          // /metrics
                                      // needs an API key too (when keys are set)
  // Model
  std::string model;               // empty: the bundled tiny model (or default_model)
  // A models folder (engine/model_catalog.h): checkpoints chosen per request, LoRAs, VAEs and
  // embeddings. With it and no `model`, the default is default_model or the first by name.
  std::string models_dir;
  std::string embeddings_dir;  // A1111's embeddings/ beside models/
  std::string default_model;   // a checkpoint of models_dir by name or hash
  std::string hash_cache;      // "": MODELS_DIR/.sdserve-hashes.json
  // Checkpoints' weights kept on each device at most (least recently used evicted first);
  // 0: no bound.
  int model_memory_mb = 0;
  std::string single_file_config;  // pipeline::LoadOptions::single_file_config
  std::string device = "auto";
  std::string precision = "auto";
  std::string vae_precision = "auto";
  // Engine
  int max_queue = 64;
  int max_batch = 8;
  double light_load_efficiency = 0.9;  // the admission policy (engine/admission.h)
  double light_load_max_wait_s = 0.35;
  int decode_batch = 1;
  double warm_up_budget_s = 10;  // engine::EngineOptions::warm_up_budget_s
  int embedding_cache_mb = 256;  // the embedding cache (cache/embedding_cache.h)
  bool embedding_cache_on_host = false;
  std::string redis_url;
  int redis_ttl_s = 7 * 24 * 3600;
  int redis_timeout_ms = 50;
  std::vector<int> batch_buckets = {1, 2, 4, 8, 16, 32};
  double default_timeout_s = 600;
  double max_timeout_s = 3600;
  double max_run_s = 3600;
  int max_memory_mb = 0;  // estimated peaks at most (engine.h); 0: the device's free memory
                          // // a running job stops after this long (timed_out); request: max_run_s
  double result_ttl_s = 3600;
  int64_t result_max_mb = 1024;
  double shutdown_grace_s = 30;
  // Logging
  std::string log_level = "info";
  std::string log_format = "text";
};

// One configuration key, for --help and for tests.
struct KeyInfo {
  std::string name;           // "max_queue"
  std::string type;           // "int", "number", "string", "bool", "list of int", ...
  std::string default_value;  // as JSON text
  std::string help;
};
const std::vector<KeyInfo>& keys();

std::string env_name(const std::string& key);   // "max_queue" -> "SDSERVE_MAX_QUEUE"
std::string flag_name(const std::string& key);  // "max_queue" -> "--max-queue"

// The result of reading the command line.
struct Loaded {
  ServiceConfig config;
  std::string config_file;  // empty when none was given
  bool help = false;        // --help / -h: print help_text() and exit 0
  // Where each key's final value came from: "default", "file", "env", "flag".
  std::map<std::string, std::string> origin;
};

// Reads every layer. `args` are the arguments after the sub-command; `env` maps environment
// variable names to values (only SDSERVE_* ones matter). Throws ConfigError.
Loaded load(const std::vector<std::string>& args, const std::map<std::string, std::string>& env);
// The process environment's SDSERVE_* variables.
std::map<std::string, std::string> process_environment();

// Single layers, for tests: apply a JSON object (as from a file) or one textual value.
void apply_json(ServiceConfig& config, const std::string& json_text, const std::string& source);
void apply_value(ServiceConfig& config, const std::string& key, const std::string& value,
                 const std::string& source);
// Cross-key checks (default_timeout_s <= max_timeout_s, ...). Throws ConfigError.
void validate(const ServiceConfig& config);

// The effective configuration as a JSON object (api_keys masked), for the start-up log.
std::string to_json(const ServiceConfig& config);

// `sdserve serve --help`: usage plus every key with its type, default and meaning.
std::string help_text();

}  // namespace sdserve::config
