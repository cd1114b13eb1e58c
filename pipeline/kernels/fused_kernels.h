// Fused CUDA kernels for the memory-bound chains of the UNet and the VAE (docs/PERFORMANCE.md,
// issue #8). Built by nvcc only when CMake finds a CUDA toolkit beside a CUDA libtorch; the
// torch code in pipeline/nn/fused.cpp calls them and keeps torch's ops as the fallback.
//
// This header has no torch and no CUDA headers: pointers are raw device pointers, the stream
// is a cudaStream_t passed as void*. Each function returns 0 or a CUDA error code.
#pragma once

#include <cstdint>

namespace sdserve::pipeline::kernels {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Group normalisation of x (n, c, h, w) in NCHW (`channels_last` false) or NHWC memory, with
// statistics in float32 (Welford per thread, Chan merges), as torch's GroupNorm:
//   x' = x + bias[n, c]                  (bias: optional, n x c, same dtype as x; a broadcast
//                                          time embedding added before the norm)
//   y  = (x' - mean[n, g]) * rstd[n, g] * gamma[c] + beta[c]   (gamma, beta optional)
//   y  = silu(y)                          when `silu`
// `workspace` holds group_norm_workspace_floats(...) floats of device memory.
struct GroupNormArgs {
  const void* x = nullptr;
  void* y = nullptr;
  const void* bias = nullptr;
  const void* gamma = nullptr;
  const void* beta = nullptr;
  float* workspace = nullptr;
  DType dtype = DType::kFloat32;
  int64_t n = 0, c = 0, hw = 0, groups = 1;
  double eps = 1e-5;
  bool channels_last = false;
  bool silu = false;
};
int64_t group_norm_workspace_floats(const GroupNormArgs& args);
int group_norm(const GroupNormArgs& args, void* stream);

// GEGLU on a projection (rows, 2 * inner), row-major: y[r, i] = p[r, i] * gelu(p[r, inner + i])
// with the exact (erf) GELU, computed in float32; y is (rows, inner).
int geglu(const void* p, void* y, DType dtype, int64_t rows, int64_t inner, void* stream);

}  // namespace sdserve::pipeline::kernels
