// The layers, later winning: defaults < the JSON config file < SDSERVE_* variables < flags.
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "config/keys.h"
#include "config/safe_json.h"
#include "config/values.h"

extern char** environ;

namespace sdserve::config {

using detail::find_key;
using detail::from_text;
using detail::json;
using detail::Key;
using detail::known_keys;
using detail::table;
using detail::Type;

namespace {

// Environment variables with the prefix that are not keys but are still ours.
bool is_meta_env(const std::string& name) {
  // Not configuration keys: where the config file and bundled models are, and the benchmark's
  // switch for the fused CUDA kernels (read by the pipeline).
  return name == "SDSERVE_CONFIG" || name == "SDSERVE_MODELS_DIR" ||
         name == "SDSERVE_FUSED_KERNELS";
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

}  // namespace sdserve::config
