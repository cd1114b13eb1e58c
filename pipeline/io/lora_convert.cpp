#include "pipeline/io/lora_convert.h"

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "pipeline/io/names.h"

namespace sdserve::pipeline::lora_names {
namespace {

// "a.b.c" -> {"a", "b", "c"}
std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    const size_t end = s.find(sep, start);
    out.push_back(s.substr(start, end - start));
    if (end == std::string::npos) return out;
    start = end + 1;
  }
}

std::string join(const std::vector<std::string>& parts, size_t from, char sep) {
  std::string out;
  for (size_t i = from; i < parts.size(); ++i) {
    if (i > from) out += sep;
    out += parts[i];
  }
  return out;
}

std::string underscored(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

// A non-negative integer field, or -1.
int number(const std::string& s) {
  if (s.empty() || s.size() > 6 ||
      !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return -1;
  return std::atoi(s.c_str());
}

// The UNet's block sizes, from its module names: resnets per down / up block, which down blocks
// downsample and which up blocks have attentions (the sgm layout's indices depend on them).
struct UnetLayout {
  std::vector<int> down_resnets, up_resnets;
  std::vector<bool> down_sampler, up_attention;
};

void grow(std::vector<int>& v, size_t i) {
  if (v.size() <= i) v.resize(i + 1, 0);
}
void grow(std::vector<bool>& v, size_t i) {
  if (v.size() <= i) v.resize(i + 1, false);
}

UnetLayout unet_layout(const std::vector<std::string>& modules) {
  UnetLayout l;
  for (const auto& m : modules) {
    const auto p = split(m, '.');
    if (p.size() < 3) continue;
    const int i = number(p[1]);
    if (i < 0) continue;
    const auto block = static_cast<size_t>(i);
    if (p[0] == "down_blocks") {
      grow(l.down_resnets, block);
      grow(l.down_sampler, block);
      if (p[2] == "resnets" && p.size() > 3 && number(p[3]) >= 0)
        l.down_resnets[block] = std::max(l.down_resnets[block], number(p[3]) + 1);
      if (p[2] == "downsamplers") l.down_sampler[block] = true;
    } else if (p[0] == "up_blocks") {
      grow(l.up_resnets, block);
      grow(l.up_attention, block);
      if (p[2] == "resnets" && p.size() > 3 && number(p[3]) >= 0)
        l.up_resnets[block] = std::max(l.up_resnets[block], number(p[3]) + 1);
      if (p[2] == "attentions") l.up_attention[block] = true;
    }
  }
  return l;
}

// A resnet's modules in the sgm layout.
std::string sgm_resnet_part(const std::string& name) {
  if (name == "conv1") return "in_layers.2";
  if (name == "conv2") return "out_layers.3";
  if (name == "time_emb_proj") return "emb_layers.1";
  if (name == "conv_shortcut") return "skip_connection";
  return "";
}

// "resnets" / "attentions" and what follows the layer index, inside an sgm block.
std::string sgm_inner(const std::string& kind, const std::vector<std::string>& p, size_t rest) {
  if (kind == "resnets") {
    if (p.size() != rest + 1) return "";
    const auto part = sgm_resnet_part(p[rest]);
    return part.empty() ? "" : "0." + part;
  }
  if (kind == "attentions") return "1." + join(p, rest, '.');
  return "";
}

std::string sgm_name(const std::string& module, const UnetLayout& l) {
  static const std::map<std::string, std::string> top = {
      {"conv_in", "input_blocks.0.0"},
      {"conv_out", "out.2"},
      {"time_embedding.linear_1", "time_embed.0"},
      {"time_embedding.linear_2", "time_embed.2"},
      {"add_embedding.linear_1", "label_emb.0.0"},
      {"add_embedding.linear_2", "label_emb.0.2"}};
  if (const auto it = top.find(module); it != top.end()) return it->second;
  const auto p = split(module, '.');
  if (p.size() < 4) return "";
  if (p[0] == "mid_block") {
    const int j = number(p[2]);
    int index = -1;
    if (p[1] == "resnets" && (j == 0 || j == 1)) index = 2 * j;
    if (p[1] == "attentions" && j == 0) index = 1;
    if (index < 0) return "";
    const auto inner = sgm_inner(p[1], p, 3);
    return inner.empty() ? "" : "middle_block." + std::to_string(index) + inner.substr(1);
  }
  const int i = number(p[1]), j = number(p[3]);
  if (i < 0 || j < 0) return "";
  const auto block = static_cast<size_t>(i);
  if (p[0] == "down_blocks" && block < l.down_resnets.size()) {
    int index = 1;  // input_blocks.0 is conv_in
    for (size_t k = 0; k < block; ++k) index += l.down_resnets[k] + (l.down_sampler[k] ? 1 : 0);
    if (p[2] == "downsamplers")
      return j == 0 && p.size() == 5 && p[4] == "conv"
                 ? "input_blocks." + std::to_string(index + l.down_resnets[block]) + ".0.op"
                 : "";
    const auto inner = sgm_inner(p[2], p, 4);
    return inner.empty() ? "" : "input_blocks." + std::to_string(index + j) + "." + inner;
  }
  if (p[0] == "up_blocks" && block < l.up_resnets.size()) {
    int index = 0;
    for (size_t k = 0; k < block; ++k) index += l.up_resnets[k];
    if (p[2] == "upsamplers")
      return j == 0 && p.size() == 5 && p[4] == "conv"
                 ? "output_blocks." + std::to_string(index + l.up_resnets[block] - 1) +
                       (l.up_attention[block] ? ".2" : ".1") + ".conv"
                 : "";
    const auto inner = sgm_inner(p[2], p, 4);
    return inner.empty() ? "" : "output_blocks." + std::to_string(index + j) + "." + inner;
  }
  return "";
}

// Suffixes of diffusers' LoRA names, longest first where one ends another.
struct Suffix {
  const char* text;
  Part part;
};
constexpr Suffix kDiffusersSuffixes[] = {
    {".lora_A.weight", Part::kDown},
    {".lora_B.weight", Part::kUp},
    {".lora_linear_layer.down.weight", Part::kDown},
    {".lora_linear_layer.up.weight", Part::kUp},
    {".lora.down.weight", Part::kDown},
    {".lora.up.weight", Part::kUp},
    {"_lora.down.weight", Part::kDown},  // attention processors: to_q_lora.down.weight
    {"_lora.up.weight", Part::kUp},
    {".alpha", Part::kAlpha},
};

// What the older attention-processor names (to_q_lora) stand for.
std::string processor_module(const std::string& leaf, Component component) {
  const bool unet = component == Component::kUnet;
  if (leaf == "to_q") return unet ? "to_q" : "q_proj";
  if (leaf == "to_k") return unet ? "to_k" : "k_proj";
  if (leaf == "to_v") return unet ? "to_v" : "v_proj";
  if (leaf == "to_out") return unet ? "to_out.0" : "out_proj";
  return "";
}

std::optional<ParsedKey> parse_kohya(const std::string& key) {
  static const std::pair<const char*, Component> kPrefixes[] = {
      {"lora_unet_", Component::kUnet},
      {"lora_te1_", Component::kTextEncoder},
      {"lora_te2_", Component::kTextEncoder2},
      {"lora_te_", Component::kTextEncoder}};
  for (const auto& [prefix, component] : kPrefixes) {
    if (!starts_with(key, prefix)) continue;
    const std::string rest = key.substr(std::string(prefix).size());
    const size_t dot = rest.find('.');
    if (dot == 0 || dot == std::string::npos) return std::nullopt;
    const std::string suffix = rest.substr(dot);
    ParsedKey k;
    k.kohya = true;
    k.component = component;
    k.module = rest.substr(0, dot);
    if (suffix == ".lora_down.weight") {
      k.part = Part::kDown;
    } else if (suffix == ".lora_up.weight") {
      k.part = Part::kUp;
    } else if (suffix == ".alpha") {
      k.part = Part::kAlpha;
    } else {
      return std::nullopt;
    }
    return k;
  }
  return std::nullopt;
}

std::optional<ParsedKey> parse_diffusers(const std::string& key) {
  ParsedKey k;
  std::string rest;
  if (starts_with(key, "unet.")) {
    rest = key.substr(5);
  } else if (starts_with(key, "text_encoder_2.")) {
    k.component = Component::kTextEncoder2;
    rest = key.substr(15);
  } else if (starts_with(key, "text_encoder.")) {
    k.component = Component::kTextEncoder;
    rest = key.substr(13);
  } else {
    // Older diffusers UNet files (attention processors' weights) carry no prefix.
    for (const char* root : {"down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.",
                             "time_embedding.", "add_embedding."})
      if (starts_with(key, root)) rest = key;
    if (rest.empty()) return std::nullopt;
  }
  for (const auto& s : kDiffusersSuffixes) {
    if (!ends_with(rest, s.text)) continue;
    std::string module = rest.substr(0, rest.size() - std::string(s.text).size());
    if (module.empty()) return std::nullopt;
    // Attention processors: "attn1.processor.to_q_lora" -> "attn1.to_q".
    const std::string processor = ".processor";
    if (const size_t at = module.find(processor + "."); at != std::string::npos)
      module.erase(at, processor.size());
    if (s.text[0] == '_') {  // to_q_lora.down: the processor's leaf names the projection
      const size_t dot = module.rfind('.');
      const std::string leaf = module.substr(dot == std::string::npos ? 0 : dot + 1);
      const auto target = processor_module(leaf, k.component);
      if (target.empty()) return std::nullopt;
      module = (dot == std::string::npos ? "" : module.substr(0, dot + 1)) + target;
    }
    k.peft_module = module;
    if (k.component != Component::kUnet && starts_with(module, "text_model."))
      module = module.substr(11);
    k.module = module;
    k.part = s.part;
    return k;
  }
  return std::nullopt;
}

}  // namespace

const char* component_name(Component component) {
  switch (component) {
    case Component::kTextEncoder:
      return "text_encoder";
    case Component::kTextEncoder2:
      return "text_encoder_2";
    case Component::kUnet:
      break;
  }
  return "unet";
}

std::string unsupported_format(const std::string& key) {
  const auto has = [&key](const char* s) { return key.find(s) != std::string::npos; };
  if (has("hada_w") || has("hada_t")) return "LyCORIS LoHa (hada_w1_a, hada_w1_b, ...)";
  if (has("lokr_w") || has("lokr_t")) return "LyCORIS LoKr (lokr_w1, lokr_w2, ...)";
  if (has("dora_scale") || has("lora_magnitude_vector"))
    return "DoRA (dora_scale / lora_magnitude_vector)";
  if (has("lora_mid")) return "LyCORIS LoCon with a Tucker core (lora_mid)";
  if (ends_with(key, ".on_input")) return "(IA)^3 (on_input)";
  for (const char* glora : {".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"})
    if (ends_with(key, glora)) return "GLoRA (a1, a2, b1, b2)";
  if (ends_with(key, ".diff") || ends_with(key, ".diff_b"))
    return "a full weight difference (.diff)";
  if (ends_with(key, ".w_norm") || ends_with(key, ".b_norm"))
    return "LyCORIS norm adapters (w_norm, b_norm)";
  if (has("lora_embedding_")) return "LoRA on token embeddings (lora_embedding_A/B)";
  if (has("lora_B.bias") || has("lora_up.bias")) return "LoRA with bias terms (lora_B.bias)";
  return "";
}

std::optional<ParsedKey> parse_key(const std::string& key) {
  if (starts_with(key, "lora_")) return parse_kohya(key);
  return parse_diffusers(key);
}

std::string sgm_unet_name(const std::string& module, const std::vector<std::string>& modules) {
  return sgm_name(module, unet_layout(modules));
}

std::map<std::string, std::string> kohya_module_names(Component component,
                                                      const std::vector<std::string>& modules) {
  std::map<std::string, std::string> out;
  std::map<std::string, int> seen;  // a spelling two modules share names neither
  const auto add = [&](const std::string& kohya, const std::string& module) {
    if (++seen[kohya] == 1) {
      out[kohya] = module;
    } else {
      out.erase(kohya);
    }
  };
  if (component == Component::kUnet) {
    const auto layout = unet_layout(modules);
    for (const auto& m : modules) {
      add(underscored(m), m);
      const auto sgm = sgm_name(m, layout);
      if (!sgm.empty()) add(underscored(sgm), m);
    }
    return out;
  }
  for (const auto& m : modules)
    add(starts_with(m, "text_projection") ? underscored(m) : "text_model_" + underscored(m), m);
  return out;
}

}  // namespace sdserve::pipeline::lora_names
