#include "pipeline/io/checkpoint_convert.h"

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "pipeline/errors.h"
#include "pipeline/io/checkpoint_config.h"
#include "pipeline/io/names.h"
#include "pipeline/io/openclip_convert.h"

namespace sdserve::pipeline {
namespace {

using nlohmann::json;

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
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
  // layers_per_block: one number, or one per level (unequal, pruned UNets).
  const json& layers_cfg = cfg.at("layers_per_block");
  const auto layers_of = [&](int b) {
    return layers_cfg.is_array() ? layers_cfg.at(static_cast<size_t>(b)).get<int>()
                                 : layers_cfg.get<int>();
  };
  const json& depth_cfg = cfg.at("transformer_layers_per_block");
  std::vector<int64_t> depths(static_cast<size_t>(blocks));
  for (int b = 0; b < blocks; ++b)
    depths[static_cast<size_t>(b)] = depth_cfg.is_array()
                                         ? depth_cfg.at(static_cast<size_t>(b)).get<int64_t>()
                                         : depth_cfg.get<int64_t>();
  const auto& down_types = cfg.at("down_block_types");
  const auto& up_types = cfg.at("up_block_types");
  KeyMap map;
  add_param(map, "conv_in", "input_blocks.0.0");
  add_param(map, "time_embedding.linear_1", "time_embed.0");
  add_param(map, "time_embedding.linear_2", "time_embed.2");
  if (cfg.value("addition_embed_type", json()) == "text_time") {  // SDXL's label_emb
    add_param(map, "add_embedding.linear_1", "label_emb.0.0");
    add_param(map, "add_embedding.linear_2", "label_emb.0.2");
  }

  int ldm = 1;
  for (int b = 0; b < blocks; ++b) {
    const bool attention = down_types.at(b) == "CrossAttnDownBlock2D";
    const std::string t = "down_blocks." + idx(b);
    for (int l = 0; l < layers_of(b); ++l, ++ldm) {
      const int64_t in = l > 0 ? ch[b] : ch[std::max(b - 1, 0)];
      const std::string s = "input_blocks." + idx(ldm);
      add_unet_resnet(map, t + ".resnets." + idx(l), s + ".0", in != ch[b]);
      if (attention) add_unet_transformer(map, t + ".attentions." + idx(l), s + ".1", depths[b]);
    }
    if (b + 1 < blocks) {
      add_param(map, t + ".downsamplers.0.conv", "input_blocks." + idx(ldm) + ".0.op");
      ++ldm;
    }
  }

  if (!cfg.at("mid_block_type").is_null()) {
    add_unet_resnet(map, "mid_block.resnets.0", "middle_block.0", false);
    add_unet_transformer(map, "mid_block.attentions.0", "middle_block.1",
                         static_cast<int>(depths.back()));
    add_unet_resnet(map, "mid_block.resnets.1", "middle_block.2", false);
  }

  // Up blocks run over the widths in reverse; each resnet also takes a skip connection from the
  // matching down-path output (diffusers' UNet2DConditionModel channel bookkeeping).
  const std::vector<int64_t> rev(ch.rbegin(), ch.rend());
  ldm = 0;
  for (int b = 0; b < blocks; ++b) {
    const bool attention = up_types.at(b) == "CrossAttnUpBlock2D";
    const std::string t = "up_blocks." + idx(b);
    const int64_t out = rev[b], prev = rev[std::max(b - 1, 0)];
    const int64_t skip_in = rev[std::min(b + 1, blocks - 1)];
    const int layers = layers_of(blocks - 1 - b);
    for (int l = 0; l <= layers; ++l, ++ldm) {
      const int64_t in = (l == 0 ? prev : out) + (l == layers ? skip_in : out);
      const std::string s = "output_blocks." + idx(ldm);
      add_unet_resnet(map, t + ".resnets." + idx(l), s + ".0", in != out);
      if (attention)
        add_unet_transformer(map, t + ".attentions." + idx(l), s + ".1",
                             static_cast<int>(depths[blocks - 1 - b]));
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
                          "its UNet has tensor '" + it->first + "', which the inferred UNet lacks");
}

// Families recognisable from tensor names alone, before any shape is read.
std::string detect_family_by_names(const SafetensorsFile& file) {
  const std::string& path = file.path();
  if (file.tensors().empty()) refuse_unrecognised(path, "it holds no tensors");
  bool openclip = false, embedders = false;
  for (const auto& [name, view] : file.tensors()) {
    if (contains(name, "joint_blocks."))
      refuse_family(path, kFamilySd3, "it has an MMDiT with joint_blocks.*");
    if (contains(name, "double_blocks."))
      refuse_family(path, kFamilyFlux, "it has a transformer with double_blocks.*");
    if (starts_with(name, "lora_") || contains(name, ".lora_down.") || contains(name, ".lora_A."))
      refuse_unrecognised(path, "it is a LoRA (tensor '" + name +
                                    "'), not a full checkpoint; a LoRA is applied on top of "
                                    "a base model");
    openclip |= starts_with(name, "cond_stage_model.model.");
    embedders |= starts_with(name, "conditioner.embedders.");
  }
  if (!file.contains(std::string(kLdmUnetPrefix) + "input_blocks.0.0.weight")) {
    const std::string first = file.tensors().begin()->first;
    refuse_unrecognised(path, "it has no SD UNet (no tensor '" + std::string(kLdmUnetPrefix) +
                                  "input_blocks.0.0.weight'; its first tensor is '" + first + "')");
  }
  if (embedders) {
    const bool clip_l =
        file.contains(std::string(kSdxlClipPrefix) + "embeddings.token_embedding.weight");
    const bool bigg = file.contains(std::string(kSdxlOpenClipPrefix) + "token_embedding.weight");
    if (bigg && !clip_l)
      refuse_family(path, kFamilySdxlRefiner,
                    "its only text encoder is conditioner.embedders.0.model.* (OpenCLIP-G); the "
                    "refiner is an image-to-image model, and sdserve generates from text");
    if (!clip_l || !bigg)
      refuse_unrecognised(path,
                          "it has conditioner.embedders.* but not SDXL's two text "
                          "encoders (" +
                              std::string(kSdxlClipPrefix) + "*, " + kSdxlOpenClipPrefix + "*)");
    return "sdxl";
  }
  return openclip ? "sd2" : "sd1";
}

// SDXL base's scheduler: Euler with leading spacing (its scheduler_config.json).
json sdxl_scheduler_config() {
  json c = sd1_scheduler_config();
  c["_class_name"] = "EulerDiscreteScheduler";
  c["timestep_spacing"] = "leading";
  c["skip_prk_steps"] = nullptr;
  return c;
}

}  // namespace

namespace {
std::vector<std::pair<std::string, std::string>> pairs_of(const KeyMap& map) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& pair : map) out.emplace_back(pair.target, pair.source);
  return out;
}
}  // namespace

std::vector<std::pair<std::string, std::string>> ldm_unet_names(const json& config) {
  return pairs_of(unet_key_map(config));
}

std::vector<std::pair<std::string, std::string>> ldm_vae_names(const json& config) {
  return pairs_of(vae_key_map(config));
}

void check_unet_inputs(const std::string& source, int64_t in_channels) {
  // 4: latents; 9: an inpainting model's latents, mask and masked-picture latents.
  if (in_channels == 8)
    refuse_family(source, kFamilyPix2Pix,
                  "its UNet takes 8 input channels: latents and the picture's latents");
  if (in_channels != 4 && in_channels != 9)
    refuse_unrecognised(source, "its UNet takes " + std::to_string(in_channels) +
                                    " input channels where SD takes 4 (latents) or 9 "
                                    "(inpainting: latents, mask, masked picture)");
}

ConvertedCheckpoint convert_single_file(const std::shared_ptr<SafetensorsFile>& file,
                                        bool configs_given) {
  const std::string& path = file->path();
  ConvertedCheckpoint out;
  out.family = detect_family_by_names(*file);
  const bool sd1 = out.family == "sd1", sdxl = out.family == "sdxl";
  out.unet_config = infer_unet_config(*file, sd1, !configs_given);
  const auto in_channels = out.unet_config.at("in_channels").get<int64_t>();
  const auto cross_dim = out.unet_config.at("cross_attention_dim").get<int64_t>();
  check_unet_inputs(path, in_channels);

  int64_t width = 0;
  if (sdxl) {
    out.text_encoder_config = infer_text_encoder_config(*file, kSdxlClipPrefix);
    const OpenClipLayout bigg{kSdxlOpenClipPrefix, false, true, !configs_given};
    out.text_encoder_2_config = infer_openclip_config(*file, bigg);
    out.text_encoder =
        make_source(file, kSdxlClipPrefix, text_encoder_key_map(out.text_encoder_config),
                    "text_encoder", "text encoder");
    out.text_encoder_2 = openclip_weights(file, bigg, out.text_encoder_2_config, "text_encoder_2");
    width = out.text_encoder_config.at("hidden_size").get<int64_t>() +
            out.text_encoder_2_config.at("hidden_size").get<int64_t>();
    // text_time: the pooled embedding plus six numbers, each through the same-width sinusoid.
    const auto& label =
        require_tensor(*file, std::string(kLdmUnetPrefix) + "label_emb.0.0.weight", "UNet").shape;
    const int64_t pooled = out.text_encoder_2_config.at("projection_dim").get<int64_t>();
    if (label.size() != 2 || label[1] <= pooled || (label[1] - pooled) % 6 != 0)
      refuse_unrecognised(path,
                          "its UNet's label_emb does not take the pooled text embedding "
                          "and six size numbers");
    out.unet_config["addition_embed_type"] = "text_time";
    out.unet_config["addition_time_embed_dim"] = (label[1] - pooled) / 6;
    out.unet_config["projection_class_embeddings_input_dim"] = label[1];
    out.unet_config["sample_size"] = 128;  // SDXL: 1024x1024 images
    out.scheduler_config = sdxl_scheduler_config();
  } else if (!sd1) {
    // SD 2.x: OpenCLIP-H without its last layer, v-prediction at 768x768 (SD 2.0-v / 2.1, the
    // ones people run; a 512-base epsilon model needs single_file_config), except the SD 2
    // inpainting model (a 9-channel UNet): epsilon at 512x512.
    const OpenClipLayout h{"cond_stage_model.model.", true, false, !configs_given};
    out.text_encoder_config = infer_openclip_config(*file, h);
    out.text_encoder = openclip_weights(file, h, out.text_encoder_config, "text_encoder");
    width = out.text_encoder_config.at("hidden_size").get<int64_t>();
    out.unet_config["upcast_attention"] = true;
    const bool inpainting = in_channels == 9;
    out.unet_config["sample_size"] = inpainting ? 64 : 96;
    out.scheduler_config = sd1_scheduler_config();
    out.scheduler_config["_class_name"] = "DDIMScheduler";
    out.scheduler_config["prediction_type"] = inpainting ? "epsilon" : "v_prediction";
    out.scheduler_config["skip_prk_steps"] = nullptr;
  } else {
    out.text_encoder_config = infer_text_encoder_config(*file, text_encoder_prefix(*file));
    out.text_encoder =
        make_source(file, text_encoder_prefix(*file), text_encoder_key_map(out.text_encoder_config),
                    "text_encoder", "text encoder");
    width = out.text_encoder_config.at("hidden_size").get<int64_t>();
    out.scheduler_config = sd1_scheduler_config();
  }
  if (width != cross_dim)
    refuse_unrecognised(path, "its text encoder(s) give width " + std::to_string(width) +
                                  " but its UNet cross-attends to width " +
                                  std::to_string(cross_dim));
  out.vae_config = infer_vae_config(*file);
  if (sdxl) out.vae_config["scaling_factor"] = 0.13025;
  const auto latent = out.vae_config.at("latent_channels").get<int64_t>();
  if (latent != in_channels && 2 * latent + 1 != in_channels)
    refuse_unrecognised(path, "its VAE has " + std::to_string(latent) +
                                  " latent channels but its UNet takes " +
                                  std::to_string(in_channels));

  const KeyMap unet_map = unet_key_map(out.unet_config);
  out.unet = make_source(file, kLdmUnetPrefix, unet_map, "unet", "UNet");
  check_no_extra_unet_tensors(*file, unet_map);
  out.vae = make_source(file, kLdmVaePrefix, vae_key_map(out.vae_config), "vae", "VAE");
  return out;
}

}  // namespace sdserve::pipeline
