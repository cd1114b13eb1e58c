#include "pipeline/nn/blocks.h"

#include "pipeline/nn/attention.h"
#include "pipeline/nn/fused.h"
#include "pipeline/nn/lora_hook.h"

namespace sdserve::pipeline {
namespace {

namespace F = torch::nn::functional;

torch::nn::GroupNorm group_norm(int64_t groups, int64_t channels, double eps) {
  return torch::nn::GroupNorm(torch::nn::GroupNormOptions(groups, channels).eps(eps).affine(true));
}

torch::nn::Linear linear(int64_t in, int64_t out, bool bias) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
}

torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t padding) {
  return torch::nn::Conv2d(
      torch::nn::Conv2dOptions(in, out, kernel).stride(stride).padding(padding));
}

// A module's output plus its LoRA terms where a call is active (lora_hook.h). The input is taken
// by value: a temporary argument dies at the end of the caller's expression, as it would without.
torch::Tensor conv_lora(const torch::nn::Conv2d& conv, torch::Tensor x) {
  return with_lora(*conv, x, conv2d_fused(conv, x));
}
torch::Tensor conv_no_bias_lora(const torch::nn::Conv2d& conv, torch::Tensor x) {
  return with_lora(*conv, x, conv2d_no_bias(conv, x));
}
torch::Tensor conv_forward_lora(torch::nn::Conv2d conv, torch::Tensor x) {
  return with_lora(*conv, x, conv->forward(x));
}

// (B, L, heads * d) -> (B, heads, L, d), a view: the attention kernels accept the strides.
torch::Tensor split_heads(const torch::Tensor& x, int64_t heads) {
  return x.view({x.size(0), x.size(1), heads, -1}).transpose(1, 2);
}

}  // namespace

torch::Tensor group_norm_forward(torch::nn::GroupNorm norm, const torch::Tensor& x, bool force) {
  const auto& o = norm->options;
  const int64_t n = x.size(0), groups = o.num_groups(), channels = x.size(1);
  constexpr int64_t kFewRows = 512;  // below this, one block per row underfills an H100/H200
  // Measured on an H200 (docs/PERFORMANCE.md): the reduction wins for channels-last inputs at
  // UNet batch 16 (-13% per step) but loses at batch 1 (+6%), where torch's kernel is fine.
  constexpr int64_t kManyRows = 256;
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() &&
                             x.is_contiguous(torch::MemoryFormat::ChannelsLast) &&
                             (force || n * groups >= kManyRows);
  const bool few_rows = x.is_contiguous() && n * groups < kFewRows;
  if (!force && (!x.is_cuda() || !(channels_last || few_rows))) return norm->forward(x);

  // Statistics per (sample, group) with a general reduction, in float32.
  const auto stats_dtype = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  std::tuple<torch::Tensor, torch::Tensor> var_mean;
  if (channels_last) {
    // (N, C, H, W) channels-last is (N, H*W, G, C/G) in memory: reduce over dims 1 and 3 and
    // keep the layout, instead of torch's kernel converting to NCHW and back.
    auto grouped = x.permute({0, 2, 3, 1}).reshape({n, -1, groups, channels / groups});
    var_mean = torch::var_mean(grouped, {1, 3}, /*unbiased=*/false, /*keepdim=*/false);
  } else {
    auto grouped = x.reshape({n, groups, -1}).to(stats_dtype);
    var_mean = torch::var_mean(grouped, {2}, /*unbiased=*/false, /*keepdim=*/false);
  }
  auto rstd = torch::rsqrt(std::get<0>(var_mean).to(stats_dtype) + o.eps());  // (n, groups)
  auto mean = std::get<1>(var_mean).to(stats_dtype);
  // Fold statistics and affine parameters into one scale and shift per (sample, channel), so
  // normalising is a single pass over x that keeps its memory layout.
  auto per_channel = [&](const torch::Tensor& t) {
    return t.unsqueeze(-1).expand({n, groups, channels / groups}).reshape({n, channels});
  };
  auto scale = per_channel(rstd);
  auto shift = -per_channel(mean) * scale;
  if (o.affine()) {
    scale = scale * norm->weight.to(stats_dtype);
    shift = shift * norm->weight.to(stats_dtype) + norm->bias.to(stats_dtype);
  }
  std::vector<int64_t> shape = {n, channels};
  for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(1);
  return torch::addcmul(shift.view(shape).to(x.scalar_type()), x,
                        scale.view(shape).to(x.scalar_type()));
}

// ---------------------------------------------------------------------------------------------
ResnetBlock2DImpl::ResnetBlock2DImpl(const ResnetBlock2DOptions& options) : options_(options) {
  const auto in = options.in_channels, out = options.out_channels;
  norm1_ = register_module("norm1", group_norm(options.groups, in, options.eps));
  conv1_ = register_module("conv1", conv(in, out, 3, 1, 1));
  if (options.temb_channels > 0) {
    const int64_t proj_out = options.scale_shift ? 2 * out : out;
    time_emb_proj_ =
        register_module("time_emb_proj", linear(options.temb_channels, proj_out, true));
  }
  norm2_ = register_module("norm2", group_norm(options.groups, out, options.eps));
  conv2_ = register_module("conv2", conv(out, out, 3, 1, 1));
  if (in != out) conv_shortcut_ = register_module("conv_shortcut", conv(in, out, 1, 1, 0));
}

torch::Tensor ResnetBlock2DImpl::forward(const torch::Tensor& x, const torch::Tensor& temb) {
  // In-place ops below only touch tensors created in this function (inference-only module).
  torch::Tensor t;
  if (time_emb_proj_) {
    TORCH_CHECK(temb.defined(), "ResnetBlock2D: a time embedding is required");
    const auto t_in = options_.skip_time_act ? temb : torch::silu(temb);
    t = with_lora(*time_emb_proj_, t_in, time_emb_proj_(t_in));  // (B, C or 2C)
  }
  if (fused_epilogues(x) && !options_.scale_shift) {
    // The convolutions' biases ride on passes that happen anyway: conv1's joins the time
    // embedding the norm adds, conv2's and the shortcut's join the residual add (one pass
    // where torch makes four over h; docs/PERFORMANCE.md).
    auto h = conv_no_bias_lora(conv1_, group_norm_fused(norm1_, x, {}, /*silu=*/true));
    auto shift = t;
    if (conv1_->bias.defined()) {
      shift = t.defined() ? t + conv1_->bias
                          : conv1_->bias.unsqueeze(0).expand({x.size(0), -1}).contiguous();
    }
    h = conv_no_bias_lora(conv2_, group_norm_fused(norm2_, h, shift, /*silu=*/true));
    auto bias = conv2_->bias;
    torch::Tensor residual = x;
    if (conv_shortcut_) {
      residual = conv_no_bias_lora(conv_shortcut_, x);
      if (conv_shortcut_->bias.defined()) {
        bias = bias.defined() ? bias + conv_shortcut_->bias : conv_shortcut_->bias;
      }
    }
    return add_bias_residual_(h, bias, residual, 1.0 / options_.output_scale_factor);
  }
  auto h = conv_forward_lora(conv1_, group_norm_fused(norm1_, x, {}, /*silu=*/true));
  if (t.defined() && options_.scale_shift) {
    auto scale_shift = t.unsqueeze(-1).unsqueeze(-1).chunk(2, 1);
    h = silu_inplace(group_norm_forward(norm2_, h).mul_(scale_shift[0] + 1).add_(scale_shift[1]));
  } else {
    // The time embedding is added before the norm; the fused kernel folds it into the norm.
    h = group_norm_fused(norm2_, h, t, /*silu=*/true);
  }
  h = conv_forward_lora(conv2_, h);
  h.add_(conv_shortcut_ ? conv_forward_lora(conv_shortcut_, x) : x);
  if (options_.output_scale_factor != 1.0) h.div_(options_.output_scale_factor);
  return h;
}

// ---------------------------------------------------------------------------------------------
Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding)
    : padding_(padding) {
  conv_ = register_module("conv", conv(channels, out_channels, 3, 2, padding));
}

torch::Tensor Downsample2DImpl::forward(const torch::Tensor& x) {
  // diffusers pads right/bottom only when the conv has no padding of its own (the VAE encoder).
  if (padding_ == 0) return conv_lora(conv_, F::pad(x, F::PadFuncOptions({0, 1, 0, 1})));
  return conv_lora(conv_, x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, int64_t out_channels) {
  conv_ = register_module("conv", conv(channels, out_channels, 3, 1, 1));
}

torch::Tensor Upsample2DImpl::forward(const torch::Tensor& x, const std::vector<int64_t>& size) {
  auto options = F::InterpolateFuncOptions().mode(torch::kNearest);
  if (size.empty()) {
    options.scale_factor(std::vector<double>{2.0, 2.0});
  } else {
    options.size(size);
  }
#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 1)
  // Nearest upsampling has no bfloat16 kernel before torch 2.1 (diffusers casts the same way).
  if (x.scalar_type() == torch::kBFloat16) {
    return conv_lora(conv_, F::interpolate(x.to(torch::kFloat32), options).to(torch::kBFloat16));
  }
#endif
  return conv_lora(conv_, F::interpolate(x, options));
}

// ---------------------------------------------------------------------------------------------
AttentionImpl::AttentionImpl(const AttentionOptions& options) : options_(options) {
  const int64_t inner = options.heads * options.dim_head;
  const int64_t context_dim = options.context_dim > 0 ? options.context_dim : options.query_dim;
  if (options.norm_groups > 0) {
    group_norm_ = register_module(
        "group_norm", group_norm(options.norm_groups, options.query_dim, options.norm_eps));
  }
  to_q_ = register_module("to_q", linear(options.query_dim, inner, options.bias));
  to_k_ = register_module("to_k", linear(context_dim, inner, options.bias));
  to_v_ = register_module("to_v", linear(context_dim, inner, options.bias));
  out_proj_ = linear(inner, options.query_dim, options.out_bias);
  to_out_->push_back(out_proj_);  // to_out.1 is a parameterless dropout in diffusers
  register_module("to_out", to_out_);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context,
                                     const torch::Tensor& residual) {
  const bool spatial = x.dim() == 4;
  TORCH_CHECK(!residual.defined() || (!spatial && !options_.residual),
              "Attention: a residual argument is for token inputs without a residual of their own");
  torch::Tensor tokens;  // (B, L, C)
  if (spatial) {
    auto h = group_norm_ ? group_norm_fused(group_norm_, x, {}, /*silu=*/false) : x;
    tokens = h.flatten(2).transpose(1, 2);
  } else {
    tokens = group_norm_ ? group_norm_(x.transpose(1, 2)).transpose(1, 2) : x;
  }
  const auto& kv_input = context.defined() ? context : tokens;
  torch::Tensor q, k, v;
  // Each projection's output passes through with_lora (the fused GEMMs' chunks too: adding to a
  // chunk writes into the fused output, which nothing else reads).
  if (qkv_weight_.defined() && !context.defined()) {
    auto qkv = torch::linear(tokens, qkv_weight_, qkv_bias_).chunk(3, -1);
    q = split_heads(with_lora(*to_q_, tokens, qkv[0]), options_.heads);
    k = split_heads(with_lora(*to_k_, tokens, qkv[1]), options_.heads);
    v = split_heads(with_lora(*to_v_, tokens, qkv[2]), options_.heads);
  } else if (kv_weight_.defined() && context.defined()) {
    q = split_heads(with_lora(*to_q_, tokens, to_q_(tokens)), options_.heads);
    auto kv = torch::linear(kv_input, kv_weight_, kv_bias_).chunk(2, -1);
    k = split_heads(with_lora(*to_k_, kv_input, kv[0]), options_.heads);
    v = split_heads(with_lora(*to_v_, kv_input, kv[1]), options_.heads);
  } else {
    q = split_heads(with_lora(*to_q_, tokens, to_q_(tokens)), options_.heads);
    k = split_heads(with_lora(*to_k_, kv_input, to_k_(kv_input)), options_.heads);
    v = split_heads(with_lora(*to_v_, kv_input, to_v_(kv_input)), options_.heads);
  }

  torch::Tensor out;
  const auto dtype = q.scalar_type();
  if (options_.upcast && !has_fused_attention() && dtype != torch::kFloat32) {
    // upcast_attention: the unfused path would form fp16 scores; the fused kernels
    // accumulate in float32 already, which is why diffusers' SDPA processor ignores the flag.
    out = attention(q.to(torch::kFloat32), k.to(torch::kFloat32), v.to(torch::kFloat32)).to(dtype);
  } else {
    out = attention(q, k, v);
  }
  // (B, heads, L, d) -> (B, L, heads * d)
  out = [&](torch::Tensor heads) {  // by value: the joined heads die with this statement
    return with_lora(*out_proj_, heads,
                     linear_fused(heads, out_proj_->weight, out_proj_->bias, residual));
  }(out.transpose(1, 2).reshape({tokens.size(0), tokens.size(1), -1}));

  if (spatial) out = out.transpose(1, 2).view(x.sizes());
  if (options_.residual) out = x + out;  // x first: the sum takes x's (contiguous) layout
  if (options_.rescale_output_factor != 1.0) out = out / options_.rescale_output_factor;
  return out;
}

void AttentionImpl::fuse_projections() {
  torch::NoGradGuard no_grad;
  std::vector<torch::nn::Linear> parts;
  if (options_.context_dim <= 0) {
    parts = {to_q_, to_k_, to_v_};
  } else {
    parts = {to_k_, to_v_};
  }
  std::vector<torch::Tensor> weights, biases;
  for (auto& p : parts) {
    weights.push_back(p->weight);
    if (p->bias.defined()) biases.push_back(p->bias);
  }
  auto weight = torch::cat(weights, 0);
  auto bias = biases.size() == parts.size() ? torch::cat(biases, 0) : torch::Tensor();
  // Point the separate weights into the fused tensor (no second copy in memory).
  int64_t row = 0;
  for (auto& p : parts) {
    const int64_t n = p->weight.size(0);
    p->weight.set_data(weight.narrow(0, row, n));
    if (bias.defined()) p->bias.set_data(bias.narrow(0, row, n));
    row += n;
  }
  if (options_.context_dim <= 0) {
    qkv_weight_ = weight;
    qkv_bias_ = bias;
  } else {
    kv_weight_ = weight;
    kv_bias_ = bias;
  }
}

// ---------------------------------------------------------------------------------------------
GEGLUImpl::GEGLUImpl(int64_t dim_in, int64_t dim_out) {
  proj_ = register_module("proj", linear(dim_in, 2 * dim_out, true));
}

torch::Tensor GEGLUImpl::forward(const torch::Tensor& x) {
  // The bias joins the GEGLU pass (torch adds it with a strided kernel at large row counts).
  if (fused_epilogues(x))
    return geglu_fused(with_lora(*proj_, x, torch::linear(x, proj_->weight)), proj_->bias);
  return geglu_fused(with_lora(*proj_, x, proj_(x)));
}

FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t mult) {
  const int64_t inner = dim * mult;
  geglu_ = GEGLU(dim, inner);
  out_ = linear(inner, dim, true);
  // net.0 = GEGLU, net.1 = dropout (no weights), net.2 = output projection.
  net_->push_back(geglu_);
  net_->push_back(torch::nn::Identity());
  net_->push_back(out_);
  register_module("net", net_);
}

torch::Tensor FeedForwardImpl::forward(const torch::Tensor& x, const torch::Tensor& residual) {
  const auto h = geglu_(x);
  return with_lora(*out_, h, linear_fused(h, out_->weight, out_->bias, residual));
}

// ---------------------------------------------------------------------------------------------
BasicTransformerBlockImpl::BasicTransformerBlockImpl(const TransformerBlockOptions& options)
    : only_cross_attention_(options.only_cross_attention) {
  auto layer_norm = [&](const char* name) {
    return register_module(name, torch::nn::LayerNorm(torch::nn::LayerNormOptions({options.dim})
                                                          .eps(options.norm_eps)
                                                          .elementwise_affine(true)));
  };
  AttentionOptions attn;
  attn.query_dim = options.dim;
  attn.heads = options.heads;
  attn.dim_head = options.dim_head;
  attn.upcast = options.upcast_attention;

  norm1_ = layer_norm("norm1");
  AttentionOptions attn1 = attn;
  if (options.only_cross_attention) attn1.context_dim = options.cross_attention_dim;
  attn1_ = register_module("attn1", Attention(attn1));
  if (options.cross_attention_dim > 0) {
    norm2_ = layer_norm("norm2");
    AttentionOptions attn2 = attn;
    attn2.context_dim = options.cross_attention_dim;
    attn2_ = register_module("attn2", Attention(attn2));
  }
  norm3_ = layer_norm("norm3");
  ff_ = register_module("ff", FeedForward(options.dim));
}

torch::Tensor BasicTransformerBlockImpl::forward(const torch::Tensor& x,
                                                 const torch::Tensor& context) {
  // Each sub-layer adds its residual in its output projection's epilogue.
  auto h =
      attn1_(layer_norm_fused(norm1_, x), only_cross_attention_ ? context : torch::Tensor(), x);
  if (attn2_) h = attn2_(layer_norm_fused(norm2_, h), context, h);
  return ff_(layer_norm_fused(norm3_, h), h);
}

// ---------------------------------------------------------------------------------------------
Transformer2DImpl::Transformer2DImpl(const Transformer2DOptions& options) : options_(options) {
  const int64_t channels = options.channels;
  const int64_t inner = options.heads * options.dim_head;
  norm_ = register_module("norm", group_norm(options.groups, channels, 1e-6));
  if (options.use_linear_projection) {
    proj_in_linear_ = register_module("proj_in", linear(channels, inner, true));
  } else {
    proj_in_conv_ = register_module("proj_in", conv(channels, inner, 1, 1, 0));
  }
  auto blocks = register_module("transformer_blocks", torch::nn::ModuleList());
  TransformerBlockOptions block;
  block.dim = inner;
  block.heads = options.heads;
  block.dim_head = options.dim_head;
  block.cross_attention_dim = options.cross_attention_dim;
  block.only_cross_attention = options.only_cross_attention;
  block.upcast_attention = options.upcast_attention;
  for (int64_t i = 0; i < options.layers; ++i) {
    blocks_.emplace_back(block);
    blocks->push_back(blocks_.back());
  }
  if (options.use_linear_projection) {
    proj_out_linear_ = register_module("proj_out", linear(inner, channels, true));
  } else {
    proj_out_conv_ = register_module("proj_out", conv(inner, channels, 1, 1, 0));
  }
}

torch::Tensor Transformer2DImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
  const auto b = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3);
  // NCHW -> (B, H*W, C): the one layout copy on the way in.
  auto h = group_norm_fused(norm_, x, {}, /*silu=*/false)
               .permute({0, 2, 3, 1})
               .reshape({b, height * width, c});
  // A 1x1 conv is a matmul over channels; applying it to the tokens avoids a second transpose.
  h = proj_in_linear_
          ? with_lora(*proj_in_linear_, h, proj_in_linear_(h))
          : with_lora(*proj_in_conv_, h,
                      torch::linear(h, proj_in_conv_->weight.flatten(1), proj_in_conv_->bias));
  for (auto& block : blocks_) h = block(h, context);
  const auto& w_out = proj_out_linear_ ? proj_out_linear_->weight : proj_out_conv_->weight;
  const auto& b_out = proj_out_linear_ ? proj_out_linear_->bias : proj_out_conv_->bias;
  const torch::nn::Module& proj_out = proj_out_linear_
                                          ? static_cast<const torch::nn::Module&>(*proj_out_linear_)
                                          : static_cast<const torch::nn::Module&>(*proj_out_conv_);
  if (fused_epilogues(x) && !x.is_contiguous() &&
      x.is_contiguous(torch::MemoryFormat::ChannelsLast)) {
    // Channels-last x is (B, H*W, C) in memory: the residual joins proj_out's epilogue.
    auto residual = x.permute({0, 2, 3, 1}).reshape({b, height * width, c});
    h = with_lora(proj_out, h, linear_fused(h, w_out.flatten(1), b_out, residual));
    return h.view({b, height, width, c}).permute({0, 3, 1, 2});
  }
  h = with_lora(proj_out, h, torch::linear(h, w_out.flatten(1), b_out));
  // Back to NCHW as a strided view; x first so the sum is written contiguously.
  return x + h.view({b, height, width, c}).permute({0, 3, 1, 2});
}

}  // namespace sdserve::pipeline
