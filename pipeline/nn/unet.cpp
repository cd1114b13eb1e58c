#include "pipeline/nn/unet.h"

#include <nlohmann/json.hpp>

#include <cmath>

#include "pipeline/errors.h"
#include "pipeline/io/config_json.h"
#include "pipeline/nn/fused.h"
#include "pipeline/nn/lora_hook.h"

namespace sdserve::pipeline {
namespace {

using nlohmann::json;

[[noreturn]] void unsupported(const std::string& key, const json& value, const std::string& why) {
  unsupported_config("unet config.json", key, value, why);
}

// Absent and null keys take diffusers' default, as diffusers does for older configs.
template <typename T>
T get(const json& j, const std::string& key, T fallback) {
  return config_value<T>(j, key, std::move(fallback), "unet config.json");
}

// The key must be absent, null or equal to `expected` (a feature this implementation lacks).
void require(const json& j, const std::string& key, const json& expected, const std::string& why) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null() || *it == expected) return;
  unsupported(key, *it, why);
}

// An int (or bool) applying to every block, or a list with one entry per block.
template <typename T>
std::vector<T> per_block(const json& j, const std::string& key, size_t blocks, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::vector<T>(blocks, fallback);
  try {
    if (!it->is_array()) return std::vector<T>(blocks, it->get<T>());
    auto values = it->get<std::vector<T>>();
    if (values.size() != blocks)
      unsupported(key, *it, "needs one entry per block, " + std::to_string(blocks) + " blocks");
    return values;
  } catch (const json::exception&) {
    unsupported(key, *it, "expected a number or a list of numbers, one per block");
  }
}

}  // namespace

UNetConfig UNetConfig::from_json(const json& j) {
  if (!j.is_object()) throw ModelError("unet config.json: not a JSON object");
  UNetConfig c;
  // Features of other UNet2DConditionModel variants (SDXL, Kandinsky, LCM, GLIGEN...).
  const std::string absent = "only null is supported";
  for (const char* key :
       {"class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type",
        "time_cond_proj_dim", "timestep_post_act", "time_embedding_act_fn", "cross_attention_norm",
        "reverse_transformer_layers_per_block"}) {
    require(j, key, json(), absent);
  }
  require(j, "dual_cross_attention", false, "only false is supported");
  require(j, "class_embeddings_concat", false, "only false is supported");
  require(j, "attention_type", "default", "only \"default\" is supported");
  require(j, "time_embedding_type", "positional", "only \"positional\" is supported");
  require(j, "act_fn", "silu", "only \"silu\" is supported");
  if (j.contains("norm_num_groups") && j["norm_num_groups"].is_null())
    unsupported("norm_num_groups", nullptr, "a group count is required");

  c.in_channels = get<int64_t>(j, "in_channels", 4);
  c.out_channels = get<int64_t>(j, "out_channels", 4);
  c.block_out_channels = get<std::vector<int64_t>>(j, "block_out_channels", {320, 640, 1280, 1280});
  c.down_block_types = get<std::vector<std::string>>(
      j, "down_block_types",
      {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"});
  c.up_block_types = get<std::vector<std::string>>(
      j, "up_block_types",
      {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"});
  const size_t n = c.block_out_channels.size();
  if (n == 0) unsupported("block_out_channels", j["block_out_channels"], "must not be empty");
  if (c.down_block_types.size() != n)
    unsupported("down_block_types", c.down_block_types, "needs one type per block_out_channels");
  if (c.up_block_types.size() != n)
    unsupported("up_block_types", c.up_block_types, "needs one type per block_out_channels");
  for (const auto& type : c.down_block_types) {
    if (type != "CrossAttnDownBlock2D" && type != "DownBlock2D")
      unsupported("down_block_types", type, "known: CrossAttnDownBlock2D, DownBlock2D");
  }
  for (const auto& type : c.up_block_types) {
    if (type != "CrossAttnUpBlock2D" && type != "UpBlock2D")
      unsupported("up_block_types", type, "known: CrossAttnUpBlock2D, UpBlock2D");
  }
  auto mid = j.find("mid_block_type");
  if (mid == j.end()) {
    c.mid_block_type = "UNetMidBlock2DCrossAttn";
  } else if (!mid->is_null()) {
    if (*mid != "UNetMidBlock2DCrossAttn")
      unsupported("mid_block_type", *mid, "known: UNetMidBlock2DCrossAttn or null");
    c.mid_block_type = "UNetMidBlock2DCrossAttn";
  }

  c.layers_per_block = per_block<int64_t>(j, "layers_per_block", n, 2);
  // diffusers' naming quirk: without num_attention_heads, attention_head_dim holds head counts.
  if (j.contains("num_attention_heads") && !j["num_attention_heads"].is_null()) {
    c.num_attention_heads = per_block<int64_t>(j, "num_attention_heads", n, 8);
  } else {
    c.num_attention_heads = per_block<int64_t>(j, "attention_head_dim", n, 8);
  }
  c.cross_attention_dim = per_block<int64_t>(j, "cross_attention_dim", n, 1280);
  c.transformer_layers_per_block = per_block<int64_t>(j, "transformer_layers_per_block", n, 1);
  const auto only_cross = j.find("only_cross_attention");
  c.only_cross_attention = per_block<bool>(j, "only_cross_attention", n, false);
  // As diffusers: a single bool also sets the mid block unless configured separately.
  const bool only_cross_is_bool = only_cross != j.end() && only_cross->is_boolean();
  c.mid_block_only_cross_attention = get<bool>(
      j, "mid_block_only_cross_attention", only_cross_is_bool ? only_cross->get<bool>() : false);
  for (size_t i = 0; i < n; ++i) {
    const bool cross = c.down_block_types[i] == "CrossAttnDownBlock2D" ||
                       c.up_block_types[n - 1 - i] == "CrossAttnUpBlock2D" ||
                       (i == n - 1 && !c.mid_block_type.empty());
    if (cross && c.num_attention_heads[i] <= 0)
      unsupported("attention_head_dim", c.num_attention_heads[i], "head counts must be positive");
    if (cross && c.cross_attention_dim[i] <= 0)
      unsupported("cross_attention_dim", c.cross_attention_dim[i], "must be positive");
  }

  c.norm_num_groups = get<int64_t>(j, "norm_num_groups", 32);
  c.norm_eps = get<double>(j, "norm_eps", 1e-5);
  c.flip_sin_to_cos = get<bool>(j, "flip_sin_to_cos", true);
  c.freq_shift = get<double>(j, "freq_shift", 0.0);
  c.time_embedding_dim = get<int64_t>(j, "time_embedding_dim", c.block_out_channels[0] * 4);
  c.use_linear_projection = get<bool>(j, "use_linear_projection", false);
  c.upcast_attention = get<bool>(j, "upcast_attention", false);
  c.downsample_padding = get<int64_t>(j, "downsample_padding", 1);
  c.mid_block_scale_factor = get<double>(j, "mid_block_scale_factor", 1.0);
  c.center_input_sample = get<bool>(j, "center_input_sample", false);
  c.conv_in_kernel = get<int64_t>(j, "conv_in_kernel", 3);
  c.conv_out_kernel = get<int64_t>(j, "conv_out_kernel", 3);
  const auto shift = get<std::string>(j, "resnet_time_scale_shift", "default");
  if (shift != "default" && shift != "scale_shift")
    unsupported("resnet_time_scale_shift", shift, "known: default, scale_shift");
  c.resnet_scale_shift = shift == "scale_shift";
  c.resnet_skip_time_act = get<bool>(j, "resnet_skip_time_act", false);
  const auto addition = get<std::string>(j, "addition_embed_type", "");
  if (!addition.empty() && addition != "text_time")
    unsupported("addition_embed_type", addition, "known: null, \"text_time\"");
  c.text_time = addition == "text_time";
  if (c.text_time) {
    c.addition_time_embed_dim = get<int64_t>(j, "addition_time_embed_dim", 0);
    c.projection_class_embeddings_input_dim =
        get<int64_t>(j, "projection_class_embeddings_input_dim", 0);
    if (c.addition_time_embed_dim <= 0)
      unsupported("addition_time_embed_dim", j.value("addition_time_embed_dim", json()),
                  "text_time needs a positive width");
    if (c.projection_class_embeddings_input_dim <= 0)
      unsupported("projection_class_embeddings_input_dim",
                  j.value("projection_class_embeddings_input_dim", json()),
                  "text_time needs a positive width");
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                 double freq_shift) {
  // Same float32 operations in the same order as diffusers: at t ~ 1000 the arguments are large
  // enough that a reordered product would move the sines by more than the parity tolerance.
  const int64_t half = dim / 2;
  auto exponent =
      torch::arange(0, half, timesteps.options().dtype(torch::kFloat32)) * (-std::log(10000.0));
  exponent = exponent / (static_cast<double>(half) - freq_shift);
  auto args = timesteps.to(torch::kFloat32).unsqueeze(1) * exponent.exp().unsqueeze(0);
  auto emb = flip_sin_to_cos ? torch::cat({args.cos(), args.sin()}, -1)
                             : torch::cat({args.sin(), args.cos()}, -1);
  if (dim % 2 == 1)
    emb = torch::nn::functional::pad(emb, torch::nn::functional::PadFuncOptions({0, 1}));
  return emb;
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim) {
  linear_1_ = register_module("linear_1", torch::nn::Linear(in_channels, time_embed_dim));
  linear_2_ = register_module("linear_2", torch::nn::Linear(time_embed_dim, time_embed_dim));
}

torch::Tensor TimestepEmbeddingImpl::forward(const torch::Tensor& x) {
  const auto h = torch::silu(with_lora(*linear_1_, x, linear_1_(x)));
  return with_lora(*linear_2_, h, linear_2_(h));
}

// ---------------------------------------------------------------------------------------------
UNetImpl::UNetImpl(const UNetConfig& config) : config_(config) {
  const auto& c = config_;
  const auto& channels = c.block_out_channels;
  const size_t n = channels.size();
  conv_in_ = register_module(
      "conv_in",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(c.in_channels, channels[0], c.conv_in_kernel)
                            .padding((c.conv_in_kernel - 1) / 2)));
  time_embedding_ =
      register_module("time_embedding", TimestepEmbedding(channels[0], c.time_embedding_dim));
  if (c.text_time) {
    add_embedding_ = register_module(
        "add_embedding",
        TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embedding_dim));
  }

  ResnetSettings resnet;
  resnet.temb_channels = c.time_embedding_dim;
  resnet.groups = c.norm_num_groups;
  resnet.eps = c.norm_eps;
  resnet.scale_shift = c.resnet_scale_shift;
  resnet.skip_time_act = c.resnet_skip_time_act;
  auto attention = [&](size_t i, bool cross, bool only_cross) {
    CrossAttentionSettings a;
    a.heads = cross ? c.num_attention_heads[i] : 0;
    a.layers = c.transformer_layers_per_block[i];
    a.cross_attention_dim = c.cross_attention_dim[i];
    a.use_linear_projection = c.use_linear_projection;
    a.only_cross_attention = only_cross;
    a.upcast_attention = c.upcast_attention;
    return a;
  };

  torch::nn::ModuleList down_list;
  for (size_t i = 0; i < n; ++i) {
    DownBlockOptions o;
    o.in_channels = i == 0 ? channels[0] : channels[i - 1];
    o.out_channels = channels[i];
    o.layers = c.layers_per_block[i];
    o.add_downsample = i + 1 < n;
    o.downsample_padding = c.downsample_padding;
    o.resnet = resnet;
    o.attention =
        attention(i, c.down_block_types[i] == "CrossAttnDownBlock2D", c.only_cross_attention[i]);
    down_blocks_.emplace_back(o);
    down_list->push_back(down_blocks_.back());
  }
  register_module("down_blocks", down_list);

  if (!c.mid_block_type.empty()) {
    MidBlockOptions o;
    o.channels = channels[n - 1];
    o.resnet = resnet;
    o.resnet.output_scale_factor = c.mid_block_scale_factor;
    o.attention = attention(n - 1, true, c.mid_block_only_cross_attention);
    mid_block_ = register_module("mid_block", MidBlockCrossAttn(o));
  }

  torch::nn::ModuleList up_list;
  for (size_t i = 0; i < n; ++i) {
    const size_t r = n - 1 - i;  // the down block this up block mirrors
    UpBlockOptions o;
    o.prev_output_channels = i == 0 ? channels[n - 1] : channels[r + 1];
    o.out_channels = channels[r];
    o.in_channels = channels[r == 0 ? 0 : r - 1];
    o.layers = c.layers_per_block[r] + 1;
    o.add_upsample = i + 1 < n;
    o.resnet = resnet;
    o.attention =
        attention(r, c.up_block_types[i] == "CrossAttnUpBlock2D", c.only_cross_attention[r]);
    up_blocks_.emplace_back(o);
    up_list->push_back(up_blocks_.back());
  }
  register_module("up_blocks", up_list);

  conv_norm_out_ = register_module(
      "conv_norm_out",
      torch::nn::GroupNorm(
          torch::nn::GroupNormOptions(c.norm_num_groups, channels[0]).eps(c.norm_eps)));
  conv_out_ = register_module(
      "conv_out",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(channels[0], c.out_channels, c.conv_out_kernel)
                            .padding((c.conv_out_kernel - 1) / 2)));
}

torch::Tensor UNetImpl::forward(const torch::Tensor& sample, const torch::Tensor& timesteps,
                                const torch::Tensor& context, const torch::Tensor& text_embeds,
                                const torch::Tensor& time_ids) {
  TORCH_CHECK(sample.dim() == 4 && sample.size(1) == config_.in_channels,
              "UNet: sample must be (B, ", config_.in_channels, ", h, w)");
  const int64_t batch = sample.size(0);
  auto t = timesteps.to(sample.device());
  if (t.dim() == 0) t = t.unsqueeze(0);
  TORCH_CHECK(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == batch),
              "UNet: timesteps must hold 1 or B values");
  // Sinusoids in float32 (as diffusers), then the weights' dtype.
  auto t_emb = timestep_embedding(t.expand({batch}), config_.block_out_channels[0],
                                  config_.flip_sin_to_cos, config_.freq_shift)
                   .to(sample.scalar_type());
  auto emb = time_embedding_(t_emb);
  if (add_embedding_) {
    TORCH_CHECK(text_embeds.defined() && time_ids.defined() && text_embeds.size(0) == batch &&
                    time_ids.size(0) == batch,
                "UNet: text_time conditioning needs text_embeds and time_ids for every sample");
    // Each size/crop number through its own sinusoid (float32, as diffusers), then joined with
    // the pooled text embedding in the weights' dtype.
    auto time_embeds =
        timestep_embedding(time_ids.to(sample.device()).flatten(), config_.addition_time_embed_dim,
                           config_.flip_sin_to_cos, config_.freq_shift)
            .reshape({batch, -1});
    auto add = torch::cat({text_embeds.to(sample.device(), torch::kFloat32), time_embeds}, -1);
    emb = emb + add_embedding_(add.to(emb.scalar_type()));
  }

  auto x = config_.center_input_sample ? sample * 2 - 1.0 : sample;
  x = with_lora(*conv_in_, x, conv2d_fused(conv_in_, x));
  std::vector<torch::Tensor> skips{x};
  for (auto& block : down_blocks_) x = block(x, emb, context, &skips);
  if (mid_block_) x = mid_block_(x, emb, context);
  for (size_t i = 0; i < up_blocks_.size(); ++i) {
    // Upsample to the size of the next block's skips, which also handles odd sizes.
    std::vector<int64_t> size;
    if (i + 1 < up_blocks_.size()) {
      const auto& next_skip = skips[skips.size() - up_blocks_[i]->num_layers() - 1];
      size = {next_skip.size(2), next_skip.size(3)};
    }
    x = up_blocks_[i](x, emb, context, &skips, size);
  }
  const auto h = group_norm_fused(conv_norm_out_, x, {}, /*silu=*/true);
  return with_lora(*conv_out_, h, conv2d_fused(conv_out_, h));
}

}  // namespace sdserve::pipeline
