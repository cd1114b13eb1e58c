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

// GEGLU on a projection (rows, 2 * inner), row-major, with the projection's bias (2 * inner
// values, or null) added first: with q = p + bias, y[r, i] = q[r, i] * gelu(q[r, inner + i]),
// the exact (erf) GELU, computed in float32; y is (rows, inner).
int geglu(const void* p, const void* bias, void* y, DType dtype, int64_t rows, int64_t inner,
          void* stream);

// LayerNorm over the last dim of x (rows, c), row-major, with gamma and beta (c values, x's
// dtype), statistics in float32 (mean, then the variance about it, from registers), as torch's
// layer_norm. One warp per row: torch's kernel gives each 320-640 wide row a whole block and
// runs at ~1/4 of memory bandwidth on the UNet's token rows. layer_norm_supported says which
// widths it takes (c a multiple of 16 bytes, up to 2048 fp16/bf16 or 1024 fp32 values).
bool layer_norm_supported(DType dtype, int64_t c);
int layer_norm(const void* x, void* y, const void* gamma, const void* beta, DType dtype,
               int64_t rows, int64_t c, double eps, void* stream);

// A convolution's or linear layer's epilogue, in place: y = (y + bias[c] + residual) * scale
// for y (n, c, hw) in NCHW (`channels_last` false) or NHWC memory (a linear layer's (rows, c)
// output is NHWC with n = 1, hw = rows), computed in float32 and rounded once. `bias`
// (c values, y's dtype) and `residual` (y's shape, dtype and layout) are optional. torch adds
// a cuDNN convolution's bias (and a large GEMM's) as a separate broadcast add that cannot use
// vector loads; this takes the bias, the residual and an output scale in the same pass.
struct BiasResidualArgs {
  void* y = nullptr;
  const void* bias = nullptr;
  const void* residual = nullptr;
  DType dtype = DType::kFloat32;
  int64_t n = 0, c = 0, hw = 0;
  bool channels_last = false;
  float scale = 1.0f;
};
int bias_residual(const BiasResidualArgs& args, void* stream);

}  // namespace sdserve::pipeline::kernels
