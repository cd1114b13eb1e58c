// The key table, and what is derived from it: keys() for --help and tests, each key's names
// in the environment and on the command line, --help, and the start-up log's JSON.
#include "config/keys.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <sstream>

#include "config/safe_json.h"

namespace sdserve::config {
namespace detail {
namespace {

template <typename T>
std::function<json(const ServiceConfig&)> getter(T ServiceConfig::*m) {
  return [m](const ServiceConfig& c) { return json(c.*m); };
}
template <typename T>
std::function<void(ServiceConfig&, const json&)> setter(T ServiceConfig::*m) {
  return [m](ServiceConfig& c, const json& v) { c.*m = v.get<T>(); };
}

Key key(std::string name, Type type, std::string help, double lo, double hi,
        std::function<json(const ServiceConfig&)> get,
        std::function<void(ServiceConfig&, const json&)> set, std::vector<std::string> choices = {},
        bool lo_exclusive = false) {
  Key k;
  k.name = std::move(name);
  k.type = type;
  k.help = std::move(help);
  k.lo = lo;
  k.hi = hi;
  k.lo_exclusive = lo_exclusive;
  k.choices = std::move(choices);
  k.get = std::move(get);
  k.set = std::move(set);
  return k;
}

#define SDSERVE_MEMBER(m) getter(&ServiceConfig::m), setter(&ServiceConfig::m)

}  // namespace

const std::vector<Key>& table() {
  constexpr double kBig = 1e7;  // ~115 days: the largest duration we accept
  static const std::vector<Key> keys = {
      key("host", Type::kString, "address to listen on (0.0.0.0 for all interfaces)", 0, 0,
          SDSERVE_MEMBER(host)),
      key("port", Type::kInt, "TCP port; 0 picks a free one (logged as 'listening on ...')", 0,
          65535, SDSERVE_MEMBER(port)),
      key("model", Type::kString,
          "diffusers folder or single-file .safetensors; empty: the bundled tiny model", 0, 0,
          SDSERVE_MEMBER(model)),
      key("models_dir", Type::kString,
          "a models folder (A1111's or ComfyUI's layout: Stable-diffusion/ or checkpoints/, "
          "Lora/ or loras/, VAE/ or vae/, embeddings/): checkpoints chosen per request by "
          "name or hash; empty: only --model",
          0, 0, SDSERVE_MEMBER(models_dir)),
      key("embeddings_dir", Type::kString,
          "textual-inversion embeddings besides MODELS_DIR/embeddings (A1111 keeps them beside "
          "models/)",
          0, 0, SDSERVE_MEMBER(embeddings_dir)),
      key("default_model", Type::kString,
          "the checkpoint of models_dir that requests without a model use (name or hash); "
          "empty: the first by name",
          0, 0, SDSERVE_MEMBER(default_model)),
      key("hash_cache", Type::kString,
          "file keeping the models' SHA-256 hashes by path, size and time; empty: "
          "MODELS_DIR/.sdserve-hashes.json",
          0, 0, SDSERVE_MEMBER(hash_cache)),
      key("model_memory_mb", Type::kInt,
          "checkpoint weights kept loaded per device at most, least recently used evicted "
          "first; 0: no bound",
          0, 1 << 24, SDSERVE_MEMBER(model_memory_mb)),
      key("single_file_config", Type::kString,
          "for a single-file model: a diffusers folder of the same architecture whose configs "
          "and tokenizers to use instead of inferred ones; empty: inferred from shapes",
          0, 0, SDSERVE_MEMBER(single_file_config)),
      key("device", Type::kString, "auto (first CUDA GPU, else CPU), cpu, cuda or cuda:N", 0, 0,
          SDSERVE_MEMBER(device)),
      key("precision", Type::kString, "compute dtype; auto: fp16 on CUDA, fp32 on the CPU", 0, 0,
          SDSERVE_MEMBER(precision),
          {"auto", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16"}),
      key("vae_precision", Type::kString,
          "VAE dtype; auto: the compute dtype, redone in fp32 if an fp16 decode overflows "
          "where the VAE's config asks for fp32 (force_upcast); fp32: as diffusers decodes those",
          0, 0, SDSERVE_MEMBER(vae_precision),
          {"auto", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16"}),
      key("max_queue", Type::kInt, "jobs that may wait; one more is refused with 429", 1, 1e6,
          SDSERVE_MEMBER(max_queue)),
      key("max_batch", Type::kInt, "images denoised together in one UNet batch", 1, 1024,
          SDSERVE_MEMBER(max_batch)),
      key("batch_buckets", Type::kIntList,
          "UNet batch sizes, ascending; a batch is padded up to the next one", 1, 1024,
          SDSERVE_MEMBER(batch_buckets)),
      key("light_load_efficiency", Type::kNumber,
          "under light load a worker batches up to the smallest batch size with this fraction of "
          "the best images/s measured at warm-up",
          0, 1, SDSERVE_MEMBER(light_load_efficiency)),
      key("light_load_max_wait_s", Type::kNumber,
          "heavy load (batch up to max_batch) begins when the next job has waited this long or "
          "a light-load batch of images is queued; 0: always",
          0, 3600, SDSERVE_MEMBER(light_load_max_wait_s)),
      key("decode_batch", Type::kInt,
          "finished images decoded by the VAE in one call (each size is warmed up at start)", 1, 64,
          SDSERVE_MEMBER(decode_batch)),
      key("warm_up_budget_s", Type::kNumber,
          "warm-up times UNet steps by batch size (for the admission policy) until this many "
          "seconds after it began, cheapest first, and estimates the rest; at least one step is "
          "timed",
          0, 86400, SDSERVE_MEMBER(warm_up_budget_s)),
      key("embedding_cache_mb", Type::kInt,
          "prompt embeddings kept in memory (on each worker's device), MiB; 0: none", 0, 1 << 20,
          SDSERVE_MEMBER(embedding_cache_mb)),
      key("embedding_cache_on_host", Type::kBool,
          "keep the in-memory embeddings in host memory (shared by all GPUs, copied on a hit) "
          "instead of on each GPU",
          0, 0, SDSERVE_MEMBER(embedding_cache_on_host)),
      key("redis_url", Type::kString,
          "redis://[[user]:password@]host[:port][/db] shared by replicas for embeddings; empty: "
          "no Redis",
          0, 0, SDSERVE_MEMBER(redis_url)),
      key("redis_ttl_s", Type::kInt, "how long an embedding stays in Redis", 1, 365 * 86400,
          SDSERVE_MEMBER(redis_ttl_s)),
      key("redis_timeout_ms", Type::kInt,
          "Redis connect and command timeout; slower means a miss, never an error", 1, 60000,
          SDSERVE_MEMBER(redis_timeout_ms)),
      key("default_timeout_s", Type::kNumber,
          "a job still queued after this many seconds ends 'expired' (request: timeout_s)", 0, kBig,
          SDSERVE_MEMBER(default_timeout_s), {}, true),
      key("max_timeout_s", Type::kNumber, "the largest timeout_s a request may ask for", 0, kBig,
          SDSERVE_MEMBER(max_timeout_s), {}, true),
      key("max_run_s", Type::kNumber,
          "a job running (from its start) longer than this many seconds stops between UNet "
          "steps and ends 'timed_out'; also the largest max_run_s a request may ask for",
          0, kBig, SDSERVE_MEMBER(max_run_s), {}, true),
      key("max_memory_mb", Type::kInt,
          "memory (MiB) the estimated peaks may take: a size one image of which cannot fit "
          "(its UNet call plus its VAE decode) is refused with 400, and UNet batches and "
          "decodes are capped to what fits; 0: what the device has free at start-up",
          0, 1 << 30, SDSERVE_MEMBER(max_memory_mb)),
      key("result_ttl_s", Type::kNumber, "finished images are kept this many seconds (then 410)", 0,
          kBig, SDSERVE_MEMBER(result_ttl_s), {}, true),
      key("result_max_mb", Type::kInt,
          "finished images are kept within this many MiB of PNG (oldest go first)", 1, 1 << 30,
          SDSERVE_MEMBER(result_max_mb)),
      key("max_body_bytes", Type::kInt, "largest request body; larger is refused with 413", 1024,
          1 << 30, SDSERVE_MEMBER(max_body_bytes)),
      // At most 60 KiB: Beast stores a header value in 16 bits, and larger blocks would let one
      // field (or a chunked trailer) overflow it.
      key("max_header_bytes", Type::kInt, "largest request header block; larger gets 431", 1024,
          61440, SDSERVE_MEMBER(max_header_bytes)),
      key("max_connections", Type::kInt,
          "open HTTP and WebSocket connections at most; a new one beyond is answered 503 and "
          "closed",
          1, 1 << 20, SDSERVE_MEMBER(max_connections)),
      key("read_timeout_s", Type::kNumber,
          "a request must arrive within this many seconds; idle keep-alive connections close", 0,
          3600, SDSERVE_MEMBER(read_timeout_s), {}, true),
      key("api_keys", Type::kStringList,
          "accepted 'Authorization: Bearer KEY' keys (comma-separated in env/flags); empty: open",
          0, 0, SDSERVE_MEMBER(api_keys)),
      key("cors_allow_origins", Type::kStringList,
          "browser origins (scheme://host[:port], or '*' for any) whose pages may call the API "
          "(CORS; comma-separated in env/flags); empty: same-origin pages only",
          0, 0, SDSERVE_MEMBER(cors_allow_origins)),
      key("allowed_hosts", Type::kStringList,
          "host names (the Host header, port ignored; '*' for any) answered besides localhost "
          "and loopback addresses (comma-separated in env/flags); empty: any name when bound to "
          "all interfaces, only those when bound to loopback",
          0, 0, SDSERVE_MEMBER(allowed_hosts)),
      key("metrics_auth", Type::kBool, "whether /metrics needs an API key too (when keys are set)",
          0, 0, SDSERVE_MEMBER(metrics_auth)),
      key("gpu_metrics_interval_s", Type::kNumber,
          "how often GPU utilisation, memory, power, temperature and clock are read through "
          "NVML for /metrics; 0: never (without NVML the GPU metrics are absent)",
          0, 3600, SDSERVE_MEMBER(gpu_metrics_interval_s)),
      key("shutdown_grace_s", Type::kNumber,
          "on SIGTERM/SIGINT, running and queued jobs get this long to finish", 0, 86400,
          SDSERVE_MEMBER(shutdown_grace_s)),
      key("log_level", Type::kString, "trace, debug, info, warn, error, critical or off", 0, 0,
          SDSERVE_MEMBER(log_level),
          {"trace", "debug", "info", "warn", "error", "critical", "off"}),
      key("log_format", Type::kString, "text (human) or json (one object per line)", 0, 0,
          SDSERVE_MEMBER(log_format), {"text", "json"}),
      key("http_threads", Type::kInt, "threads serving HTTP and WebSocket connections", 1, 256,
          SDSERVE_MEMBER(http_threads)),
      key("ws_queue_limit", Type::kInt,
          "events queued per WebSocket for a slow reader before progress/previews are dropped", 1,
          1e6, SDSERVE_MEMBER(ws_queue_limit)),
  };
  return keys;
}

#undef SDSERVE_MEMBER

const Key* find_key(const std::string& name) {
  for (const auto& k : table())
    if (k.name == name) return &k;
  return nullptr;
}

std::string known_keys() {
  std::string out;
  for (const auto& k : table()) out += (out.empty() ? "" : ", ") + k.name;
  return out;
}

std::string num(double v) {
  if (std::floor(v) == v && std::fabs(v) < 1e15) return std::to_string(static_cast<long long>(v));
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace detail

using detail::json;
using detail::table;
using detail::Type;

namespace {

std::string type_name(Type t) {
  switch (t) {
    case Type::kString:
      return "string";
    case Type::kInt:
      return "integer";
    case Type::kNumber:
      return "number";
    case Type::kBool:
      return "bool";
    case Type::kIntList:
      return "list of integers";
    case Type::kStringList:
      return "list of strings";
  }
  return "?";
}

}  // namespace

const std::vector<KeyInfo>& keys() {
  static const std::vector<KeyInfo> infos = [] {
    std::vector<KeyInfo> out;
    const ServiceConfig defaults;
    for (const auto& k : table()) {
      const json v = k.get(defaults);
      // 600 rather than 600.0
      const std::string text = v.is_number_float() ? detail::num(v.get<double>()) : v.dump();
      out.push_back({k.name, type_name(k.type), text, k.help});
    }
    return out;
  }();
  return infos;
}

std::string env_name(const std::string& key) {
  std::string out = "SDSERVE_";
  for (char c : key) out += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

std::string flag_name(const std::string& key) {
  std::string out = "--" + key;
  std::replace(out.begin(), out.end(), '_', '-');
  return out;
}

std::string to_json(const ServiceConfig& c) {
  json out = json::object();
  for (const auto& k : table()) out[k.name] = k.get(c);
  json masked = json::array();
  for (size_t i = 0; i < c.api_keys.size(); ++i) masked.push_back("***");
  out["api_keys"] = masked;
  // A password in the Redis URL is a secret too: keep the rest, hide what is between :// and @.
  if (const auto at = c.redis_url.rfind('@'); at != std::string::npos) {
    const auto scheme = c.redis_url.find("://");
    const auto from = scheme == std::string::npos ? 0 : scheme + 3;
    if (at > from) out["redis_url"] = c.redis_url.substr(0, from) + "***" + c.redis_url.substr(at);
  }
  return safe_json::dump(out);  // string settings may hold any bytes (paths)
}

std::string help_text() {
  std::ostringstream s;
  s << "usage: sdserve serve [--model PATH] [--host ADDR] [--port N] [--config FILE] [options]\n"
       "\n"
       "Runs the HTTP/WebSocket generation service.\n"
       "\n"
       "Every setting below can come from (later wins): its default < the JSON config file\n"
       "(--config FILE, or SDSERVE_CONFIG) < the environment variable SDSERVE_<KEY> < the flag.\n"
       "Lists are JSON arrays in the file and comma-separated elsewhere. An unknown key or a bad\n"
       "value stops start-up (exit status 2).\n"
       "\n"
       "  --config FILE  (SDSERVE_CONFIG)\n"
       "      JSON object of the keys below, e.g. {\"port\": 9000, \"max_queue\": 128}\n";
  for (const auto& k : keys()) {
    std::string metavar = "VALUE";
    if (k.type == "bool")
      metavar = "[true|false]";
    else if (k.type == "integer")
      metavar = "N";
    else if (k.type == "number")
      metavar = k.name.size() > 2 && k.name.substr(k.name.size() - 2) == "_s" ? "SECONDS" : "X";
    else if (k.type.rfind("list", 0) == 0)
      metavar = "A,B,...";
    else if (k.name == "model" || k.name.find("_dir") != std::string::npos)
      metavar = "PATH";
    else
      metavar = "TEXT";
    s << "  " << flag_name(k.name) << " " << metavar << "  (" << env_name(k.name) << ", " << k.type
      << ", default " << k.default_value << ")\n"
      << "      " << k.help << "\n";
  }
  s << "  -h, --help\n      this text\n";
  return s.str();
}

}  // namespace sdserve::config
