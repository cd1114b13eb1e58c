// diffusers' UNet2DConditionModel (the Stable Diffusion 1.x / 2.x denoiser) as a libtorch module.
// Parameters are registered under the diffusers checkpoint names
// (unet/diffusion_pytorch_model.safetensors), so load_weights fills them by name.
#pragma once

#include <torch/torch.h>

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "pipeline/nn/unet_blocks.h"

namespace sdserve::pipeline {

// unet/config.json, with every per-block setting expanded to one value per down block
// (index i of the up blocks uses element n-1-i, as diffusers reverses them).
struct UNetConfig {
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  std::vector<int64_t> block_out_channels;
  std::vector<std::string> down_block_types;  // CrossAttnDownBlock2D | DownBlock2D
  std::vector<std::string> up_block_types;    // CrossAttnUpBlock2D | UpBlock2D
  std::string mid_block_type;                 // UNetMidBlock2DCrossAttn, or "" for none
  std::vector<int64_t> layers_per_block;
  // Attention heads per block. SD 1.x/2.x configs leave num_attention_heads null and put the
  // head COUNT in attention_head_dim (diffusers' historical naming); both are resolved here.
  std::vector<int64_t> num_attention_heads;
  std::vector<int64_t> cross_attention_dim;
  std::vector<int64_t> transformer_layers_per_block;
  std::vector<bool> only_cross_attention;
  bool mid_block_only_cross_attention = false;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  int64_t time_embedding_dim = 0;  // resolved: block_out_channels[0] * 4 unless configured
  bool use_linear_projection = false;
  bool upcast_attention = false;
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  bool center_input_sample = false;
  int64_t conv_in_kernel = 3;
  int64_t conv_out_kernel = 3;
  bool resnet_scale_shift = false;  // resnet_time_scale_shift == "scale_shift"
  bool resnet_skip_time_act = false;
  // addition_embed_type "text_time" (SDXL): a pooled text embedding and size/crop numbers, each
  // number through an addition_time_embed_dim-wide sinusoid, go through add_embedding (from
  // projection_class_embeddings_input_dim features) into the time embedding.
  bool text_time = false;
  int64_t addition_time_embed_dim = 0;
  int64_t projection_class_embeddings_input_dim = 0;

  // Throws ModelError naming the key and value of anything missing, malformed or unsupported.
  static UNetConfig from_json(const nlohmann::json& j);
};

// diffusers' get_timestep_embedding: sinusoidal features of (B) timesteps, always float32.
torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                 double freq_shift);

// TimestepEmbedding: linear_1 -> silu -> linear_2.
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  torch::nn::Linear linear_1_{nullptr}, linear_2_{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

class UNetImpl : public torch::nn::Module {
 public:
  explicit UNetImpl(const UNetConfig& config);

  // sample: (B, in_channels, h, w); timesteps: (B) or a single value, any numeric dtype, one per
  // sample (they may differ); context: (B, L, cross_attention_dim). With text_time, text_embeds
  // (B, pooled width) and time_ids (B, n) are required (ignored otherwise). Returns
  // (B, out_channels, h, w) in the dtype of the sample.
  torch::Tensor forward(const torch::Tensor& sample, const torch::Tensor& timesteps,
                        const torch::Tensor& context, const torch::Tensor& text_embeds = {},
                        const torch::Tensor& time_ids = {});

  const UNetConfig& config() const { return config_; }

 private:
  UNetConfig config_;
  torch::nn::Conv2d conv_in_{nullptr}, conv_out_{nullptr};
  TimestepEmbedding time_embedding_{nullptr};
  TimestepEmbedding add_embedding_{nullptr};  // text_time only
  std::vector<DownBlock> down_blocks_;
  MidBlockCrossAttn mid_block_{nullptr};
  std::vector<UpBlock> up_blocks_;
  torch::nn::GroupNorm conv_norm_out_{nullptr};
};
TORCH_MODULE(UNet);

}  // namespace sdserve::pipeline
