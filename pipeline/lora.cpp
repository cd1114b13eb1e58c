// Reading a LoRA file: its format, its adapters (down, up, scale) and what it is for.
#include "pipeline/lora.h"

#include <atomic>
#include <cmath>
#include <filesystem>
#include <map>
#include <tuple>
#include <utility>

#include "config/safe_json.h"
#include "pipeline/errors.h"
#include "pipeline/io/model_files.h"
#include "pipeline/io/names.h"
#include "pipeline/io/safetensors.h"
#include "pipeline/io/tensor_io.h"
#include "pipeline/lora_impl.h"

namespace sdserve::pipeline {
namespace {

namespace fs = std::filesystem;
using lora_names::Component;
using lora_names::Part;

std::atomic<uint64_t> next_lora_id{1};

constexpr int64_t kMaxRank = 8192;  // far past any published LoRA (ranks are 4..256)

bool float_dtype(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16 ||
         dtype == DType::kF64;
}

// A PEFT LoraConfig as diffusers stores it (safetensors metadata "lora_adapter_metadata",
// members "<component>.r", "<component>.lora_alpha", ...).
struct PeftConfig {
  bool present = false;
  double r = 0, lora_alpha = 0;
  bool rslora = false;
  std::vector<std::pair<std::string, double>> rank_pattern, alpha_pattern;
};

// peft's pattern match (get_pattern_key: `(.*\.)?(key)$`), with the key taken literally (peft's
// keys are module names; a leading "^" anchors at the start, as diffusers writes rank patterns).
bool pattern_matches(const std::string& pattern, const std::string& module) {
  if (starts_with(pattern, "^")) return module == pattern.substr(1);
  return module == pattern || ends_with(module, "." + pattern);
}

double pattern_value(const std::vector<std::pair<std::string, double>>& patterns,
                     const std::string& module, double fallback) {
  for (const auto& [pattern, value] : patterns)
    if (pattern_matches(pattern, module)) return value;
  return fallback;
}

class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw ModelError("LoRA '" + path_ + "': " + what);
  }

  std::map<Component, PeftConfig> peft_configs(const std::map<std::string, std::string>& metadata) {
    std::map<Component, PeftConfig> out;
    const auto it = metadata.find("lora_adapter_metadata");
    if (it == metadata.end()) return out;
    nlohmann::json j;
    try {
      j = safe_json::parse(it->second, safe_json::Limits{8, 100000});
    } catch (const safe_json::Error& e) {
      fail(std::string("its lora_adapter_metadata is not valid JSON (") + e.what() + ")");
    }
    if (!j.is_object()) fail("its lora_adapter_metadata is not a JSON object");
    for (const Component c :
         {Component::kUnet, Component::kTextEncoder, Component::kTextEncoder2}) {
      const std::string prefix = std::string(lora_names::component_name(c)) + ".";
      const auto member = [&](const char* name) -> const nlohmann::json* {
        const auto m = j.find(prefix + name);
        return m == j.end() || m->is_null() ? nullptr : &*m;
      };
      const auto number = [&](const char* name) {
        const auto* v = member(name);
        if (v && !v->is_number()) fail("its metadata's " + prefix + name + " is not a number");
        return v ? v->get<double>() : 0.0;
      };
      const auto flag = [&](const char* name) {
        const auto* v = member(name);
        return v && v->is_boolean() && v->get<bool>();
      };
      const auto patterns = [&](const char* name) {
        std::vector<std::pair<std::string, double>> out;
        const auto* v = member(name);
        if (!v) return out;
        if (!v->is_object()) fail("its metadata's " + prefix + name + " is not an object");
        for (const auto& [k, value] : v->items()) {
          if (!value.is_number())
            fail("its metadata's " + prefix + name + " holds a value that is not a number");
          out.emplace_back(k, value.get<double>());
        }
        return out;
      };
      if (!member("r") && !member("lora_alpha")) continue;
      if (flag("use_dora"))
        fail(
            "it is DoRA (use_dora in its metadata), which sdserve does not support; use a "
            "LoRA or LoCon");
      if (flag("lora_bias"))
        fail(
            "its adapters have bias terms (lora_bias), which sdserve does "
            "not support");
      PeftConfig p;
      p.present = true;
      p.r = number("r");
      p.lora_alpha = member("lora_alpha") ? number("lora_alpha") : p.r;
      p.rslora = flag("use_rslora");
      p.rank_pattern = patterns("rank_pattern");
      p.alpha_pattern = patterns("alpha_pattern");
      out[c] = p;
    }
    return out;
  }

  std::unique_ptr<Lora::Impl> read() {
    std::error_code ec;
    const auto status = fs::status(path_, ec);
    if (ec || !fs::exists(status)) fail("no such file");
    if (fs::is_directory(status))
      fail(
          "is a folder; give the LoRA's .safetensors file (diffusers saves it as "
          "pytorch_lora_weights.safetensors)");
    if (is_pickle_file(path_))
      throw ModelError(
          "LoRA '" + path_ +
          "' is a pickle checkpoint, which sdserve does not load: unpickling a file "
          "can run arbitrary code. Convert it to .safetensors once, in an "
          "environment you trust: in Python, safetensors.torch.save_file(torch.load('" +
          path_ + "', weights_only=True), 'lora.safetensors')");
    const auto file = SafetensorsFile::open(path_);  // refuses truncated and malformed files

    // Formats that are not LoRA, by name, before anything else is said about the file.
    for (const auto& [key, view] : file->tensors()) {
      const auto format = lora_names::unsupported_format(key);
      if (!format.empty())
        fail("it is " + format + " (tensor '" + key +
             "'), which sdserve does not support; use a LoRA or LoCon (kohya lora_down / "
             "lora_up, or diffusers / PEFT lora_A / lora_B)");
    }

    struct Parts {
      const TensorView* down = nullptr;
      const TensorView* up = nullptr;
      const TensorView* alpha = nullptr;
      std::string down_key, up_key;
      std::string peft_module;
    };
    std::map<std::tuple<Component, bool, std::string>, Parts> modules;
    bool kohya = false, diffusers = false;
    for (const auto& [key, view] : file->tensors()) {
      const auto parsed = lora_names::parse_key(key);
      if (!parsed)
        fail("tensor '" + key +
             "' is not a LoRA adapter's (expected kohya's lora_unet_* / lora_te*_* with "
             ".lora_down.weight, .lora_up.weight, .alpha, or diffusers' unet.* / "
             "text_encoder.* with .lora_A.weight, .lora_B.weight)");
      (parsed->kohya ? kohya : diffusers) = true;
      auto& parts = modules[{parsed->component, parsed->kohya, parsed->module}];
      parts.peft_module = parsed->peft_module;
      const TensorView** slot = parsed->part == Part::kDown ? &parts.down
                                : parsed->part == Part::kUp ? &parts.up
                                                            : &parts.alpha;
      if (*slot)
        fail("it names the adapter of '" + parsed->module + "' twice (tensor '" + key + "')");
      *slot = &view;
      if (parsed->part == Part::kDown) parts.down_key = key;
      if (parsed->part == Part::kUp) parts.up_key = key;
    }
    if (modules.empty()) fail("it holds no tensors, so no LoRA adapters");
    if (kohya && diffusers)
      fail(
          "it mixes kohya names (lora_unet_*) with diffusers names (unet.*); sdserve reads "
          "one naming per file");
    const auto peft = peft_configs(file->metadata());

    auto impl = std::make_unique<Lora::Impl>();
    LoraInfo& info = impl->info;
    info.path = path_;
    info.name = fs::path(path_).stem().string();
    info.format = kohya ? "kohya" : "diffusers";
    info.bytes = fs::file_size(path_, ec);
    int64_t cross_width = 0, text_width = 0;
    bool second_encoder = false;
    for (const auto& [where, parts] : modules) {
      const auto& [component, is_kohya, module] = where;
      if (!parts.down || !parts.up)
        fail("the adapter of '" + module + "' lacks its " + (parts.down ? "up" : "down") +
             " factor" + (parts.down || parts.up ? "" : " (only an alpha)"));
      const auto name = parts.down_key;
      for (const auto* v : {parts.down, parts.up})
        if (!float_dtype(v->dtype))
          fail("tensor '" + (v == parts.down ? parts.down_key : parts.up_key) + "' is " +
               dtype_name(v->dtype) + "; LoRA factors are floating point");
      const auto& ds = parts.down->shape;
      const auto& us = parts.up->shape;
      const bool conv = ds.size() == 4;
      if ((ds.size() != 2 && !conv) || us.size() != ds.size() ||
          (conv && (us[2] != 1 || us[3] != 1)) || ds[0] != us[1] || ds[0] <= 0 ||
          ds[0] > kMaxRank || ds[1] <= 0 || us[0] <= 0)
        fail("the factors of '" + module + "' do not pair: down " + shape_string(ds) + ", up " +
             shape_string(us) +
             " (expected down (rank, in) and up (out, rank), or down (rank, in, kh, kw) and up "
             "(out, rank, 1, 1))");
      Lora::Impl::Adapter a;
      a.component = component;
      a.kohya = is_kohya;
      a.module = module;
      a.key = name;
      a.down = to_tensor(*parts.down, torch_dtype(parts.down->dtype));
      a.up = to_tensor(*parts.up, torch_dtype(parts.up->dtype));
      for (const auto& [t, key] : {std::pair{a.down, parts.down_key}, {a.up, parts.up_key}})
        if (!torch::isfinite(t).all().item<bool>())
          fail("tensor '" + key + "' holds values that are not finite (NaN or infinity)");
      const double rank = static_cast<double>(a.rank());
      if (parts.alpha) {
        if (!float_dtype(parts.alpha->dtype) && parts.alpha->dtype != DType::kI64 &&
            parts.alpha->dtype != DType::kI32)
          fail("the alpha of '" + module + "' is " + dtype_name(parts.alpha->dtype));
        const auto alpha = to_tensor(*parts.alpha, torch::kFloat64);
        if (alpha.numel() != 1) fail("the alpha of '" + module + "' is not one number");
        const double value = alpha.item<double>();
        if (!std::isfinite(value)) fail("the alpha of '" + module + "' is not finite");
        a.scale = value / rank;
      }
      if (const auto p = peft.find(component); p != peft.end() && !is_kohya) {
        const auto& config = p->second;
        const double r = pattern_value(config.rank_pattern, parts.peft_module, config.r);
        if (r != rank)
          fail("its metadata gives '" + parts.peft_module + "' rank " +
               std::to_string(static_cast<int64_t>(r)) + " but its factors have rank " +
               std::to_string(a.rank()));
        const double alpha =
            pattern_value(config.alpha_pattern, parts.peft_module, config.lora_alpha);
        a.scale = alpha / (config.rslora ? std::sqrt(rank) : rank);
      }
      info.rank = std::max(info.rank, static_cast<int>(a.rank()));
      info.locon = info.locon || (conv && (ds[2] > 1 || ds[3] > 1));
      if (component == Component::kUnet) {
        info.unet = true;
        const bool cross = ends_with(module, "attn2_to_k") || ends_with(module, "attn2.to_k") ||
                           ends_with(module, "attn2_to_v") || ends_with(module, "attn2.to_v");
        if (cross && !conv) cross_width = ds[1];
      } else {
        info.text_encoder = true;
        if (component == Component::kTextEncoder2) second_encoder = true;
        if (ends_with(module, "q_proj") && !conv) text_width = ds[1];
      }
      impl->adapters.push_back(std::move(a));
    }
    second_encoder =
        second_encoder ||
        (kohya && std::any_of(file->tensors().begin(), file->tensors().end(),
                              [](auto& t) { return starts_with(t.first, "lora_te1_"); }));
    const int64_t width = cross_width > 0 ? cross_width : text_width;
    if (second_encoder || width == 2048) {
      info.family = "sdxl";
    } else if (width == 768) {
      info.family = "sd1";
    } else if (width == 1024) {
      info.family = "sd2";
    }
    info.adapters = static_cast<int>(impl->adapters.size());
    return impl;
  }

 private:
  std::string path_;
};

}  // namespace

Lora::Lora(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Lora::~Lora() = default;

const LoraInfo& Lora::info() const {
  return impl_->info;
}

uint64_t Lora::id() const {
  return impl_->id;
}

std::shared_ptr<const Lora> Lora::load(const std::string& path) {
  auto impl = Reader(path).read();
  impl->id = next_lora_id.fetch_add(1);
  return std::make_shared<const Lora>(std::move(impl));
}

}  // namespace sdserve::pipeline
