#include "pipeline/nn/unet_blocks.h"

namespace sdserve::pipeline {
namespace {

ResnetBlock2D make_resnet(int64_t in, int64_t out, const ResnetSettings& s) {
  ResnetBlock2DOptions o;
  o.in_channels = in;
  o.out_channels = out;
  o.temb_channels = s.temb_channels;
  o.groups = s.groups;
  o.eps = s.eps;
  o.output_scale_factor = s.output_scale_factor;
  o.scale_shift = s.scale_shift;
  o.skip_time_act = s.skip_time_act;
  return ResnetBlock2D(o);
}

// diffusers gives each transformer `heads` heads of channels / heads dims.
Transformer2D make_transformer(int64_t channels, int64_t groups, const CrossAttentionSettings& s) {
  Transformer2DOptions o;
  o.channels = channels;
  o.heads = s.heads;
  o.dim_head = channels / s.heads;
  o.layers = s.layers;
  o.cross_attention_dim = s.cross_attention_dim;
  o.groups = groups;
  o.use_linear_projection = s.use_linear_projection;
  o.only_cross_attention = s.only_cross_attention;
  o.upcast_attention = s.upcast_attention;
  return Transformer2D(o);
}

// Registers `modules` as a ModuleList under `name` so their parameters get "name.i." prefixes.
template <typename Holder>
void register_list(torch::nn::Module& parent, const std::string& name,
                   const std::vector<Holder>& modules) {
  torch::nn::ModuleList list;
  for (const auto& m : modules) list->push_back(m);
  parent.register_module(name, list);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
DownBlockImpl::DownBlockImpl(const DownBlockOptions& options) {
  for (int64_t i = 0; i < options.layers; ++i) {
    const int64_t in = i == 0 ? options.in_channels : options.out_channels;
    resnets_.push_back(make_resnet(in, options.out_channels, options.resnet));
    if (options.attention.heads > 0) {
      attentions_.push_back(
          make_transformer(options.out_channels, options.resnet.groups, options.attention));
    }
  }
  if (!attentions_.empty()) register_list(*this, "attentions", attentions_);
  register_list(*this, "resnets", resnets_);
  if (options.add_downsample) {
    downsampler_ =
        Downsample2D(options.out_channels, options.out_channels, options.downsample_padding);
    register_list(*this, "downsamplers", std::vector<Downsample2D>{downsampler_});
  }
}

torch::Tensor DownBlockImpl::forward(torch::Tensor x, const torch::Tensor& temb,
                                     const torch::Tensor& context,
                                     std::vector<torch::Tensor>* skips) {
  for (size_t i = 0; i < resnets_.size(); ++i) {
    x = resnets_[i](x, temb);
    if (!attentions_.empty()) x = attentions_[i](x, context);
    if (skips) skips->push_back(x);
  }
  if (downsampler_) {
    x = downsampler_(x);
    if (skips) skips->push_back(x);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
UpBlockImpl::UpBlockImpl(const UpBlockOptions& options)
    : skip_connections_(options.skip_connections) {
  const int64_t out = options.out_channels;
  for (int64_t i = 0; i < options.layers; ++i) {
    int64_t in;
    if (options.skip_connections) {
      // Resnet i consumes the block input (or the previous resnet's output) concatenated with
      // a skip; the last skip comes from the shallower down block, hence in_channels.
      const int64_t skip = i == options.layers - 1 ? options.in_channels : out;
      in = (i == 0 ? options.prev_output_channels : out) + skip;
    } else {
      in = i == 0 ? options.prev_output_channels : out;
    }
    resnets_.push_back(make_resnet(in, out, options.resnet));
    if (options.attention.heads > 0) {
      attentions_.push_back(make_transformer(out, options.resnet.groups, options.attention));
    }
  }
  if (!attentions_.empty()) register_list(*this, "attentions", attentions_);
  register_list(*this, "resnets", resnets_);
  if (options.add_upsample) {
    upsampler_ = Upsample2D(out, out);
    register_list(*this, "upsamplers", std::vector<Upsample2D>{upsampler_});
  }
}

torch::Tensor UpBlockImpl::forward(torch::Tensor x, const torch::Tensor& temb,
                                   const torch::Tensor& context, std::vector<torch::Tensor>* skips,
                                   const std::vector<int64_t>& upsample_size) {
  for (size_t i = 0; i < resnets_.size(); ++i) {
    if (skip_connections_) {
      TORCH_CHECK(skips && !skips->empty(), "UpBlock: ran out of skip connections");
      x = torch::cat({x, skips->back()}, 1);
      skips->pop_back();
    }
    x = resnets_[i](x, temb);
    if (!attentions_.empty()) x = attentions_[i](x, context);
  }
  if (upsampler_) x = upsampler_(x, upsample_size);
  return x;
}

// ---------------------------------------------------------------------------------------------
MidBlockCrossAttnImpl::MidBlockCrossAttnImpl(const MidBlockOptions& options) {
  const int64_t c = options.channels;
  resnets_.push_back(make_resnet(c, c, options.resnet));
  for (int64_t i = 0; i < options.layers; ++i) {
    attentions_.push_back(make_transformer(c, options.resnet.groups, options.attention));
    resnets_.push_back(make_resnet(c, c, options.resnet));
  }
  register_list(*this, "attentions", attentions_);
  register_list(*this, "resnets", resnets_);
}

torch::Tensor MidBlockCrossAttnImpl::forward(torch::Tensor x, const torch::Tensor& temb,
                                             const torch::Tensor& context) {
  x = resnets_[0](x, temb);
  for (size_t i = 0; i < attentions_.size(); ++i) {
    x = attentions_[i](x, context);
    x = resnets_[i + 1](x, temb);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
MidBlock2DImpl::MidBlock2DImpl(const MidBlockOptions& options) {
  const int64_t c = options.channels;
  resnets_.push_back(make_resnet(c, c, options.resnet));
  for (int64_t i = 0; i < options.layers; ++i) {
    if (options.attention.heads > 0) {
      AttentionOptions a;
      a.query_dim = c;
      a.heads = options.attention.heads;
      a.dim_head = c / options.attention.heads;
      a.bias = true;
      a.norm_groups = options.resnet.groups;
      a.norm_eps = options.resnet.eps;
      a.residual = true;
      a.rescale_output_factor = options.resnet.output_scale_factor;
      attentions_.emplace_back(a);
    }
    resnets_.push_back(make_resnet(c, c, options.resnet));
  }
  if (!attentions_.empty()) register_list(*this, "attentions", attentions_);
  register_list(*this, "resnets", resnets_);
}

torch::Tensor MidBlock2DImpl::forward(torch::Tensor x, const torch::Tensor& temb) {
  x = resnets_[0](x, temb);
  for (size_t i = 1; i < resnets_.size(); ++i) {
    if (!attentions_.empty()) x = attentions_[i - 1](x);
    x = resnets_[i](x, temb);
  }
  return x;
}

}  // namespace sdserve::pipeline
