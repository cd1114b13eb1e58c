#include "pipeline/io/checkpoint_convert.h"

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "pipeline/errors.h"
#include "pipeline/io/checkpoint_config.h"

namespace sdserve::pipeline {
namespace {

using nlohmann::json;

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}
bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}
std::string idx(int i) {
  return std::to_string(i);
}

// One tensor: its name in the module (diffusers) and in the checkpoint (LDM, below the
// component's prefix). The VAE's mid-block attention projections are 1x1 convolutions in LDM and
// Linear layers in diffusers: same bytes, the view only drops the trailing 1x1.
struct KeyPair {
  std::string target;
  std::string source;
  bool conv_to_linear = false;
};
using KeyMap = std::vector<KeyPair>;

void add_param(KeyMap& map, const std::string& target, const std::string& source,
               bool conv_to_linear = false) {
  map.push_back({target + ".weight", source + ".weight", conv_to_linear});
  map.push_back({target + ".bias", source + ".bias", conv_to_linear});
}
void add_weight(KeyMap& map, const std::string& target, const std::string& source) {
  map.push_back({target + ".weight", source + ".weight", false});
}

// LDM ResBlock -> diffusers ResnetBlock2D. The shortcut exists where the widths differ.
void add_unet_resnet(KeyMap& map, const std::string& t, const std::string& s, bool shortcut) {
  add_param(map, t + ".norm1", s + ".in_layers.0");
  add_param(map, t + ".conv1", s + ".in_layers.2");
  add_param(map, t + ".time_emb_proj", s + ".emb_layers.1");
  add_param(map, t + ".norm2", s + ".out_layers.0");
  add_param(map, t + ".conv2", s + ".out_layers.3");
  if (shortcut) add_param(map, t + ".conv_shortcut", s + ".skip_connection");
}

// LDM SpatialTransformer -> diffusers Transformer2DModel: only the prefix changes.
void add_unet_transformer(KeyMap& map, const std::string& t, const std::string& s, int depth) {
  for (const char* name : {".norm", ".proj_in", ".proj_out"}) add_param(map, t + name, s + name);
  for (int d = 0; d < depth; ++d) {
    const std::string block = ".transformer_blocks." + idx(d);
    for (const char* attn : {".attn1", ".attn2"}) {
      for (const char* proj : {".to_q", ".to_k", ".to_v"})
        add_weight(map, t + block + attn + proj, s + block + attn + proj);
      add_param(map, t + block + attn + ".to_out.0", s + block + attn + ".to_out.0");
    }
    for (const char* name : {".ff.net.0.proj", ".ff.net.2", ".norm1", ".norm2", ".norm3"})
      add_param(map, t + block + name, s + block + name);
  }
}

std::vector<int64_t> int_list(const json& j) {
  return j.get<std::vector<int64_t>>();
}

// The LDM UNet numbers its blocks as flat lists: input_blocks (conv_in, then per down block
// `layers` resnet[+attention] entries and a downsampler), middle_block, output_blocks (per up
// block `layers + 1` entries, the last also holding the upsampler).
KeyMap unet_key_map(const json& cfg) {
  const auto ch = int_list(cfg.at("block_out_channels"));
  const int blocks = static_cast<int>(ch.size());
  const int layers = cfg.at("layers_per_block").get<int>();
  const int depth = cfg.at("transformer_layers_per_block").get<int>();
  const auto& down_types = cfg.at("down_block_types");
  const auto& up_types = cfg.at("up_block_types");
  KeyMap map;
  add_param(map, "conv_in", "input_blocks.0.0");
  add_param(map, "time_embedding.linear_1", "time_embed.0");
  add_param(map, "time_embedding.linear_2", "time_embed.2");

  int ldm = 1;
  for (int b = 0; b < blocks; ++b) {
    const bool attention = down_types.at(b) == "CrossAttnDownBlock2D";
    const std::string t = "down_blocks." + idx(b);
    for (int l = 0; l < layers; ++l, ++ldm) {
      const int64_t in = l > 0 ? ch[b] : ch[std::max(b - 1, 0)];
      const std::string s = "input_blocks." + idx(ldm);
      add_unet_resnet(map, t + ".resnets." + idx(l), s + ".0", in != ch[b]);
      if (attention) add_unet_transformer(map, t + ".attentions." + idx(l), s + ".1", depth);
    }
    if (b + 1 < blocks) {
      add_param(map, t + ".downsamplers.0.conv", "input_blocks." + idx(ldm) + ".0.op");
      ++ldm;
    }
  }

  add_unet_resnet(map, "mid_block.resnets.0", "middle_block.0", false);
  add_unet_transformer(map, "mid_block.attentions.0", "middle_block.1", depth);
  add_unet_resnet(map, "mid_block.resnets.1", "middle_block.2", false);

  // Up blocks run over the widths in reverse; each resnet also takes a skip connection from the
  // matching down-path output (diffusers' UNet2DConditionModel channel bookkeeping).
  const std::vector<int64_t> rev(ch.rbegin(), ch.rend());
  ldm = 0;
  for (int b = 0; b < blocks; ++b) {
    const bool attention = up_types.at(b) == "CrossAttnUpBlock2D";
    const std::string t = "up_blocks." + idx(b);
    const int64_t out = rev[b], prev = rev[std::max(b - 1, 0)];
    const int64_t skip_in = rev[std::min(b + 1, blocks - 1)];
    for (int l = 0; l <= layers; ++l, ++ldm) {
      const int64_t in = (l == 0 ? prev : out) + (l == layers ? skip_in : out);
      const std::string s = "output_blocks." + idx(ldm);
      add_unet_resnet(map, t + ".resnets." + idx(l), s + ".0", in != out);
      if (attention) add_unet_transformer(map, t + ".attentions." + idx(l), s + ".1", depth);
      if (l == layers && b + 1 < blocks)
        add_param(map, t + ".upsamplers.0.conv", s + (attention ? ".2" : ".1") + ".conv");
    }
  }
  add_param(map, "conv_norm_out", "out.0");
  add_param(map, "conv_out", "out.2");
  return map;
}

void add_vae_resnet(KeyMap& map, const std::string& t, const std::string& s, bool shortcut) {
  for (const char* name : {".norm1", ".conv1", ".norm2", ".conv2"})
    add_param(map, t + name, s + name);
  if (shortcut) add_param(map, t + ".conv_shortcut", s + ".nin_shortcut");
}

void add_vae_mid(KeyMap& map, const std::string& t, const std::string& s, bool attention) {
  add_vae_resnet(map, t + ".resnets.0", s + ".block_1", false);
  if (attention) {
    const std::string ta = t + ".attentions.0", sa = s + ".attn_1";
    add_param(map, ta + ".group_norm", sa + ".norm");
    add_param(map, ta + ".to_q", sa + ".q", true);
    add_param(map, ta + ".to_k", sa + ".k", true);
    add_param(map, ta + ".to_v", sa + ".v", true);
    add_param(map, ta + ".to_out.0", sa + ".proj_out", true);
  }
  add_vae_resnet(map, t + ".resnets.1", s + ".block_2", false);
}

// LDM's decoder numbers its up blocks from the narrowest (up.0) to the widest; diffusers'
// up_blocks.0 is the widest, so the index flips.
KeyMap vae_key_map(const json& cfg) {
  const auto ch = int_list(cfg.at("block_out_channels"));
  const int blocks = static_cast<int>(ch.size());
  const int layers = cfg.at("layers_per_block").get<int>();
  const bool attention = cfg.at("mid_block_add_attention").get<bool>();
  KeyMap map;
  add_param(map, "encoder.conv_in", "encoder.conv_in");
  for (int b = 0; b < blocks; ++b) {
    const std::string t = "encoder.down_blocks." + idx(b), s = "encoder.down." + idx(b);
    for (int l = 0; l < layers; ++l) {
      const int64_t in = l > 0 ? ch[b] : ch[std::max(b - 1, 0)];
      add_vae_resnet(map, t + ".resnets." + idx(l), s + ".block." + idx(l), in != ch[b]);
    }
    if (b + 1 < blocks) add_param(map, t + ".downsamplers.0.conv", s + ".downsample.conv");
  }
  add_vae_mid(map, "encoder.mid_block", "encoder.mid", attention);
  add_param(map, "encoder.conv_norm_out", "encoder.norm_out");
  add_param(map, "encoder.conv_out", "encoder.conv_out");
  if (cfg.at("use_quant_conv").get<bool>()) add_param(map, "quant_conv", "quant_conv");
  if (cfg.at("use_post_quant_conv").get<bool>())
    add_param(map, "post_quant_conv", "post_quant_conv");

  add_param(map, "decoder.conv_in", "decoder.conv_in");
  add_vae_mid(map, "decoder.mid_block", "decoder.mid", attention);
  const std::vector<int64_t> rev(ch.rbegin(), ch.rend());
  for (int b = 0; b < blocks; ++b) {
    const int64_t out = rev[b], prev = rev[std::max(b - 1, 0)];
    const std::string t = "decoder.up_blocks." + idx(b), s = "decoder.up." + idx(blocks - 1 - b);
    for (int l = 0; l <= layers; ++l)
      add_vae_resnet(map, t + ".resnets." + idx(l), s + ".block." + idx(l),
                     (l == 0 ? prev : out) != out);
    if (b + 1 < blocks) add_param(map, t + ".upsamplers.0.conv", s + ".upsample.conv");
  }
  add_param(map, "decoder.conv_norm_out", "decoder.norm_out");
  add_param(map, "decoder.conv_out", "decoder.conv_out");
  return map;
}

// The checkpoint already uses transformers' names; the map lists them to check completeness.
KeyMap text_encoder_key_map(const json& cfg) {
  KeyMap map;
  add_weight(map, "embeddings.token_embedding", "embeddings.token_embedding");
  add_weight(map, "embeddings.position_embedding", "embeddings.position_embedding");
  const int layers = cfg.at("num_hidden_layers").get<int>();
  for (int i = 0; i < layers; ++i) {
    const std::string l = "encoder.layers." + idx(i);
    for (const char* name :
         {".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj",
          ".layer_norm1", ".mlp.fc1", ".layer_norm2", ".mlp.fc2"})
      add_param(map, l + name, l + name);
  }
  add_param(map, "final_layer_norm", "final_layer_norm");
  return map;
}

WeightSource make_source(const std::shared_ptr<SafetensorsFile>& file, const std::string& prefix,
                         const KeyMap& map, const std::string& component,
                         const std::string& display) {
  WeightSource source;
  source.component = component;
  source.origin = file->path();
  source.files = {file};
  for (const auto& pair : map) {
    TensorView view = require_tensor(*file, prefix + pair.source, display);
    if (pair.conv_to_linear && view.shape.size() == 4 && view.shape[2] == 1 && view.shape[3] == 1)
      view.shape.resize(2);
    source.tensors.emplace(pair.target, std::move(view));
  }
  return source;
}

// Every UNet tensor must be one the SD 1.x UNet uses: an extra one means a variant (class
// conditioning, adapters merged in...) whose images would silently come out wrong.
void check_no_extra_unet_tensors(const SafetensorsFile& file, const KeyMap& map) {
  std::set<std::string> used;
  for (const auto& pair : map) used.insert(kLdmUnetPrefix + pair.source);
  const std::string prefix = kLdmUnetPrefix;
  for (auto it = file.tensors().lower_bound(prefix);
       it != file.tensors().end() && starts_with(it->first, prefix); ++it)
    if (used.count(it->first) == 0)
      refuse_unrecognised(file.path(),
                          "its UNet has tensor '" + it->first + "', which the SD 1.x UNet lacks");
}

// Families recognisable from tensor names alone, before any shape is read.
void detect_family_by_names(const SafetensorsFile& file) {
  const std::string& path = file.path();
  if (file.tensors().empty()) refuse_unrecognised(path, "it holds no tensors");
  for (const auto& [name, view] : file.tensors()) {
    if (starts_with(name, "conditioner.embedders."))
      refuse_family(path, kFamilySdxl, "it has conditioner.embedders.* text encoders");
    if (contains(name, "joint_blocks."))
      refuse_family(path, kFamilySd3, "it has an MMDiT with joint_blocks.*");
    if (contains(name, "double_blocks."))
      refuse_family(path, kFamilyFlux, "it has a transformer with double_blocks.*");
    if (starts_with(name, "lora_") || contains(name, ".lora_down.") || contains(name, ".lora_A."))
      refuse_unrecognised(path, "it is a LoRA (tensor '" + name +
                                    "'), not a full checkpoint; a LoRA is applied on top of "
                                    "a base model");
    if (starts_with(name, "cond_stage_model.model."))
      refuse_family(path, kFamilySd2, "it has an OpenCLIP text encoder, cond_stage_model.model.*");
  }
  if (!file.contains(std::string(kLdmUnetPrefix) + "input_blocks.0.0.weight")) {
    const std::string first = file.tensors().begin()->first;
    refuse_unrecognised(path, "it has no SD UNet (no tensor '" + std::string(kLdmUnetPrefix) +
                                  "input_blocks.0.0.weight'; its first tensor is '" + first + "')");
  }
}

}  // namespace

void check_sd1_unet(const std::string& source, int64_t in_channels, int64_t cross_attention_dim) {
  const std::string cross = std::to_string(cross_attention_dim);
  if (cross_attention_dim == 1024)
    refuse_family(source, kFamilySd2, "its UNet cross-attends to 1024-wide text embeddings");
  if (cross_attention_dim == 2048 || cross_attention_dim == 1280)
    refuse_family(source, kFamilySdxl,
                  "its UNet cross-attends to " + cross + "-wide text embeddings");
  if (in_channels == 9)
    refuse_family(source, kFamilySd1Inpaint,
                  "its UNet takes 9 input channels: latents, mask and masked image");
  if (in_channels != 4)
    refuse_unrecognised(source, "its UNet takes " + std::to_string(in_channels) +
                                    " input channels where SD 1.x takes 4 latent channels");
}

ConvertedCheckpoint convert_single_file(const std::shared_ptr<SafetensorsFile>& file) {
  const std::string& path = file->path();
  detect_family_by_names(*file);
  ConvertedCheckpoint out;
  out.family = "sd1";
  out.unet_config = infer_unet_config(*file);
  const auto in_channels = out.unet_config.at("in_channels").get<int64_t>();
  const auto cross_dim = out.unet_config.at("cross_attention_dim").get<int64_t>();
  check_sd1_unet(path, in_channels, cross_dim);
  if (out.unet_config.at("use_linear_projection").get<bool>())
    refuse_family(path, kFamilySd2, "its UNet's transformers project with Linear layers");

  out.text_encoder_config = infer_text_encoder_config(*file);
  const auto width = out.text_encoder_config.at("hidden_size").get<int64_t>();
  if (width != cross_dim)
    refuse_unrecognised(path, "its text encoder is " + std::to_string(width) +
                                  " wide but its UNet cross-attends to width " +
                                  std::to_string(cross_dim));
  out.vae_config = infer_vae_config(*file);
  const auto latent = out.vae_config.at("latent_channels").get<int64_t>();
  if (latent != in_channels)
    refuse_unrecognised(path, "its VAE has " + std::to_string(latent) +
                                  " latent channels but its UNet takes " +
                                  std::to_string(in_channels));

  const KeyMap unet_map = unet_key_map(out.unet_config);
  out.unet = make_source(file, kLdmUnetPrefix, unet_map, "unet", "UNet");
  check_no_extra_unet_tensors(*file, unet_map);
  out.vae = make_source(file, kLdmVaePrefix, vae_key_map(out.vae_config), "vae", "VAE");
  out.text_encoder =
      make_source(file, text_encoder_prefix(*file), text_encoder_key_map(out.text_encoder_config),
                  "text_encoder", "text encoder");
  return out;
}

}  // namespace sdserve::pipeline
