// Fused forms of memory-bound chains, with torch's ops as the fallback (CPU builds, the CPU,
// dtypes or layouts the kernels do not take). On CUDA builds with the kernels
// (pipeline/kernels/, nvcc), CUDA tensors take one kernel pass where torch takes several.
// Results equal the fallback up to float32 rounding of the statistics and one less rounding
// to the tensor's dtype between fused steps (GPU tests in tests/fused_kernels_test.cpp).
#pragma once

#include <torch/torch.h>

namespace sdserve::pipeline {

// Whether this build has the CUDA kernels and they are not switched off (SDSERVE_FUSED_KERNELS=0
// in the environment, read once: an A/B switch for benchmarks).
bool fused_kernels_enabled();

// silu(norm(x + bias)) for x (N, C, H, W); `bias` (N, C) or undefined; SiLU only when `silu`.
// The fallback is exactly the unfused arithmetic: add, group_norm_forward, silu.
torch::Tensor group_norm_fused(torch::nn::GroupNorm norm, const torch::Tensor& x,
                               const torch::Tensor& bias, bool silu);

// value * gelu(gate) for a projection (..., 2 * inner) split in halves along the last dim, with
// the projection's bias (2 * inner) added first when defined.
torch::Tensor geglu_fused(const torch::Tensor& projected, const torch::Tensor& bias = {});

// norm(x) for a LayerNorm over the last dim: one warp per row on CUDA where the kernel takes the
// width; the module's forward otherwise.
torch::Tensor layer_norm_fused(torch::nn::LayerNorm norm, const torch::Tensor& x);

// Whether convolutions and linear layers on `x` take the fused epilogues below (a CUDA tensor,
// kernels built and on). Modules keep torch's exact arithmetic otherwise (the CPU, CI).
// SDSERVE_FUSED_EPILOGUES=0 switches these alone off (an A/B switch for benchmarks).
bool fused_epilogues(const torch::Tensor& x);

// conv(x) without its bias: for callers that fold the bias into a later fused pass.
torch::Tensor conv2d_no_bias(const torch::nn::Conv2d& conv, const torch::Tensor& x);

// y = (y + bias + residual) * scale in place; bias and residual optional. For 4-d y (N, C, H, W)
// the bias runs over dim 1, otherwise over the last dim (a linear layer's (..., C) output);
// residual has y's shape. One vectorised pass on CUDA; torch's ops otherwise.
torch::Tensor add_bias_residual_(torch::Tensor y, const torch::Tensor& bias,
                                 const torch::Tensor& residual, double scale = 1.0);

// conv(x), its bias added by the epilogue where fused_epilogues(x); conv->forward(x) otherwise.
torch::Tensor conv2d_fused(torch::nn::Conv2d conv, const torch::Tensor& x);

// linear(x, weight, bias) + residual (undefined: none). Where fused_epilogues(x), the GEMM runs
// without its bias and one pass adds bias and residual: cuBLAS takes the bias into the GEMM only
// below ~64k rows, and above that torch adds it with a strided broadcast kernel.
torch::Tensor linear_fused(const torch::Tensor& x, const torch::Tensor& weight,
                           const torch::Tensor& bias, const torch::Tensor& residual);

}  // namespace sdserve::pipeline
