#include "pipeline/nn/fused.h"
#include "pipeline/nn/options.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <variant>

#include "pipeline/nn/blocks.h"

#ifdef SDSERVE_WITH_CUDA_KERNELS
#include <c10/cuda/CUDAStream.h>

#include "pipeline/kernels/fused_kernels.h"
#endif

namespace sdserve::pipeline {
namespace {

#ifdef SDSERVE_WITH_CUDA_KERNELS
bool kernel_dtype(torch::ScalarType t, kernels::DType* out) {
  switch (t) {
    case torch::kFloat32:
      *out = kernels::DType::kFloat32;
      return true;
    case torch::kFloat16:
      *out = kernels::DType::kFloat16;
      return true;
    case torch::kBFloat16:
      *out = kernels::DType::kBFloat16;
      return true;
    default:
      return false;
  }
}

void check(int error, const char* what) {
  TORCH_CHECK(error == 0, what, ": CUDA error ", error);
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

void* current_stream(const torch::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

}  // namespace

bool fused_kernels_enabled() {
#ifdef SDSERVE_WITH_CUDA_KERNELS
  static const bool enabled = [] {
    const char* v = std::getenv("SDSERVE_FUSED_KERNELS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
#else
  return false;
#endif
}

torch::Tensor group_norm_fused(torch::nn::GroupNorm norm, const torch::Tensor& x,
                               const torch::Tensor& bias, bool silu) {
#ifdef SDSERVE_WITH_CUDA_KERNELS
  kernels::DType dtype;
  const bool channels_last =
      x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(torch::MemoryFormat::ChannelsLast);
  const auto& o = norm->options;
  if (fused_kernels_enabled() && x.is_cuda() && x.dim() == 4 &&
      kernel_dtype(x.scalar_type(), &dtype) && (x.is_contiguous() || channels_last) &&
      (!bias.defined() || (bias.scalar_type() == x.scalar_type() && bias.is_contiguous() &&
                           bias.numel() == x.size(0) * x.size(1))) &&
      (!o.affine() || norm->weight.scalar_type() == x.scalar_type()) && x.numel() > 0) {
    auto y = torch::empty_like(
        x, channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous);
    kernels::GroupNormArgs a;
    a.x = x.data_ptr();
    a.y = y.data_ptr();
    a.bias = bias.defined() ? bias.data_ptr() : nullptr;
    a.gamma = o.affine() ? norm->weight.data_ptr() : nullptr;
    a.beta = o.affine() ? norm->bias.data_ptr() : nullptr;
    a.dtype = dtype;
    a.n = x.size(0);
    a.c = x.size(1);
    a.hw = x.size(2) * x.size(3);
    a.groups = o.num_groups();
    a.eps = o.eps();
    a.channels_last = channels_last;
    a.silu = silu;
    auto workspace =
        torch::empty({kernels::group_norm_workspace_floats(a)}, x.options().dtype(torch::kFloat32));
    a.workspace = workspace.data_ptr<float>();
    check(kernels::group_norm(a, current_stream(x)), "group_norm_fused");
    return y;
  }
#endif
  auto h = bias.defined() ? x + bias.view({x.size(0), x.size(1), 1, 1}) : x;
  h = group_norm_forward(norm, h);
  return silu ? silu_inplace(h) : h;
}

torch::Tensor geglu_fused(const torch::Tensor& projected, const torch::Tensor& bias) {
#ifdef SDSERVE_WITH_CUDA_KERNELS
  kernels::DType dtype;
  if (fused_kernels_enabled() && projected.is_cuda() && projected.is_contiguous() &&
      kernel_dtype(projected.scalar_type(), &dtype) && projected.numel() > 0 &&
      (!bias.defined() || (bias.scalar_type() == projected.scalar_type() && bias.is_contiguous() &&
                           bias.numel() == projected.size(-1)))) {
    const int64_t inner = projected.size(-1) / 2;
    auto sizes = projected.sizes().vec();
    sizes.back() = inner;
    auto y = torch::empty(sizes, projected.options());
    check(kernels::geglu(projected.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr,
                         y.data_ptr(), dtype, projected.numel() / (2 * inner), inner,
                         current_stream(projected)),
          "geglu_fused");
    return y;
  }
#endif
  auto parts = (bias.defined() ? projected + bias : projected).chunk(2, -1);
  return parts[0] * torch::gelu(parts[1]);
}

torch::Tensor layer_norm_fused(torch::nn::LayerNorm norm, const torch::Tensor& x) {
#ifdef SDSERVE_WITH_CUDA_KERNELS
  kernels::DType dtype;
  const auto& o = norm->options;
  if (fused_kernels_enabled() && x.is_cuda() && x.is_contiguous() && x.dim() >= 1 &&
      o.normalized_shape().size() == 1 && o.elementwise_affine() &&
      kernel_dtype(x.scalar_type(), &dtype) && norm->weight.scalar_type() == x.scalar_type() &&
      norm->bias.defined() && norm->bias.scalar_type() == x.scalar_type() &&
      norm->weight.is_contiguous() && norm->bias.is_contiguous() && x.numel() > 0 &&
      kernels::layer_norm_supported(dtype, x.size(-1)) && aligned16(x.data_ptr()) &&
      aligned16(norm->weight.data_ptr()) && aligned16(norm->bias.data_ptr())) {
    auto y = torch::empty_like(x);
    const int64_t c = x.size(-1);
    check(kernels::layer_norm(x.data_ptr(), y.data_ptr(), norm->weight.data_ptr(),
                              norm->bias.data_ptr(), dtype, x.numel() / c, c, o.eps(),
                              current_stream(x)),
          "layer_norm_fused");
    return y;
  }
#endif
  return norm->forward(x);
}

bool fused_epilogues(const torch::Tensor& x) {
  static const bool enabled = [] {
    const char* v = std::getenv("SDSERVE_FUSED_EPILOGUES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled && fused_kernels_enabled() && x.is_cuda();
}

torch::Tensor conv2d_no_bias(const torch::nn::Conv2d& conv, const torch::Tensor& x) {
  const auto& o = conv->options;
  const auto* padding = variant_get_if<torch::ExpandingArray<2>>(o.padding());
  TORCH_CHECK(padding != nullptr && variant_get_if<torch::enumtype::kZeros>(o.padding_mode()),
              "conv2d_no_bias: only zero padding by size is used by the models");
  return torch::conv2d(x, conv->weight, {}, o.stride(), *padding, o.dilation(), o.groups());
}

torch::Tensor add_bias_residual_(torch::Tensor y, const torch::Tensor& bias,
                                 const torch::Tensor& residual, double scale) {
  const bool image = y.dim() == 4;  // bias over dim 1; otherwise over the last dim
#ifdef SDSERVE_WITH_CUDA_KERNELS
  kernels::DType dtype;
  const bool channels_last =
      image && !y.is_contiguous() && y.is_contiguous(torch::MemoryFormat::ChannelsLast);
  const int64_t c = image ? y.size(1) : y.dim() > 0 ? y.size(-1) : 0;
  if (fused_kernels_enabled() && y.is_cuda() && y.dim() >= 2 &&
      kernel_dtype(y.scalar_type(), &dtype) && (y.is_contiguous() || channels_last) &&
      (!bias.defined() ||
       (bias.scalar_type() == y.scalar_type() && bias.is_contiguous() && bias.numel() == c)) &&
      (!residual.defined() ||
       (residual.scalar_type() == y.scalar_type() && residual.sizes() == y.sizes() &&
        residual.strides() == y.strides())) &&
      y.numel() > 0) {
    kernels::BiasResidualArgs a;
    a.y = y.data_ptr();
    a.bias = bias.defined() ? bias.data_ptr() : nullptr;
    a.residual = residual.defined() ? residual.data_ptr() : nullptr;
    a.dtype = dtype;
    a.c = c;
    if (image) {
      a.n = y.size(0);
      a.hw = y.size(2) * y.size(3);
      a.channels_last = channels_last;
    } else {  // (rows, c) row-major is NHWC with one sample
      a.n = 1;
      a.hw = y.numel() / c;
      a.channels_last = true;
    }
    a.scale = static_cast<float>(scale);
    check(kernels::bias_residual(a, current_stream(y)), "add_bias_residual_");
    return y;
  }
#endif
  if (bias.defined()) y.add_(image ? bias.view({1, -1, 1, 1}) : bias);
  if (residual.defined()) y.add_(residual);
  if (scale != 1.0) y.mul_(scale);
  return y;
}

torch::Tensor conv2d_fused(torch::nn::Conv2d conv, const torch::Tensor& x) {
  if (!fused_epilogues(x)) return conv->forward(x);
  return add_bias_residual_(conv2d_no_bias(conv, x), conv->bias, {});
}

torch::Tensor linear_fused(const torch::Tensor& x, const torch::Tensor& weight,
                           const torch::Tensor& bias, const torch::Tensor& residual) {
  if (!fused_epilogues(x)) {
    auto y = torch::linear(x, weight, bias);
    return residual.defined() ? y.add_(residual) : y;
  }
  return add_bias_residual_(torch::linear(x, weight), bias, residual);
}

}  // namespace sdserve::pipeline
