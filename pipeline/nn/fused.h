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

// value * gelu(gate) for a projection (..., 2 * inner) split in halves along the last dim.
torch::Tensor geglu_fused(const torch::Tensor& projected);

}  // namespace sdserve::pipeline
