// diffusers' AutoencoderKL (the Stable Diffusion VAE) as a libtorch module: the encoder (image to
// latent mean) and the decoder (latent to image). Parameters are registered under the diffusers
// checkpoint names (vae/diffusion_pytorch_model.safetensors).
#pragma once

#include <torch/torch.h>

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <vector>

#include "pipeline/nn/unet_blocks.h"

namespace sdserve::pipeline {

// vae/config.json.
struct VaeConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  int64_t latent_channels = 4;
  std::vector<int64_t> block_out_channels;
  int64_t layers_per_block = 1;
  int64_t norm_num_groups = 32;
  bool mid_block_add_attention = true;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  // Latent scaling, applied by the pipeline, not by this module: z_model = (z_vae - shift) * scale.
  double scaling_factor = 0.18215;
  double shift_factor = 0.0;
  // diffusers runs this VAE in float32 even in a float16 pipeline when set (SD 1.x's VAE
  // overflows in float16); the pipeline decides, this module computes in its weights' dtype.
  bool force_upcast = true;

  // Throws ModelError naming the key and value of anything malformed or unsupported.
  static VaeConfig from_json(const nlohmann::json& j);
};

class VaeEncoderImpl : public torch::nn::Module {
 public:
  explicit VaeEncoderImpl(const VaeConfig& config);
  torch::Tensor forward(const torch::Tensor& x);  // (B, 3, H, W) -> (B, 2 * latent, h, w)

 private:
  torch::nn::Conv2d conv_in_{nullptr}, conv_out_{nullptr};
  std::vector<DownBlock> down_blocks_;
  MidBlock2D mid_block_{nullptr};
  torch::nn::GroupNorm conv_norm_out_{nullptr};
};
TORCH_MODULE(VaeEncoder);

class VaeDecoderImpl : public torch::nn::Module {
 public:
  explicit VaeDecoderImpl(const VaeConfig& config);
  torch::Tensor forward(const torch::Tensor& z);  // (B, latent, h, w) -> (B, 3, H, W)

 private:
  torch::nn::Conv2d conv_in_{nullptr}, conv_out_{nullptr};
  MidBlock2D mid_block_{nullptr};
  std::vector<UpBlock> up_blocks_;
  torch::nn::GroupNorm conv_norm_out_{nullptr};
};
TORCH_MODULE(VaeDecoder);

class VaeImpl : public torch::nn::Module {
 public:
  explicit VaeImpl(const VaeConfig& config);

  // z: (B, latent_channels, h, w) VAE latents (already divided by scaling_factor). Applies
  // post_quant_conv and the decoder; returns the raw decoder output, roughly in [-1, 1], with
  // no clamping.
  torch::Tensor decode(const torch::Tensor& z);
  // x: (B, in_channels, H, W) in [-1, 1]. Encoder and quant_conv; returns the mean half of the
  // latent distribution's moments (unscaled).
  torch::Tensor encode_mean(const torch::Tensor& x);
  // The latent distribution's parameters: mean and log-variance along channels (2C).
  torch::Tensor encode_moments(const torch::Tensor& x);

  const VaeConfig& config() const { return config_; }

 private:
  VaeConfig config_;
  VaeEncoder encoder_{nullptr};
  VaeDecoder decoder_{nullptr};
  torch::nn::Conv2d quant_conv_{nullptr}, post_quant_conv_{nullptr};
};
TORCH_MODULE(Vae);

}  // namespace sdserve::pipeline
