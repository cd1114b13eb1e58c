// Fused kernels: group norm (+ broadcast add before it, + SiLU after it), GEGLU and the
// convolution epilogue (bias + residual). Memory-bound chains that torch runs as 2-8 kernels
// (docs/PERFORMANCE.md), here as one pass over the data plus, for the norm, one pass that reads
// it for the statistics.
#include "pipeline/kernels/fused_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace sdserve::pipeline::kernels {
namespace {

constexpr int kThreads = 256;
// Blocks to aim for in the statistics pass: a few per SM on an H100/H200 (132 SMs).
constexpr int64_t kTargetBlocks = 1024;

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) {
  return a < b ? a : b;
}
__device__ __forceinline__ float silu(float v) {
  return v / (1.0f + expf(-v));
}
__device__ __forceinline__ float gelu(float v) {
  return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

// 16 bytes of T, loaded and stored as one vector.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// How the statistics pass splits each sample's pixels.
struct Plan {
  int64_t chunks = 1, chunk_px = 1;
};

Plan plan_for(const GroupNormArgs& a) {
  const int64_t rows = a.channels_last ? a.n : a.n * a.c;  // blocks per chunk index
  int64_t chunks = (kTargetBlocks + rows - 1) / rows;
  // NCHW blocks stride over their pixels with kThreads threads: keep a chunk >= one stride.
  const int64_t max_chunks = a.channels_last ? a.hw : (a.hw + kThreads - 1) / kThreads;
  chunks = std::max<int64_t>(1, std::min(chunks, max_chunks));
  Plan p;
  p.chunk_px = (a.hw + chunks - 1) / chunks;
  p.chunks = (a.hw + p.chunk_px - 1) / p.chunk_px;  // no empty chunk at the end
  return p;
}

// Partial statistics per (sample, chunk, channel): mean and sum of squared deviations of the
// chunk's values, from sums shifted by the chunk's first value (no cancellation when the mean
// is large against the spread). Layout: partial[((n * chunks + s) * c + ch) * 2 + {0, 1}].
template <typename T>
__global__ void gn_stats_nhwc(const T* x, const T* bias, float* partial, int64_t c, int64_t hw,
                              int64_t chunks, int64_t chunk_px) {
  const int64_t n = blockIdx.y, s = blockIdx.x;
  const int64_t p0 = s * chunk_px, p1 = imin(hw, p0 + chunk_px);
  const T* xn = x + n * hw * c;
  const float count = static_cast<float>(p1 - p0);
  for (int64_t ch = threadIdx.x; ch < c; ch += blockDim.x) {
    const float b = bias ? to_float(bias[n * c + ch]) : 0.0f;
    const float pivot = to_float(xn[p0 * c + ch]) + b;
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll 4
    for (int64_t p = p0; p < p1; ++p) {
      const float d = to_float(xn[p * c + ch]) + b - pivot;
      s1 += d;
      s2 += d * d;
    }
    float* out = partial + ((n * chunks + s) * c + ch) * 2;
    out[0] = pivot + s1 / count;
    out[1] = fmaxf(s2 - s1 * s1 / count, 0.0f);
  }
}

template <typename T>
__global__ void gn_stats_nchw(const T* x, const T* bias, float* partial, int64_t c, int64_t hw,
                              int64_t chunks, int64_t chunk_px) {
  const int64_t n = blockIdx.z, ch = blockIdx.y, s = blockIdx.x;
  const int64_t p0 = s * chunk_px, p1 = imin(hw, p0 + chunk_px);
  const T* plane = x + (n * c + ch) * hw;
  const float b = bias ? to_float(bias[n * c + ch]) : 0.0f;
  const float pivot = to_float(plane[p0]) + b;
  float s1 = 0.0f, s2 = 0.0f;
  for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
    const float d = to_float(plane[p]) + b - pivot;
    s1 += d;
    s2 += d * d;
  }
  // All threads share the pivot, so the shifted sums simply add.
  __shared__ float sh1[kThreads], sh2[kThreads];
  sh1[threadIdx.x] = s1;
  sh2[threadIdx.x] = s2;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      sh1[threadIdx.x] += sh1[threadIdx.x + stride];
      sh2[threadIdx.x] += sh2[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float count = static_cast<float>(p1 - p0);
    float* out = partial + ((n * chunks + s) * c + ch) * 2;
    out[0] = pivot + sh1[0] / count;
    out[1] = fmaxf(sh2[0] - sh1[0] * sh1[0] / count, 0.0f);
  }
}

// Chan et al.'s merge of (count, mean, m2) summaries.
struct Moments {
  float count, mean, m2;  // no initialisers: an array of these lives in shared memory
};
__device__ __forceinline__ Moments merge(Moments a, const Moments& b) {
  if (b.count == 0.0f) return a;
  if (a.count == 0.0f) return b;
  const float count = a.count + b.count;
  const float delta = b.mean - a.mean;
  a.mean += delta * (b.count / count);
  a.m2 += b.m2 + delta * delta * (a.count * b.count / count);
  a.count = count;
  return a;
}

// One block per (group, sample): merges the group's partials and writes, per channel, the
// centre, scale and shift of normalising (the bias added before the norm folded into the centre).
// Layout: three planes of n * c floats (centre, scale, shift), so that the apply pass's threads
// read consecutive channels with coalesced vector loads.
template <typename T>
__global__ void gn_finalize(const float* partial, const T* bias, const T* gamma, const T* beta,
                            float* params, int64_t c, int64_t hw, int64_t groups, int64_t chunks,
                            int64_t chunk_px, float eps) {
  const int64_t g = blockIdx.x, n = blockIdx.y, cg = c / groups, nc = gridDim.y * c;
  Moments m{0.0f, 0.0f, 0.0f};
  for (int64_t k = threadIdx.x; k < chunks * cg; k += blockDim.x) {
    const int64_t s = k / cg, ch = g * cg + k % cg;
    const float* in = partial + ((n * chunks + s) * c + ch) * 2;
    const Moments part{static_cast<float>(imin(hw, (s + 1) * chunk_px) - s * chunk_px), in[0],
                       in[1]};
    m = merge(m, part);
  }
  __shared__ Moments shared[kThreads];
  shared[threadIdx.x] = m;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride)
      shared[threadIdx.x] = merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  const Moments total = shared[0];
  const float mean = total.mean;
  const float rstd = rsqrtf(total.m2 / total.count + eps);
  // y = (x + bias - mean) * rstd * gamma + beta, kept centred: folding the mean into a shift
  // (x * a + b) cancels catastrophically in float32 when |mean| * rstd is large.
  for (int64_t j = threadIdx.x; j < cg; j += blockDim.x) {
    const int64_t ch = g * cg + j;
    float* out = params + n * c + ch;
    out[0] = mean - (bias ? to_float(bias[n * c + ch]) : 0.0f);
    out[nc] = rstd * (gamma ? to_float(gamma[ch]) : 1.0f);
    out[2 * nc] = beta ? to_float(beta[ch]) : 0.0f;
  }
}

template <typename T, bool kChannelsLast, bool kSilu, bool kVector>
__global__ void gn_apply(const T* x, T* y, const float* params, int64_t total, int64_t c,
                         int64_t hw) {
  constexpr int V = kVector ? Vec<T>::kSize : 1;
  const int64_t vectors = total / V, nc = total / hw;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = i * V;
    const int64_t n = base / (hw * c);
    // NHWC: V consecutive channels of one pixel (c % V == 0); NCHW: V pixels of one channel.
    const int64_t ch0 = kChannelsLast ? base % c : (base / hw) % c;
    const float* p = params + n * c + ch0;
    Vec<T> in_vec, out_vec;  // aligned storage for the 16-byte moves
    T* in = in_vec.v;
    T* out = out_vec.v;
    float centre[V], scale[V], shift[V];
    if constexpr (kVector) {
      in_vec = reinterpret_cast<const Vec<T>*>(x)[i];
    } else {
      in[0] = x[base];
    }
    if constexpr (kChannelsLast && kVector) {
      // V consecutive floats per plane, 16-byte aligned (c % V == 0): whole-vector loads that
      // neighbouring threads' loads continue.
#pragma unroll
      for (int k = 0; k < V; k += 4) {
        *reinterpret_cast<float4*>(centre + k) = *reinterpret_cast<const float4*>(p + k);
        *reinterpret_cast<float4*>(scale + k) = *reinterpret_cast<const float4*>(p + nc + k);
        *reinterpret_cast<float4*>(shift + k) = *reinterpret_cast<const float4*>(p + 2 * nc + k);
      }
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t o = kChannelsLast ? k : 0;
        centre[k] = p[o];
        scale[k] = p[nc + o];
        shift[k] = p[2 * nc + o];
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float v = (to_float(in[k]) - centre[k]) * scale[k] + shift[k];
      if (kSilu) v = silu(v);
      out[k] = from_float<T>(v);
    }
    if constexpr (kVector) {
      reinterpret_cast<Vec<T>*>(y)[i] = out_vec;
    } else {
      y[base] = out[0];
    }
  }
}

int blocks_for(int64_t work) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 132 * 16)));
}

template <typename T>
int group_norm_typed(const GroupNormArgs& a, cudaStream_t stream) {
  const Plan p = plan_for(a);
  const T* x = static_cast<const T*>(a.x);
  const T* bias = static_cast<const T*>(a.bias);
  float* partial = a.workspace;
  float* params = partial + a.n * p.chunks * a.c * 2;
  if (a.channels_last) {
    gn_stats_nhwc<T><<<dim3(p.chunks, a.n), kThreads, 0, stream>>>(x, bias, partial, a.c, a.hw,
                                                                   p.chunks, p.chunk_px);
  } else {
    gn_stats_nchw<T><<<dim3(p.chunks, a.c, a.n), kThreads, 0, stream>>>(x, bias, partial, a.c, a.hw,
                                                                        p.chunks, p.chunk_px);
  }
  gn_finalize<T><<<dim3(a.groups, a.n), kThreads, 0, stream>>>(
      partial, bias, static_cast<const T*>(a.gamma), static_cast<const T*>(a.beta), params, a.c,
      a.hw, a.groups, p.chunks, p.chunk_px, static_cast<float>(a.eps));

  const int64_t total = a.n * a.c * a.hw;
  constexpr int V = Vec<T>::kSize;
  const bool vector = aligned16(a.x) && aligned16(a.y) && total % V == 0 &&
                      (a.channels_last ? a.c % V == 0 : a.hw % V == 0);
  T* y = static_cast<T*>(a.y);
  const int blocks = blocks_for(vector ? total / V : total);
  // One instantiation per (layout, activation, vector width).
#define SDSERVE_GN_APPLY(CL, SILU)                                                                 \
  if (vector) {                                                                                    \
    gn_apply<T, CL, SILU, true><<<blocks, kThreads, 0, stream>>>(x, y, params, total, a.c, a.hw);  \
  } else {                                                                                         \
    gn_apply<T, CL, SILU, false><<<blocks, kThreads, 0, stream>>>(x, y, params, total, a.c, a.hw); \
  }
  if (a.channels_last && a.silu) {
    SDSERVE_GN_APPLY(true, true)
  } else if (a.channels_last) {
    SDSERVE_GN_APPLY(true, false)
  } else if (a.silu) {
    SDSERVE_GN_APPLY(false, true)
  } else {
    SDSERVE_GN_APPLY(false, false)
  }
#undef SDSERVE_GN_APPLY
  return static_cast<int>(cudaGetLastError());
}

template <typename T, bool kVector>
__global__ void geglu_kernel(const T* p, const T* bias, T* y, int64_t rows, int64_t inner) {
  constexpr int V = kVector ? Vec<T>::kSize : 1;
  const int64_t vectors = rows * inner / V;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = i * V;
    const int64_t r = base / inner, col = base % inner;
    const T* value = p + r * 2 * inner + col;
    const T* gate = value + inner;
    Vec<T> a_vec, g_vec, out_vec;
    T* a = a_vec.v;
    T* g = g_vec.v;
    T* out = out_vec.v;
    if constexpr (kVector) {
      a_vec = *reinterpret_cast<const Vec<T>*>(value);
      g_vec = *reinterpret_cast<const Vec<T>*>(gate);
    } else {
      a[0] = value[0];
      g[0] = gate[0];
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float av = to_float(a[k]), gv = to_float(g[k]);
      if (bias) {
        av += to_float(bias[col + k]);
        gv += to_float(bias[inner + col + k]);
      }
      out[k] = from_float<T>(av * gelu(gv));
    }
    if constexpr (kVector) {
      reinterpret_cast<Vec<T>*>(y)[i] = out_vec;
    } else {
      y[base] = out[0];
    }
  }
}

template <typename T>
int geglu_typed(const void* p, const void* bias, void* y, int64_t rows, int64_t inner,
                cudaStream_t stream) {
  constexpr int V = Vec<T>::kSize;
  const bool vector = aligned16(p) && aligned16(y) && inner % V == 0;
  const int64_t work = rows * inner / (vector ? V : 1);
  auto launch = [&](auto kernel) {
    kernel<<<blocks_for(work), kThreads, 0, stream>>>(
        static_cast<const T*>(p), static_cast<const T*>(bias), static_cast<T*>(y), rows, inner);
  };
  vector ? launch(geglu_kernel<T, true>) : launch(geglu_kernel<T, false>);
  return static_cast<int>(cudaGetLastError());
}

// One warp per row: the row is held in registers (up to kMaxVectors 16-byte vectors per lane),
// so the mean and the variance about it are two exact passes over registers, not memory.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, int kMaxVectors>
__global__ void layer_norm_kernel(const T* x, T* y, const T* gamma, const T* beta, int64_t rows,
                                  int c, float eps) {
  constexpr int V = Vec<T>::kSize;
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int vectors = c / V;
  const Vec<T>* in = reinterpret_cast<const Vec<T>*>(x + row * c);
  Vec<T> cache[kMaxVectors];
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxVectors; ++j) {
    const int idx = lane + j * 32;
    if (idx < vectors) {
      cache[j] = in[idx];
#pragma unroll
      for (int k = 0; k < V; ++k) sum += to_float(cache[j].v[k]);
    }
  }
  const float mean = warp_sum(sum) / c;
  float squares = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxVectors; ++j) {
    if (lane + j * 32 < vectors) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d = to_float(cache[j].v[k]) - mean;
        squares += d * d;
      }
    }
  }
  const float rstd = rsqrtf(warp_sum(squares) / c + eps);
  Vec<T>* out = reinterpret_cast<Vec<T>*>(y + row * c);
  const Vec<T>* g = reinterpret_cast<const Vec<T>*>(gamma);
  const Vec<T>* b = reinterpret_cast<const Vec<T>*>(beta);
#pragma unroll
  for (int j = 0; j < kMaxVectors; ++j) {
    const int idx = lane + j * 32;
    if (idx < vectors) {
      Vec<T> o;
      const Vec<T> gv = g[idx], bv = b[idx];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        o.v[k] = from_float<T>((to_float(cache[j].v[k]) - mean) * rstd * to_float(gv.v[k]) +
                               to_float(bv.v[k]));
      }
      out[idx] = o;
    }
  }
}

constexpr int kLayerNormMaxVectors = 8;

template <typename T>
int layer_norm_typed(const void* x, void* y, const void* gamma, const void* beta, int64_t rows,
                     int64_t c, float eps, cudaStream_t stream) {
  constexpr int V = Vec<T>::kSize;
  if (c % V != 0 || c > 32 * V * kLayerNormMaxVectors || !aligned16(x) || !aligned16(y) ||
      !aligned16(gamma) || !aligned16(beta)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  constexpr int kRowsPerBlock = kThreads / 32;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  layer_norm_kernel<T, kLayerNormMaxVectors>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<T*>(y), static_cast<const T*>(gamma),
          static_cast<const T*>(beta), rows, static_cast<int>(c), eps);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, bool kChannelsLast, bool kVector>
__global__ void bias_residual_kernel(T* y, const T* bias, const T* residual, int64_t total,
                                     int64_t c, int64_t hw, float scale) {
  constexpr int V = kVector ? Vec<T>::kSize : 1;
  const int64_t vectors = total / V;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = i * V;
    // NHWC: V consecutive channels of one pixel (c % V == 0); NCHW: V pixels of one channel.
    const int64_t ch0 = kChannelsLast ? base % c : (base / hw) % c;
    Vec<T> y_vec, r_vec;
    T* yv = y_vec.v;
    T* rv = r_vec.v;
    if constexpr (kVector) {
      y_vec = reinterpret_cast<const Vec<T>*>(y)[i];
      if (residual) r_vec = reinterpret_cast<const Vec<T>*>(residual)[i];
    } else {
      yv[0] = y[base];
      if (residual) rv[0] = residual[base];
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float v = to_float(yv[k]);
      if (bias) v += to_float(bias[kChannelsLast ? ch0 + k : ch0]);
      if (residual) v += to_float(rv[k]);
      yv[k] = from_float<T>(v * scale);
    }
    if constexpr (kVector) {
      reinterpret_cast<Vec<T>*>(y)[i] = y_vec;
    } else {
      y[base] = yv[0];
    }
  }
}

template <typename T>
int bias_residual_typed(const BiasResidualArgs& a, cudaStream_t stream) {
  constexpr int V = Vec<T>::kSize;
  const int64_t total = a.n * a.c * a.hw;
  const bool vector = aligned16(a.y) && (!a.residual || aligned16(a.residual)) &&
                      (a.channels_last ? a.c % V == 0 : a.hw % V == 0);
  const int blocks = blocks_for(vector ? total / V : total);
  T* y = static_cast<T*>(a.y);
  const T* bias = static_cast<const T*>(a.bias);
  const T* residual = static_cast<const T*>(a.residual);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(y, bias, residual, total, a.c, a.hw, a.scale);
  };
  if (a.channels_last) {
    vector ? launch(bias_residual_kernel<T, true, true>)
           : launch(bias_residual_kernel<T, true, false>);
  } else {
    vector ? launch(bias_residual_kernel<T, false, true>)
           : launch(bias_residual_kernel<T, false, false>);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t group_norm_workspace_floats(const GroupNormArgs& args) {
  const Plan p = plan_for(args);
  return args.n * p.chunks * args.c * 2 + args.n * args.c * 3;
}

int group_norm(const GroupNormArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32:
      return group_norm_typed<float>(args, s);
    case DType::kFloat16:
      return group_norm_typed<__half>(args, s);
    case DType::kBFloat16:
      return group_norm_typed<__nv_bfloat16>(args, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int geglu(const void* p, const void* bias, void* y, DType dtype, int64_t rows, int64_t inner,
          void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return geglu_typed<float>(p, bias, y, rows, inner, s);
    case DType::kFloat16:
      return geglu_typed<__half>(p, bias, y, rows, inner, s);
    case DType::kBFloat16:
      return geglu_typed<__nv_bfloat16>(p, bias, y, rows, inner, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int bias_residual(const BiasResidualArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32:
      return bias_residual_typed<float>(args, s);
    case DType::kFloat16:
      return bias_residual_typed<__half>(args, s);
    case DType::kBFloat16:
      return bias_residual_typed<__nv_bfloat16>(args, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

bool layer_norm_supported(DType dtype, int64_t c) {
  const int64_t v = dtype == DType::kFloat32 ? 4 : 8;
  return c % v == 0 && c <= 32 * v * kLayerNormMaxVectors;
}

int layer_norm(const void* x, void* y, const void* gamma, const void* beta, DType dtype,
               int64_t rows, int64_t c, double eps, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const auto e = static_cast<float>(eps);
  switch (dtype) {
    case DType::kFloat32:
      return layer_norm_typed<float>(x, y, gamma, beta, rows, c, e, s);
    case DType::kFloat16:
      return layer_norm_typed<__half>(x, y, gamma, beta, rows, c, e, s);
    case DType::kBFloat16:
      return layer_norm_typed<__nv_bfloat16>(x, y, gamma, beta, rows, c, e, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace sdserve::pipeline::kernels
