#include "config/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "config/safe_json.h"

extern char** environ;

namespace sdserve::config {
namespace {

using nlohmann::json;

enum class Type { kString, kInt, kNumber, kBool, kIntList, kStringList };

// How one key is checked, read and written. Values arrive as JSON (file) or text (env, flags);
// text is first turned into JSON by type, so both paths share one checker.
struct Key {
  std::string name;
  Type type;
  std::string help;
  double lo = 0, hi = 0;             // numeric range (ints, numbers, list elements)
  bool lo_exclusive = false;         // "> lo" instead of ">= lo"
  std::vector<std::string> choices;  // allowed strings; empty: any
  std::function<json(const ServiceConfig&)> get;
  std::function<void(ServiceConfig&, const json&)> set;
};

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

// Environment variables with the prefix that are not keys but are still ours.
bool is_meta_env(const std::string& name) {
  // Not configuration keys: where the config file and bundled models are, and the benchmark's
  // switch for the fused CUDA kernels (read by the pipeline).
  return name == "SDSERVE_CONFIG" || name == "SDSERVE_MODELS_DIR" ||
         name == "SDSERVE_FUSED_KERNELS";
}

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

std::string num(double v) {
  if (std::floor(v) == v && std::fabs(v) < 1e15) return std::to_string(static_cast<long long>(v));
  std::ostringstream s;
  s << v;
  return s.str();
}

std::string range_text(const Key& k) {
  return (k.lo_exclusive ? "greater than " + num(k.lo) + " and at most "
                         : "between " + num(k.lo) + " and ") +
         num(k.hi);
}

[[noreturn]] void fail(const std::string& source, const Key& k, const std::string& what,
                       const json& got) {
  throw ConfigError(source + ": " + k.name + " " + what + ", got " + safe_json::describe(got));
}

bool in_range(const Key& k, double v) {
  return (k.lo_exclusive ? v > k.lo : v >= k.lo) && v <= k.hi;
}

void check_int(const Key& k, const json& v, const std::string& source, const json& whole) {
  const std::string what =
      k.type == Type::kIntList ? "must be a list of integers each " : "must be an integer ";
  if (!v.is_number_integer()) fail(source, k, what + range_text(k), whole);
  const double d = v.is_number_unsigned() ? static_cast<double>(v.get<uint64_t>())
                                          : static_cast<double>(v.get<int64_t>());
  if (!in_range(k, d)) fail(source, k, what + range_text(k), whole);
}

// Checks `v` against the key's type and range, then stores it.
void check_and_set(ServiceConfig& c, const Key& k, const json& v, const std::string& source) {
  switch (k.type) {
    case Type::kString:
      if (!v.is_string()) fail(source, k, "must be a string", v);
      if (!k.choices.empty() &&
          std::find(k.choices.begin(), k.choices.end(), v.get<std::string>()) == k.choices.end()) {
        std::string list;
        for (const auto& s : k.choices) list += (list.empty() ? "" : ", ") + s;
        fail(source, k, "must be one of " + list, v);
      }
      break;
    case Type::kInt:
      check_int(k, v, source, v);
      break;
    case Type::kNumber:
      if (!v.is_number() || !in_range(k, v.get<double>()))
        fail(source, k, "must be a number " + range_text(k), v);
      break;
    case Type::kBool:
      if (!v.is_boolean()) fail(source, k, "must be true or false", v);
      break;
    case Type::kIntList:
      if (!v.is_array() || v.empty())
        fail(source, k, "must be a non-empty list of integers " + range_text(k), v);
      for (const auto& e : v) check_int(k, e, source, v);
      break;
    case Type::kStringList:
      if (!v.is_array()) fail(source, k, "must be a list of strings", v);
      for (const auto& e : v)
        if (!e.is_string() || e.get<std::string>().empty())
          fail(source, k, "must be a list of non-empty strings", v);
      break;
  }
  k.set(c, v);
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::string item;
  std::istringstream in(s);
  while (std::getline(in, item, ','))
    if (!trim(item).empty()) out.push_back(trim(item));
  return out;
}

// Text from the environment or a flag, as JSON of the key's type. Unparseable text becomes a
// JSON string so that the checker reports it with the key's expected type.
json from_text(const Key& k, const std::string& text) {
  const std::string t = trim(text);
  auto integer = [](const std::string& s) -> json {
    if (s.empty()) return json(s);
    size_t used = 0;
    try {
      if (s[0] == '-') {
        const long long v = std::stoll(s, &used);
        if (used == s.size()) return json(v);
      } else {
        const unsigned long long v = std::stoull(s, &used);
        if (used == s.size()) return json(static_cast<uint64_t>(v));
      }
    } catch (const std::exception&) {
    }
    return json(s);
  };
  switch (k.type) {
    case Type::kString:
      return json(text);
    case Type::kInt:
      return integer(t);
    case Type::kNumber: {
      size_t used = 0;
      try {
        const double v = std::stod(t, &used);
        if (used == t.size() && std::isfinite(v)) return json(v);
      } catch (const std::exception&) {
      }
      return json(text);
    }
    case Type::kBool: {
      std::string l = t;
      std::transform(l.begin(), l.end(), l.begin(),
                     [](unsigned char ch) { return std::tolower(ch); });
      if (l == "true" || l == "1" || l == "yes" || l == "on") return json(true);
      if (l == "false" || l == "0" || l == "no" || l == "off") return json(false);
      return json(text);
    }
    case Type::kIntList:
    case Type::kStringList: {
      if (!t.empty() && t[0] == '[') {
        try {
          return safe_json::parse(t);
        } catch (const safe_json::Error&) {
          return json(text);
        }
      }
      json arr = json::array();
      for (const auto& item : split_commas(t))
        arr.push_back(k.type == Type::kIntList ? integer(item) : json(item));
      return arr;
    }
  }
  return json(text);
}

std::string read_file(const std::string& path) {
  // Not a FIFO or a device: opening one would block start-up or read without end.
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw ConfigError("config file '" + path + "' is not a regular file");
  constexpr uintmax_t kMaxConfigBytes = 1 << 20;
  if (std::filesystem::file_size(path, ec) > kMaxConfigBytes || ec)
    throw ConfigError("config file '" + path + "' is larger than 1 MiB or unreadable");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("config file '" + path + "' cannot be read");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

const std::vector<KeyInfo>& keys() {
  static const std::vector<KeyInfo> infos = [] {
    std::vector<KeyInfo> out;
    const ServiceConfig defaults;
    for (const auto& k : table()) {
      const json v = k.get(defaults);
      // 600 rather than 600.0
      const std::string text = v.is_number_float() ? num(v.get<double>()) : v.dump();
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

void apply_json(ServiceConfig& config, const std::string& json_text, const std::string& source) {
  json doc;
  try {
    doc = safe_json::parse(json_text);
  } catch (const safe_json::Error& e) {
    throw ConfigError(source + ": not valid JSON (" + e.what() + ")");
  }
  if (!doc.is_object()) throw ConfigError(source + ": must be a JSON object of keys");
  for (const auto& [name, value] : doc.items()) {
    const Key* k = find_key(name);
    if (!k)
      throw ConfigError(source + ": unknown key '" + name + "' (known: " + known_keys() + ")");
    check_and_set(config, *k, value, source);
  }
}

void apply_value(ServiceConfig& config, const std::string& key, const std::string& value,
                 const std::string& source) {
  const Key* k = find_key(key);
  if (!k) throw ConfigError(source + ": unknown key '" + key + "' (known: " + known_keys() + ")");
  const json v = from_text(*k, value);
  // "," names no item: taken as an empty list it would silently mean "none" (for api_keys, a
  // service open to everyone). Only empty text (or "[]") is an empty list.
  const std::string text = trim(value);
  if (v.is_array() && v.empty() && !text.empty() && text[0] != '[')
    fail(source, *k,
         "holds no item after splitting on commas; leave it empty or unset for none, or name "
         "at least one",
         json(value));
  check_and_set(config, *k, v, source);
}

void validate(const ServiceConfig& c) {
  if (c.host.empty()) throw ConfigError("host must not be empty");
  for (size_t i = 1; i < c.batch_buckets.size(); ++i)
    if (c.batch_buckets[i] <= c.batch_buckets[i - 1])
      throw ConfigError("batch_buckets must be strictly ascending, got " +
                        json(c.batch_buckets).dump());
  if (c.max_batch > c.batch_buckets.back())
    throw ConfigError("max_batch (" + std::to_string(c.max_batch) +
                      ") must not exceed the largest of batch_buckets (" +
                      std::to_string(c.batch_buckets.back()) + ")");
  if (c.default_timeout_s > c.max_timeout_s)
    throw ConfigError("default_timeout_s (" + num(c.default_timeout_s) +
                      ") must not exceed max_timeout_s (" + num(c.max_timeout_s) + ")");
  for (const auto& o : c.cors_allow_origins) {
    // An origin is scheme://host[:port] with nothing after: what browsers send in Origin.
    const auto scheme = o.find("://");
    const bool web = (o.rfind("http://", 0) == 0 || o.rfind("https://", 0) == 0) &&
                     o.size() > scheme + 3 && o.find('/', scheme + 3) == std::string::npos;
    if (o != "*" && !web)
      throw ConfigError(
          "cors_allow_origins entries are origins like https://app.example.com "
          "(no path) or '*', got \"" +
          o + "\"");
  }
  for (const auto& h : c.allowed_hosts) {
    // A name as it appears in a Host header, without scheme, port or path.
    const bool name = !h.empty() && h.find_first_of("/:@ ") == std::string::npos;
    const bool v6 = h.size() > 2 && h.front() == '[' && h.back() == ']';
    if (h != "*" && !name && !v6)
      throw ConfigError(
          "allowed_hosts entries are host names like sd.example.com or addresses (IPv6 in "
          "brackets), without scheme or port, or '*'; got \"" +
          h + "\"");
  }
  const std::string& d = c.device;
  const bool cuda_n = d.rfind("cuda:", 0) == 0 && d.size() > 5 &&
                      d.find_first_not_of("0123456789", 5) == std::string::npos;
  if (d != "auto" && d != "cpu" && d != "cuda" && !cuda_n)
    throw ConfigError("device must be auto, cpu, cuda or cuda:N, got \"" + d + "\"");
}

Loaded load(const std::vector<std::string>& args, const std::map<std::string, std::string>& env) {
  Loaded out;
  for (const auto& k : table()) out.origin[k.name] = "default";

  // Flags first (only parsed here), so that --help wins over any bad setting.
  struct FlagValue {
    std::string flag, key, value;
  };
  std::vector<FlagValue> flags;
  std::string config_file;
  bool have_config_flag = false;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string a = args[i];
    if (a == "--help" || a == "-h") {
      out.help = true;
      return out;
    }
    if (a.rfind("--", 0) != 0 || a.size() == 2)
      throw ConfigError("unexpected argument '" + a + "' (options look like --max-queue 8)");
    std::string value;
    bool inline_value = false;
    if (const auto eq = a.find('='); eq != std::string::npos) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
      inline_value = true;
    }
    std::string name = a.substr(2);
    std::replace(name.begin(), name.end(), '-', '_');
    const Key* k = find_key(name);
    if (name != "config" && !k)
      throw ConfigError("unknown option '" + a + "' (see sdserve serve --help)");
    if (!inline_value) {
      // A bool flag alone means true; it takes the next argument only when that is a bool.
      const bool next_is_bool = i + 1 < args.size() && k && k->type == Type::kBool &&
                                from_text(*k, args[i + 1]).is_boolean();
      if (k && k->type == Type::kBool && !next_is_bool) {
        value = "true";
      } else {
        if (i + 1 >= args.size()) throw ConfigError("option '" + a + "' needs a value");
        value = args[++i];
      }
    }
    if (name == "config") {
      config_file = value;
      have_config_flag = true;
    } else {
      flags.push_back({a, name, value});
    }
  }
  if (!have_config_flag) {
    if (auto it = env.find("SDSERVE_CONFIG"); it != env.end()) config_file = it->second;
  }
  out.config_file = config_file;

  if (!config_file.empty()) {
    const std::string text = read_file(config_file);
    apply_json(out.config, text, "config file " + config_file);
    const json doc = safe_json::parse(text);  // valid: apply_json accepted it
    for (const auto& [name, value] : doc.items()) out.origin[name] = "file";
  }
  for (const auto& [name, value] : env) {
    if (name.rfind("SDSERVE_", 0) != 0 || is_meta_env(name)) continue;
    std::string key = name.substr(8);
    std::transform(key.begin(), key.end(), key.begin(),
                   [](unsigned char ch) { return std::tolower(ch); });
    if (!find_key(key))
      throw ConfigError("environment variable " + name +
                        " is not a configuration key (known: " + known_keys() + ")");
    apply_value(out.config, key, value, "environment variable " + name);
    out.origin[key] = "env";
  }
  for (const auto& f : flags) {
    apply_value(out.config, f.key, f.value, "option " + f.flag);
    out.origin[f.key] = "flag";
  }
  validate(out.config);
  return out;
}

std::map<std::string, std::string> process_environment() {
  std::map<std::string, std::string> out;
  for (char** e = environ; e && *e; ++e) {
    const std::string entry(*e);
    const auto eq = entry.find('=');
    if (eq == std::string::npos) continue;
    const std::string name = entry.substr(0, eq);
    if (name.rfind("SDSERVE_", 0) == 0) out[name] = entry.substr(eq + 1);
  }
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
    else if (k.name == "model")
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
