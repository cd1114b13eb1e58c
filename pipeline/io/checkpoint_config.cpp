#include "pipeline/io/checkpoint_config.h"

#include <algorithm>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "pipeline/errors.h"
#include "pipeline/io/names.h"

namespace sdserve::pipeline {
namespace {

using nlohmann::json;

// The integer indices directly below `prefix` ("input_blocks." -> {0, 1, ...}).
std::set<int> child_indices(const SafetensorsFile& file, const std::string& prefix) {
  std::set<int> out;
  // Names are sorted, so the ones below `prefix` are contiguous from lower_bound.
  for (auto it = file.tensors().lower_bound(prefix);
       it != file.tensors().end() && starts_with(it->first, prefix); ++it) {
    const std::string rest = it->first.substr(prefix.size());
    const auto dot = rest.find('.');
    const std::string digits = rest.substr(0, dot);
    if (digits.empty() || digits.size() > 6 ||
        digits.find_first_not_of("0123456789") != std::string::npos)
      continue;
    out.insert(std::stoi(digits));
  }
  return out;
}

// Indices 0..n-1 with none missing.
bool contiguous(const std::set<int>& indices) {
  return indices.empty() ||
         (*indices.begin() == 0 && *indices.rbegin() + 1 == static_cast<int>(indices.size()));
}

// One number when every level has the same (as diffusers writes SD 1.x's configs), else a list.
json uniform(const json& per_level) {
  const bool equal = std::all_of(per_level.begin(), per_level.end(),
                                 [&](const json& v) { return v == per_level[0]; });
  return equal ? per_level[0] : per_level;
}

}  // namespace

void refuse_family(const std::string& path, const std::string& family,
                   const std::string& evidence) {
  throw ModelError("'" + path + "': detected " + family + " (" + evidence + "); " +
                   kSupportedFamilies);
}

void refuse_unrecognised(const std::string& path, const std::string& why) {
  throw ModelError("'" + path + "' is not a model sdserve recognises: " + why + "; " +
                   kSupportedFamilies);
}

const TensorView& require_tensor(const SafetensorsFile& file, const std::string& name,
                                 const std::string& component) {
  auto it = file.tensors().find(name);
  if (it == file.tensors().end())
    throw ModelError("'" + file.path() + "' lacks tensor '" + name + "' of the " + component +
                     ", which its " + component +
                     " needs; the file is incomplete (a pruned or partial checkpoint?): use a "
                     "complete checkpoint");
  return it->second;
}

std::string text_encoder_prefix(const SafetensorsFile& file) {
  const std::string probe = "embeddings.token_embedding.weight";
  if (!file.contains(std::string(kLdmClipPrefix) + probe) &&
      file.contains(std::string(kLdmClipOldPrefix) + probe))
    return kLdmClipOldPrefix;
  return kLdmClipPrefix;
}

json infer_unet_config(const SafetensorsFile& file, bool sd1_heads, bool infer_heads) {
  const std::string p = kLdmUnetPrefix;
  const std::string& path = file.path();
  auto shape = [&](const std::string& name) -> const std::vector<int64_t>& {
    return require_tensor(file, p + name, "UNet").shape;
  };

  const auto& conv_in = shape("input_blocks.0.0.weight");
  const auto& conv_out = shape("out.2.weight");
  if (conv_in.size() != 4 || conv_out.size() != 4)
    refuse_unrecognised(path, "its UNet's first and last layers are not 2-D convolutions");

  // input_blocks: conv_in, then per level its resnet(+attention) entries, a downsampler (".0.op")
  // after every level but the last. Levels and their resnet counts come from where the
  // downsamplers are, so unequal counts (pruned or distilled UNets) are read as they are.
  const std::set<int> inputs = child_indices(file, p + "input_blocks.");
  if (!contiguous(inputs) || inputs.size() < 2)
    refuse_unrecognised(path, "its UNet's input_blocks are not numbered 0, 1, 2... without gaps");
  std::vector<std::vector<int>> down(1);  // input_blocks indices of each level's resnets
  for (int i = 1; i < static_cast<int>(inputs.size()); ++i) {
    const bool downsampler = file.contains(p + "input_blocks." + idx(i) + ".0.op.weight");
    if (downsampler && down.back().empty())
      refuse_unrecognised(
          path, "its UNet's input_blocks." + idx(i) + " downsamples a level that has no resnets");
    if (downsampler)
      down.emplace_back();
    else
      down.back().push_back(i);
  }
  if (down.back().empty())
    refuse_unrecognised(path, "its UNet's input_blocks end with a downsampler");
  const int blocks = static_cast<int>(down.size());
  // output_blocks: per level from the deepest, one resnet more than the mirrored down level
  // (diffusers' UNet2DConditionModel), an upsampler (".1.conv" or, after attention, ".2.conv")
  // closing every level but the last.
  const std::set<int> outputs = child_indices(file, p + "output_blocks.");
  if (!contiguous(outputs))
    refuse_unrecognised(path, "its UNet's output_blocks are not numbered 0, 1, 2... without gaps");
  std::vector<std::vector<int>> up(1);
  for (int i : outputs) {
    up.back().push_back(i);
    const std::string o = "output_blocks." + idx(i);
    if (file.contains(p + o + ".1.conv.weight") || file.contains(p + o + ".2.conv.weight"))
      up.emplace_back();
  }
  if (static_cast<int>(up.size()) != blocks)
    refuse_unrecognised(path, "its UNet has " + std::to_string(blocks) + " down levels but " +
                                  std::to_string(up.size()) + " up levels");
  json layers = json::array();
  for (int b = 0; b < blocks; ++b) {
    const auto want = down[static_cast<size_t>(blocks - 1 - b)].size() + 1;
    if (up[static_cast<size_t>(b)].size() != want)
      refuse_unrecognised(path, "its UNet's up level " + idx(b) + " has " +
                                    std::to_string(up[static_cast<size_t>(b)].size()) +
                                    " resnets where the down level it mirrors (" +
                                    idx(blocks - 1 - b) + ", " + std::to_string(want - 1) +
                                    " resnets) needs " + std::to_string(want));
    layers.push_back(down[static_cast<size_t>(b)].size());
  }
  // Attention in every entry of a level or in none (diffusers' blocks are one or the other).
  auto level_attention = [&](const std::string& list, const std::vector<int>& entries,
                             const std::string& what) {
    const auto has = [&](int i) { return file.contains(p + list + idx(i) + ".1.proj_in.weight"); };
    for (int i : entries)
      if (has(i) != has(entries.front()))
        refuse_unrecognised(path, "its UNet's " + what +
                                      " mixes resnets with and without "
                                      "attention (" +
                                      list + idx(i) + ")");
    return has(entries.front());
  };

  json channels = json::array(), down_types = json::array(), up_types = json::array();
  json depths = json::array(), heads = json::array();
  std::string first_attention;  // LDM prefix of one attention block, for its widths
  for (int b = 0; b < blocks; ++b) {
    const auto& entries = down[static_cast<size_t>(b)];
    const std::string block = "input_blocks." + idx(entries.front());
    const int64_t width = shape(block + ".0.out_layers.3.weight").at(0);
    channels.push_back(width);
    const bool attention = level_attention("input_blocks.", entries, "down level " + idx(b));
    down_types.push_back(attention ? "CrossAttnDownBlock2D" : "DownBlock2D");
    if (attention && first_attention.empty()) first_attention = block + ".1.";
    // Transformer layers per level (SDXL: 1, 2, 10), counted from the level's first transformer.
    const auto depth = child_indices(file, p + block + ".1.transformer_blocks.").size();
    depths.push_back(attention ? static_cast<int64_t>(depth) : 1);
    // SD 1.x has 8 heads everywhere; SD 2.x and SDXL heads of 64 dims (shapes cannot tell).
    if (!sd1_heads && infer_heads && attention && width % 64 != 0)
      refuse_unrecognised(path, "its UNet level " + idx(b) + " is " + std::to_string(width) +
                                    " wide, not a multiple of 64-wide attention heads (pass a "
                                    "diffusers folder with its config to load it)");
    heads.push_back(sd1_heads ? 8 : std::max<int64_t>(1, width / 64));
  }
  for (int b = 0; b < blocks; ++b) {
    const bool attention =
        level_attention("output_blocks.", up[static_cast<size_t>(b)], "up level " + idx(b));
    up_types.push_back(attention ? "CrossAttnUpBlock2D" : "UpBlock2D");
  }
  // The mid block: cross-attention between two resnets, or none at all (BK-SDM's small UNets).
  const bool mid = !child_indices(file, p + "middle_block.").empty();
  if (mid) shape("middle_block.1.proj_in.weight");  // a mid block without attention: refused
  if (first_attention.empty() && mid) first_attention = "middle_block.1.";
  if (first_attention.empty()) refuse_unrecognised(path, "its UNet has no cross-attention at all");

  const int64_t cross_dim = shape(first_attention + "transformer_blocks.0.attn2.to_k.weight").at(1);
  // The mid block's transformers have the deepest level's depth (diffusers' convention).
  if (mid) {
    const int64_t mid_depth =
        static_cast<int64_t>(child_indices(file, p + "middle_block.1.transformer_blocks.").size());
    if (down_types.back() == "CrossAttnDownBlock2D" && depths.back() != mid_depth)
      refuse_unrecognised(path, "its UNet's mid block has " + std::to_string(mid_depth) +
                                    " transformer layers and its deepest level " +
                                    depths.back().dump() + "; diffusers gives both one number");
    depths.back() = mid_depth;
  }
  // SD 1.x projects in and out of the transformer with 1x1 convolutions; SD 2.x with Linear.
  const bool linear_projection = shape(first_attention + "proj_in.weight").size() == 2;

  return json{
      {"_class_name", "UNet2DConditionModel"},
      {"act_fn", "silu"},
      {"addition_embed_type", nullptr},
      {"addition_embed_type_num_heads", 64},
      {"addition_time_embed_dim", nullptr},
      {"attention_head_dim", sd1_heads ? json(8) : heads},
      {"attention_type", "default"},
      {"block_out_channels", channels},
      {"center_input_sample", false},
      {"class_embed_type", nullptr},
      {"class_embeddings_concat", false},
      {"conv_in_kernel", conv_in[2]},
      {"conv_out_kernel", conv_out[2]},
      {"cross_attention_dim", cross_dim},
      {"cross_attention_norm", nullptr},
      {"down_block_types", down_types},
      {"downsample_padding", 1},
      {"dropout", 0.0},
      {"dual_cross_attention", false},
      {"encoder_hid_dim", nullptr},
      {"encoder_hid_dim_type", nullptr},
      {"flip_sin_to_cos", true},
      {"freq_shift", 0},
      {"in_channels", conv_in[1]},
      {"layers_per_block", uniform(layers)},
      {"mid_block_only_cross_attention", nullptr},
      {"mid_block_scale_factor", 1},
      {"mid_block_type", mid ? json("UNetMidBlock2DCrossAttn") : json()},
      {"norm_eps", 1e-05},
      {"norm_num_groups", 32},
      {"num_attention_heads", nullptr},
      {"num_class_embeds", nullptr},
      {"only_cross_attention", false},
      {"out_channels", conv_out[0]},
      {"projection_class_embeddings_input_dim", nullptr},
      {"resnet_out_scale_factor", 1.0},
      {"resnet_skip_time_act", false},
      {"resnet_time_scale_shift", "default"},
      {"reverse_transformer_layers_per_block", nullptr},
      {"sample_size", 64},  // SD 1.x: 64x64 latents, 512x512 images
      {"time_cond_proj_dim", nullptr},
      {"time_embedding_act_fn", nullptr},
      {"time_embedding_dim", nullptr},
      {"time_embedding_type", "positional"},
      {"timestep_post_act", nullptr},
      {"transformer_layers_per_block", uniform(depths)},
      {"up_block_types", up_types},
      {"upcast_attention", false},
      {"use_linear_projection", linear_projection},
  };
}

json infer_vae_config(const SafetensorsFile& file) {
  const std::string p = kLdmVaePrefix;
  auto shape = [&](const std::string& name) -> const std::vector<int64_t>& {
    return require_tensor(file, p + name, "VAE").shape;
  };
  const auto& conv_in = shape("encoder.conv_in.weight");
  const auto& latent_in = shape("decoder.conv_in.weight");
  const auto& conv_out = shape("decoder.conv_out.weight");
  if (conv_in.size() != 4 || latent_in.size() != 4 || conv_out.size() != 4)
    refuse_unrecognised(file.path(), "its VAE's convolutions are not 2-D");

  const std::set<int> downs = child_indices(file, p + "encoder.down.");
  const auto layers = child_indices(file, p + "encoder.down.0.block.").size();
  if (downs.empty() || !contiguous(downs)) shape("encoder.down.0.block.0.conv1.weight");
  json channels = json::array(), down_types = json::array(), up_types = json::array();
  for (int b = 0; b < static_cast<int>(downs.size()); ++b) {
    channels.push_back(shape("encoder.down." + idx(b) + ".block.0.conv1.weight").at(0));
    down_types.push_back("DownEncoderBlock2D");
    up_types.push_back("UpDecoderBlock2D");
  }
  return json{
      {"_class_name", "AutoencoderKL"},
      {"act_fn", "silu"},
      {"block_out_channels", channels},
      {"down_block_types", down_types},
      {"force_upcast", true},
      {"in_channels", conv_in[1]},
      {"latent_channels", latent_in[1]},
      {"latents_mean", nullptr},
      {"latents_std", nullptr},
      {"layers_per_block", layers},
      {"mid_block_add_attention", file.contains(p + "encoder.mid.attn_1.q.weight")},
      {"norm_num_groups", 32},
      {"out_channels", conv_out[0]},
      {"sample_size", 512},
      {"scaling_factor", 0.18215},
      {"shift_factor", nullptr},
      {"up_block_types", up_types},
      {"use_post_quant_conv", file.contains(p + "post_quant_conv.weight")},
      {"use_quant_conv", file.contains(p + "quant_conv.weight")},
  };
}

json infer_text_encoder_config(const SafetensorsFile& file, const std::string& p) {
  auto shape = [&](const std::string& name) -> const std::vector<int64_t>& {
    return require_tensor(file, p + name, "text encoder").shape;
  };
  const auto& tokens = shape("embeddings.token_embedding.weight");
  const auto& positions = shape("embeddings.position_embedding.weight");
  const std::set<int> layers = child_indices(file, p + "encoder.layers.");
  if (layers.empty() || !contiguous(layers)) shape("encoder.layers.0.mlp.fc1.weight");
  const auto& fc1 = shape("encoder.layers.0.mlp.fc1.weight");
  if (tokens.size() != 2 || positions.size() != 2 || fc1.size() != 2)
    refuse_unrecognised(file.path(), "its text encoder's embeddings are not matrices");
  const int64_t width = tokens[1];
  int64_t heads = 0;
  if (width % 64 == 0)
    heads = width / 64;
  else if (width % 8 == 0)
    heads = width / 8;
  else
    refuse_unrecognised(file.path(), "its text encoder width " + std::to_string(width) +
                                         " gives no attention head count");
  return json{
      {"architectures", json::array({"CLIPTextModel"})},
      {"attention_dropout", 0.0},
      {"bos_token_id", 49406},
      {"eos_token_id", 49407},
      {"hidden_act", "quick_gelu"},  // OpenAI CLIP's activation, which SD 1.x uses
      {"hidden_size", width},
      {"initializer_factor", 1.0},
      {"initializer_range", 0.02},
      {"intermediate_size", fc1[0]},
      {"layer_norm_eps", 1e-05},
      {"max_position_embeddings", positions[0]},
      {"model_type", "clip_text_model"},
      {"num_attention_heads", heads},
      {"num_hidden_layers", layers.size()},
      {"pad_token_id", 49407},
      {"projection_dim", width},
      {"vocab_size", tokens[0]},
  };
}

json sd1_scheduler_config() {
  return json{
      {"_class_name", "PNDMScheduler"},
      {"beta_end", 0.012},
      {"beta_schedule", "scaled_linear"},
      {"beta_start", 0.00085},
      {"num_train_timesteps", 1000},
      {"prediction_type", "epsilon"},
      {"set_alpha_to_one", false},
      {"skip_prk_steps", true},
      {"steps_offset", 1},
      {"timestep_spacing", "leading"},
      {"trained_betas", nullptr},
  };
}

}  // namespace sdserve::pipeline
