#include "pipeline/nn/fused.h"

#include <cstdlib>
#include <cstring>

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

torch::Tensor geglu_fused(const torch::Tensor& projected) {
#ifdef SDSERVE_WITH_CUDA_KERNELS
  kernels::DType dtype;
  if (fused_kernels_enabled() && projected.is_cuda() && projected.is_contiguous() &&
      kernel_dtype(projected.scalar_type(), &dtype) && projected.numel() > 0) {
    const int64_t inner = projected.size(-1) / 2;
    auto sizes = projected.sizes().vec();
    sizes.back() = inner;
    auto y = torch::empty(sizes, projected.options());
    check(kernels::geglu(projected.data_ptr(), y.data_ptr(), dtype, projected.numel() / (2 * inner),
                         inner, current_stream(projected)),
          "geglu_fused");
    return y;
  }
#endif
  auto parts = projected.chunk(2, -1);
  return parts[0] * torch::gelu(parts[1]);
}

}  // namespace sdserve::pipeline
