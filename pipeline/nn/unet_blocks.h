// The down, mid and up blocks of diffusers' UNet2DConditionModel, and the same blocks without
// time embedding and skips as the VAE uses them (DownEncoderBlock2D, UpDecoderBlock2D,
// UNetMidBlock2D).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "pipeline/nn/blocks.h"

namespace sdserve::pipeline {

// What every resnet of a block shares.
struct ResnetSettings {
  int64_t temb_channels = 0;  // 0: no time embedding
  int64_t groups = 32;
  double eps = 1e-6;
  double output_scale_factor = 1.0;
  bool scale_shift = false;
  bool skip_time_act = false;
};

// The spatial transformers of a cross-attention block (absent when heads == 0).
struct CrossAttentionSettings {
  int64_t heads = 0;  // 0: a block without attention (DownBlock2D, UpBlock2D, the VAE's)
  int64_t layers = 1;
  int64_t cross_attention_dim = 0;
  bool use_linear_projection = false;
  bool only_cross_attention = false;
  bool upcast_attention = false;
};

// CrossAttnDownBlock2D / DownBlock2D / DownEncoderBlock2D.
struct DownBlockOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t layers = 1;
  bool add_downsample = true;
  int64_t downsample_padding = 1;
  ResnetSettings resnet;
  CrossAttentionSettings attention;
};

class DownBlockImpl : public torch::nn::Module {
 public:
  explicit DownBlockImpl(const DownBlockOptions& options);
  // Appends each layer's output (and the downsampled one) to `skips` when given.
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb, const torch::Tensor& context,
                        std::vector<torch::Tensor>* skips);

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2D> attentions_;
  Downsample2D downsampler_{nullptr};
};
TORCH_MODULE(DownBlock);

// CrossAttnUpBlock2D / UpBlock2D (with skips) and UpDecoderBlock2D (without).
struct UpBlockOptions {
  int64_t in_channels = 0;           // channels of the deepest skip this block consumes
  int64_t prev_output_channels = 0;  // channels of the block's input
  int64_t out_channels = 0;
  int64_t layers = 1;
  bool skip_connections = true;  // false: the VAE decoder's blocks
  bool add_upsample = true;
  ResnetSettings resnet;
  CrossAttentionSettings attention;
};

class UpBlockImpl : public torch::nn::Module {
 public:
  explicit UpBlockImpl(const UpBlockOptions& options);
  // Pops one skip per resnet from the back of `skips` (when the block uses them).
  // upsample_size: output (h, w) of the upsampler; empty means twice the input.
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb, const torch::Tensor& context,
                        std::vector<torch::Tensor>* skips,
                        const std::vector<int64_t>& upsample_size = {});
  int64_t num_layers() const { return static_cast<int64_t>(resnets_.size()); }

 private:
  bool skip_connections_;
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2D> attentions_;
  Upsample2D upsampler_{nullptr};
};
TORCH_MODULE(UpBlock);

// UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) per layer.
struct MidBlockOptions {
  int64_t channels = 0;
  int64_t layers = 1;
  ResnetSettings resnet;
  CrossAttentionSettings attention;
};

class MidBlockCrossAttnImpl : public torch::nn::Module {
 public:
  explicit MidBlockCrossAttnImpl(const MidBlockOptions& options);
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb, const torch::Tensor& context);

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2D> attentions_;
};
TORCH_MODULE(MidBlockCrossAttn);

// UNetMidBlock2D as the VAE uses it: resnet, then (single-head spatial self-attention with
// group norm and residual, resnet) per layer. attention.heads == 0 drops the attention
// (mid_block_add_attention = false); otherwise one head of `channels` dims, as diffusers' VAE.
class MidBlock2DImpl : public torch::nn::Module {
 public:
  explicit MidBlock2DImpl(const MidBlockOptions& options);
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb = {});

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Attention> attentions_;
};
TORCH_MODULE(MidBlock2D);

}  // namespace sdserve::pipeline
