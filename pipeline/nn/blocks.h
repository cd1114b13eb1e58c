// Building blocks shared by the UNet and the VAE: residual blocks, resampling, the diffusers
// Attention module and the spatial transformer. Submodules are registered under diffusers'
// checkpoint names so that load_weights fills them by name.
//
// Everything computes in the dtype of its input and weights; nothing is upcast unless diffusers
// upcasts too.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace sdserve::pipeline {

// SiLU written over `x`, for freshly computed intermediates (these modules are inference-only).
inline torch::Tensor silu_inplace(torch::Tensor x) {
  return torch::silu_(x);
}

// ---------------------------------------------------------------------------------------------
// ResnetBlock2D: norm1 -> silu -> conv1 (+ time projection) -> norm2 -> silu -> conv2, plus a
// shortcut (1x1 conv_shortcut when the channel count changes).
struct ResnetBlock2DOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t temb_channels = 0;  // 0: no time embedding (the VAE)
  int64_t groups = 32;
  double eps = 1e-6;
  double output_scale_factor = 1.0;
  bool scale_shift = false;    // resnet_time_scale_shift == "scale_shift"
  bool skip_time_act = false;  // resnet_skip_time_act
};

// GroupNorm with the same result as `norm(x)`. On CUDA it computes the statistics with a
// general reduction and normalises in one pass (a) for channels-last inputs, which torch's kernel
// converts to NCHW and back, and (b) for contiguous inputs with few (sample, group) rows, where
// torch's one-block-per-row kernel leaves most of the GPU idle (at batch 1 the VAE's 32 rows of
// a million values: 12 of its 28 ms; docs/PERFORMANCE.md). `force` takes it on any device.
torch::Tensor group_norm_forward(torch::nn::GroupNorm norm, const torch::Tensor& x,
                                 bool force = false);

class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  explicit ResnetBlock2DImpl(const ResnetBlock2DOptions& options);
  // temb: (B, temb_channels), undefined when temb_channels == 0.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb = {});

 private:
  ResnetBlock2DOptions options_;
  torch::nn::GroupNorm norm1_{nullptr}, norm2_{nullptr};
  torch::nn::Conv2d conv1_{nullptr}, conv2_{nullptr}, conv_shortcut_{nullptr};
  torch::nn::Linear time_emb_proj_{nullptr};
};
TORCH_MODULE(ResnetBlock2D);

// ---------------------------------------------------------------------------------------------
// Downsample2D: 3x3 stride-2 conv. padding == 0 means diffusers' asymmetric (0, 1, 0, 1) pad.
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  int64_t padding_;
  torch::nn::Conv2d conv_{nullptr};
};
TORCH_MODULE(Downsample2D);

// Upsample2D: nearest-neighbour resize (x2, or to `size`) followed by a 3x3 conv.
class Upsample2DImpl : public torch::nn::Module {
 public:
  Upsample2DImpl(int64_t channels, int64_t out_channels);
  // size: the (h, w) to resize to; empty means twice the input size.
  torch::Tensor forward(const torch::Tensor& x, const std::vector<int64_t>& size = {});

 private:
  torch::nn::Conv2d conv_{nullptr};
};
TORCH_MODULE(Upsample2D);

// ---------------------------------------------------------------------------------------------
// diffusers' Attention: to_q / to_k / to_v / to_out.0, optionally a group_norm before and a
// residual connection after (the VAE's mid-block attention).
struct AttentionOptions {
  int64_t query_dim = 0;
  int64_t context_dim = 0;  // 0: self-attention (keys/values from the query input)
  int64_t heads = 1;
  int64_t dim_head = 0;
  bool bias = false;        // bias of to_q / to_k / to_v
  bool out_bias = true;     // bias of to_out.0
  bool upcast = false;      // upcast_attention: scores in float32 where the kernel is not fused
  int64_t norm_groups = 0;  // > 0: a group_norm over channels before the projections
  double norm_eps = 1e-6;
  bool residual = false;  // add the input back (after rescale_output_factor division)
  double rescale_output_factor = 1.0;
};

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionOptions& options);
  // x: (B, L, query_dim) tokens or (B, C, H, W) feature maps (attended as H*W tokens).
  // context: (B, Lk, context_dim); undefined for self-attention. residual (token inputs
  // only): added to the output (in the output projection's epilogue on CUDA).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context = {},
                        const torch::Tensor& residual = {});

  // After loading: one GEMM for q, k and v (self-attention) or for k and v (cross-attention)
  // instead of three or two. The separate weights become views into the fused one, so this
  // costs no memory; results equal the unfused ones up to GEMM rounding.
  void fuse_projections();

 private:
  AttentionOptions options_;
  torch::Tensor qkv_weight_, qkv_bias_;  // self-attention, when fused
  torch::Tensor kv_weight_, kv_bias_;    // cross-attention, when fused
  torch::nn::GroupNorm group_norm_{nullptr};
  torch::nn::Linear to_q_{nullptr}, to_k_{nullptr}, to_v_{nullptr}, out_proj_{nullptr};
  torch::nn::ModuleList to_out_;
};
TORCH_MODULE(Attention);

// ---------------------------------------------------------------------------------------------
// GEGLU feed-forward: ff.net.0.proj (dim -> 2 * inner), value * gelu(gate), ff.net.2.
class GEGLUImpl : public torch::nn::Module {
 public:
  GEGLUImpl(int64_t dim_in, int64_t dim_out);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  torch::nn::Linear proj_{nullptr};
};
TORCH_MODULE(GEGLU);

class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t dim, int64_t mult = 4);
  // residual: added to the output when defined (in the output projection's epilogue on CUDA).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& residual = {});

 private:
  GEGLU geglu_{nullptr};
  torch::nn::Linear out_{nullptr};
  torch::nn::ModuleList net_;
};
TORCH_MODULE(FeedForward);

// ---------------------------------------------------------------------------------------------
// BasicTransformerBlock: pre-LayerNorm self-attention (attn1), cross-attention (attn2) and a
// GEGLU feed-forward, each with a residual.
struct TransformerBlockOptions {
  int64_t dim = 0;
  int64_t heads = 1;
  int64_t dim_head = 0;
  int64_t cross_attention_dim = 0;
  bool only_cross_attention = false;  // attn1 attends to the context too
  bool upcast_attention = false;
  double norm_eps = 1e-5;
};

class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  explicit BasicTransformerBlockImpl(const TransformerBlockOptions& options);
  // x: (B, L, dim); context: (B, Lk, cross_attention_dim).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);

 private:
  bool only_cross_attention_;
  torch::nn::LayerNorm norm1_{nullptr}, norm2_{nullptr}, norm3_{nullptr};
  Attention attn1_{nullptr}, attn2_{nullptr};
  FeedForward ff_{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

// Transformer2DModel on continuous inputs: group norm, proj_in (1x1 conv or linear), the
// transformer blocks over H*W tokens, proj_out, plus the input as residual.
struct Transformer2DOptions {
  int64_t channels = 0;
  int64_t heads = 1;
  int64_t dim_head = 0;
  int64_t layers = 1;
  int64_t cross_attention_dim = 0;
  int64_t groups = 32;
  bool use_linear_projection = false;
  bool only_cross_attention = false;
  bool upcast_attention = false;
};

class Transformer2DImpl : public torch::nn::Module {
 public:
  explicit Transformer2DImpl(const Transformer2DOptions& options);
  // x: (B, C, H, W); context: (B, Lk, cross_attention_dim).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);

 private:
  Transformer2DOptions options_;
  torch::nn::GroupNorm norm_{nullptr};
  // Linear (use_linear_projection) or 1x1 Conv2d; both are applied as a matmul on the
  // (B, H*W, C) tokens, which is the same arithmetic without a layout round trip.
  torch::nn::Linear proj_in_linear_{nullptr}, proj_out_linear_{nullptr};
  torch::nn::Conv2d proj_in_conv_{nullptr}, proj_out_conv_{nullptr};
  std::vector<BasicTransformerBlock> blocks_;
};
TORCH_MODULE(Transformer2D);

}  // namespace sdserve::pipeline
