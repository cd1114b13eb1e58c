#include "pipeline/nn/vae.h"

#include <nlohmann/json.hpp>

#include "pipeline/errors.h"
#include "pipeline/io/config_json.h"
#include "pipeline/nn/fused.h"

namespace sdserve::pipeline {
namespace {

using nlohmann::json;

// diffusers hard-codes this epsilon for every VAE norm.
constexpr double kVaeEps = 1e-6;

[[noreturn]] void unsupported(const std::string& key, const json& value, const std::string& why) {
  unsupported_config("vae config.json", key, value, why);
}

template <typename T>
T get(const json& j, const std::string& key, T fallback) {
  return config_value<T>(j, key, std::move(fallback), "vae config.json");
}

torch::nn::Conv2d conv3x3(int64_t in, int64_t out) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).padding(1));
}

torch::nn::GroupNorm norm_out(int64_t groups, int64_t channels) {
  return torch::nn::GroupNorm(torch::nn::GroupNormOptions(groups, channels).eps(kVaeEps));
}

ResnetSettings vae_resnet(const VaeConfig& c) {
  ResnetSettings r;
  r.groups = c.norm_num_groups;
  r.eps = kVaeEps;
  return r;
}

MidBlockOptions vae_mid_block(const VaeConfig& c) {
  MidBlockOptions o;
  o.channels = c.block_out_channels.back();
  o.resnet = vae_resnet(c);
  o.attention.heads = c.mid_block_add_attention ? 1 : 0;  // one head over all channels
  return o;
}

}  // namespace

VaeConfig VaeConfig::from_json(const json& j) {
  if (!j.is_object()) throw ModelError("vae config.json: not a JSON object");
  VaeConfig c;
  auto act = j.find("act_fn");
  if (act != j.end() && !act->is_null() && *act != "silu")
    unsupported("act_fn", *act, "only \"silu\" is supported");
  // Per-channel latent statistics (SDXL-era VAEs) would need the pipeline to apply them.
  for (const char* key : {"latents_mean", "latents_std"}) {
    auto it = j.find(key);
    if (it != j.end() && !it->is_null()) unsupported(key, *it, "only null is supported");
  }
  c.in_channels = get<int64_t>(j, "in_channels", 3);
  c.out_channels = get<int64_t>(j, "out_channels", 3);
  c.latent_channels = get<int64_t>(j, "latent_channels", 4);
  c.block_out_channels = get<std::vector<int64_t>>(j, "block_out_channels", {64});
  if (c.block_out_channels.empty())
    unsupported("block_out_channels", c.block_out_channels, "must not be empty");
  const size_t n = c.block_out_channels.size();
  const auto down = get<std::vector<std::string>>(
      j, "down_block_types", std::vector<std::string>(n, "DownEncoderBlock2D"));
  const auto up = get<std::vector<std::string>>(j, "up_block_types",
                                                std::vector<std::string>(n, "UpDecoderBlock2D"));
  if (down.size() != n)
    unsupported("down_block_types", down, "needs one type per block_out_channels");
  if (up.size() != n) unsupported("up_block_types", up, "needs one type per block_out_channels");
  for (const auto& type : down) {
    if (type != "DownEncoderBlock2D")
      unsupported("down_block_types", type, "only DownEncoderBlock2D is supported");
  }
  for (const auto& type : up) {
    if (type != "UpDecoderBlock2D")
      unsupported("up_block_types", type, "only UpDecoderBlock2D is supported");
  }
  c.layers_per_block = get<int64_t>(j, "layers_per_block", 1);
  c.norm_num_groups = get<int64_t>(j, "norm_num_groups", 32);
  c.mid_block_add_attention = get<bool>(j, "mid_block_add_attention", true);
  c.use_quant_conv = get<bool>(j, "use_quant_conv", true);
  c.use_post_quant_conv = get<bool>(j, "use_post_quant_conv", true);
  c.scaling_factor = get<double>(j, "scaling_factor", 0.18215);
  c.shift_factor = get<double>(j, "shift_factor", 0.0);
  c.force_upcast = get<bool>(j, "force_upcast", true);
  return c;
}

// ---------------------------------------------------------------------------------------------
VaeEncoderImpl::VaeEncoderImpl(const VaeConfig& c) {
  const auto& channels = c.block_out_channels;
  const size_t n = channels.size();
  conv_in_ = register_module("conv_in", conv3x3(c.in_channels, channels[0]));
  torch::nn::ModuleList down_list;
  for (size_t i = 0; i < n; ++i) {
    DownBlockOptions o;
    o.in_channels = i == 0 ? channels[0] : channels[i - 1];
    o.out_channels = channels[i];
    o.layers = c.layers_per_block;
    o.add_downsample = i + 1 < n;
    o.downsample_padding = 0;  // asymmetric padding, as diffusers' DownEncoderBlock2D
    o.resnet = vae_resnet(c);
    down_blocks_.emplace_back(o);
    down_list->push_back(down_blocks_.back());
  }
  register_module("down_blocks", down_list);
  mid_block_ = register_module("mid_block", MidBlock2D(vae_mid_block(c)));
  conv_norm_out_ = register_module("conv_norm_out", norm_out(c.norm_num_groups, channels[n - 1]));
  // Mean and log-variance.
  conv_out_ = register_module("conv_out", conv3x3(channels[n - 1], 2 * c.latent_channels));
}

torch::Tensor VaeEncoderImpl::forward(const torch::Tensor& x) {
  auto h = conv2d_fused(conv_in_, x);
  for (auto& block : down_blocks_) h = block->forward(h, {}, {}, nullptr);
  h = mid_block_(h);
  return conv2d_fused(conv_out_, group_norm_fused(conv_norm_out_, h, {}, /*silu=*/true));
}

VaeDecoderImpl::VaeDecoderImpl(const VaeConfig& c) {
  const auto& channels = c.block_out_channels;
  const size_t n = channels.size();
  conv_in_ = register_module("conv_in", conv3x3(c.latent_channels, channels[n - 1]));
  mid_block_ = register_module("mid_block", MidBlock2D(vae_mid_block(c)));
  torch::nn::ModuleList up_list;
  for (size_t i = 0; i < n; ++i) {
    const size_t r = n - 1 - i;
    UpBlockOptions o;
    o.prev_output_channels = i == 0 ? channels[n - 1] : channels[r + 1];
    o.out_channels = channels[r];
    o.layers = c.layers_per_block + 1;
    o.skip_connections = false;
    o.add_upsample = i + 1 < n;
    o.resnet = vae_resnet(c);
    up_blocks_.emplace_back(o);
    up_list->push_back(up_blocks_.back());
  }
  register_module("up_blocks", up_list);
  conv_norm_out_ = register_module("conv_norm_out", norm_out(c.norm_num_groups, channels[0]));
  conv_out_ = register_module("conv_out", conv3x3(channels[0], c.out_channels));
}

torch::Tensor VaeDecoderImpl::forward(const torch::Tensor& z) {
  auto h = mid_block_(conv2d_fused(conv_in_, z));
  for (auto& block : up_blocks_) h = block->forward(h, {}, {}, nullptr);
  return conv2d_fused(conv_out_, group_norm_fused(conv_norm_out_, h, {}, /*silu=*/true));
}

// ---------------------------------------------------------------------------------------------
VaeImpl::VaeImpl(const VaeConfig& config) : config_(config) {
  encoder_ = register_module("encoder", VaeEncoder(config));
  decoder_ = register_module("decoder", VaeDecoder(config));
  const int64_t latent = config.latent_channels;
  if (config.use_quant_conv) {
    quant_conv_ = register_module("quant_conv", torch::nn::Conv2d(2 * latent, 2 * latent, 1));
  }
  if (config.use_post_quant_conv) {
    post_quant_conv_ = register_module("post_quant_conv", torch::nn::Conv2d(latent, latent, 1));
  }
}

torch::Tensor VaeImpl::decode(const torch::Tensor& z) {
  return decoder_(post_quant_conv_ ? post_quant_conv_(z) : z);
}

torch::Tensor VaeImpl::encode_moments(const torch::Tensor& x) {
  auto moments = encoder_(x);
  return quant_conv_ ? quant_conv_(moments) : moments;
}

torch::Tensor VaeImpl::encode_mean(const torch::Tensor& x) {
  return encode_moments(x).narrow(1, 0, config_.latent_channels);
}

}  // namespace sdserve::pipeline
