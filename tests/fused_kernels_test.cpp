// The fused group norm, GEGLU and convolution epilogue (pipeline/nn/fused.h). On the CPU (and in
// CI) their fallback must be exactly the unfused arithmetic; the *Cuda* tests check the CUDA
// kernels against a float64 reference computed by torch on the CPU from the same inputs, and skip
// without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>

#include "pipeline/nn/blocks.h"
#include "pipeline/nn/fused.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

torch::nn::GroupNorm make_norm(int64_t groups, int64_t channels, double eps) {
  torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(groups, channels).eps(eps));
  torch::NoGradGuard no_grad;
  norm->weight.uniform_(0.5, 1.5);
  norm->bias.uniform_(-0.5, 0.5);
  return norm;
}

// silu(group_norm(x + bias)) in float64 on the CPU: the reference.
torch::Tensor reference_norm(const torch::nn::GroupNorm& norm, const torch::Tensor& x,
                             const torch::Tensor& bias, bool silu) {
  auto xd = x.cpu().to(torch::kFloat64).contiguous();
  if (bias.defined()) xd = xd + bias.cpu().to(torch::kFloat64).view({x.size(0), x.size(1), 1, 1});
  const auto& o = norm->options;
  auto y = torch::group_norm(xd, o.num_groups(), norm->weight.cpu().to(torch::kFloat64),
                             norm->bias.cpu().to(torch::kFloat64), o.eps());
  return silu ? torch::silu(y) : y;
}

torch::Tensor reference_geglu(const torch::Tensor& p) {
  auto parts = p.cpu().to(torch::kFloat64).chunk(2, -1);
  return parts[0] * 0.5 * parts[1] * (1 + torch::erf(parts[1] / std::sqrt(2.0)));
}

TEST(FusedFallback, GroupNormIsTheUnfusedArithmetic) {
  torch::manual_seed(3);
  torch::NoGradGuard no_grad;
  auto norm = make_norm(4, 16, 1e-6);
  for (bool channels_last : {false, true}) {
    auto x = torch::randn({2, 16, 5, 6}) * 2 + 0.5;
    if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
    auto t = torch::randn({2, 16});
    for (bool silu : {false, true}) {
      for (bool with_bias : {false, true}) {
        const auto bias = with_bias ? t : torch::Tensor();
        auto want = group_norm_forward(norm, with_bias ? x + t.view({2, 16, 1, 1}) : x);
        if (silu) want = torch::silu(want);
        const auto got = group_norm_fused(norm, x, bias, silu);
        EXPECT_TRUE(torch::equal(got, want)) << "silu " << silu << " bias " << with_bias;
        EXPECT_LE(test::max_abs_diff(got, reference_norm(norm, x, bias, silu)), 1e-5);
      }
    }
  }
}

TEST(FusedFallback, GegluIsValueTimesGeluOfGate) {
  torch::manual_seed(4);
  auto p = torch::randn({2, 7, 24}) * 2;
  const auto got = geglu_fused(p);
  EXPECT_EQ(got.sizes(), (std::vector<int64_t>{2, 7, 12}));
  auto parts = p.chunk(2, -1);
  EXPECT_TRUE(torch::equal(got, parts[0] * torch::gelu(parts[1])));
  EXPECT_LE(test::max_abs_diff(got, reference_geglu(p)), 1e-5);
}

TEST(FusedFallback, BiasResidualIsTheUnfusedArithmetic) {
  torch::manual_seed(7);
  auto y = torch::randn({2, 6, 3, 5});
  auto bias = torch::randn({6});
  auto residual = torch::randn({2, 6, 3, 5});
  const auto want = (y + bias.view({1, 6, 1, 1}) + residual) * 0.5;
  const auto got = add_bias_residual_(y.clone(), bias, residual, 0.5);
  EXPECT_TRUE(torch::equal(got, want));
  EXPECT_TRUE(torch::equal(add_bias_residual_(y.clone(), {}, {}), y));
}

TEST(FusedFallback, ConvAndLinearAreTheModulesOffCuda) {
  torch::manual_seed(8);
  torch::NoGradGuard no_grad;
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(4, 6, 3).stride(2).padding(1));
  auto x = torch::randn({2, 4, 9, 7});
  EXPECT_TRUE(torch::equal(conv2d_fused(conv, x), conv(x)));
  // Without the bias, then with it added back: torch's own arithmetic, so equal up to the one
  // rounding of the bias add that the module fuses into its convolution (float32 epsilon).
  auto no_bias = conv2d_no_bias(conv, x);
  EXPECT_LE(test::max_abs_diff(add_bias_residual_(no_bias, conv->bias, {}), conv(x)), 1e-5);
}

TEST(FusedFallback, LinearAndGegluBiasAreTheUnfusedArithmetic) {
  torch::manual_seed(11);
  auto x = torch::randn({2, 5, 8});
  auto w = torch::randn({6, 8});
  auto b = torch::randn({6});
  auto r = torch::randn({2, 5, 6});
  EXPECT_TRUE(torch::equal(linear_fused(x, w, b, r), torch::linear(x, w, b) + r));
  EXPECT_TRUE(torch::equal(linear_fused(x, w, b, {}), torch::linear(x, w, b)));
  auto p = torch::randn({3, 10});
  auto pb = torch::randn({10});
  auto parts = (p + pb).chunk(2, -1);
  EXPECT_TRUE(torch::equal(geglu_fused(p, pb), parts[0] * torch::gelu(parts[1])));
  auto y = torch::randn({4, 6});
  EXPECT_TRUE(torch::equal(add_bias_residual_(y.clone(), b, {}), y + b));
}

TEST(FusedFallback, LayerNormIsTheModule) {
  torch::manual_seed(14);
  torch::nn::LayerNorm norm(torch::nn::LayerNormOptions({16}).eps(1e-5));
  auto x = torch::randn({3, 4, 16});
  EXPECT_TRUE(torch::equal(layer_norm_fused(norm, x), norm(x)));
}

// Tolerances against the float64 reference, relative to the output's scale: the result is
// rounded once to the dtype (half an ulp: 2^-11 fp16, 2^-8 bf16, 2^-24 fp32), after float32
// statistics over up to ~10^5 values (~1e-6 relative); x2-4 margin for SiLU and GELU's float
// math. max |diff| / max(1, max |ref|).
double tolerance(torch::ScalarType t) {
  return t == torch::kFloat16 ? 2e-3 : t == torch::kBFloat16 ? 1.6e-2 : 2e-5;
}

// Float32 statistics carry half an ulp of the group mean, which normalising multiplies by
// rstd * gamma: a group whose values nearly coincide (rstd up to 1/sqrt(eps)) with a mean far
// from 0 makes that the dominant error, for torch's kernel as for ours. This is that term with
// a 4x margin: 4 * 2^-24 * max |mean| * rstd * |gamma| over the groups.
double statistics_error(const torch::nn::GroupNorm& norm, const torch::Tensor& x,
                        const torch::Tensor& bias) {
  auto xd = x.cpu().to(torch::kFloat64).contiguous();
  if (bias.defined()) xd = xd + bias.cpu().to(torch::kFloat64).view({x.size(0), x.size(1), 1, 1});
  const auto& o = norm->options;
  auto grouped = xd.reshape({x.size(0), o.num_groups(), -1});
  auto [var, mean] = torch::var_mean(grouped, {2}, /*unbiased=*/false);
  auto cond = mean.abs() * torch::rsqrt(var + o.eps());
  const double gamma = norm->weight.abs().max().item<double>();
  return 4 * std::ldexp(1.0, -24) * cond.max().item<double>() * gamma;
}

double relative_error(const torch::Tensor& got, const torch::Tensor& ref) {
  const double scale = std::max(1.0, ref.abs().max().item<double>());
  return (got.cpu().to(torch::kFloat64) - ref).abs().max().item<double>() / scale;
}

TEST(FusedKernelsCuda, GroupNormMatchesFloat64Reference) {
  SKIP_WITHOUT_CUDA();
  if (!fused_kernels_enabled()) GTEST_SKIP() << "this build has no fused CUDA kernels";
  torch::manual_seed(5);
  torch::NoGradGuard no_grad;
  // (n, c, h, w, groups): UNet-like (vector loads), VAE-like, odd sizes (scalar paths), one
  // pixel, and channel groups of 10 (SD's 320 / 32).
  const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> shapes = {
      {2, 320, 16, 16, 32}, {1, 128, 64, 64, 32}, {3, 40, 7, 5, 4},
      {2, 10, 3, 3, 5},     {4, 64, 1, 1, 32},    {1, 20, 33, 17, 2}};
  for (auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
    for (const auto& [n, c, h, w, groups] : shapes) {
      auto norm = make_norm(groups, c, 1e-5);
      norm->to(torch::kCUDA, dtype);
      // An offset mean checks the statistics against cancellation.
      auto x = (torch::randn({n, c, h, w}) * 0.7 + 3).to(torch::kCUDA, dtype);
      auto t = torch::randn({n, c}).to(torch::kCUDA, dtype);
      for (bool channels_last : {false, true}) {
        auto xi = channels_last ? x.contiguous(torch::MemoryFormat::ChannelsLast) : x;
        for (bool silu : {false, true}) {
          for (bool with_bias : {false, true}) {
            const auto bias = with_bias ? t : torch::Tensor();
            const auto got = group_norm_fused(norm, xi, bias, silu);
            ASSERT_EQ(got.sizes(), xi.sizes());
            EXPECT_EQ(got.scalar_type(), dtype);
            if (channels_last && h * w > 1) {
              EXPECT_TRUE(got.is_contiguous(torch::MemoryFormat::ChannelsLast));
            }
            const double err = relative_error(got, reference_norm(norm, xi, bias, silu));
            EXPECT_LE(err, tolerance(dtype) + statistics_error(norm, xi, bias))
                << dtype << " " << n << "x" << c << "x" << h << "x" << w << " g" << groups
                << " channels_last " << channels_last << " silu " << silu << " bias " << with_bias;
          }
        }
      }
    }
  }
}

TEST(FusedKernelsCuda, GegluMatchesFloat64Reference) {
  SKIP_WITHOUT_CUDA();
  if (!fused_kernels_enabled()) GTEST_SKIP() << "this build has no fused CUDA kernels";
  torch::manual_seed(6);
  for (auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
    for (auto shape :
         {std::vector<int64_t>{2, 77, 2 * 320}, {3, 5, 2 * 10}, {1, 4096, 2 * 1280}, {7, 2 * 3}}) {
      auto p = (torch::randn(shape) * 2).to(torch::kCUDA, dtype);
      const auto got = geglu_fused(p);
      auto want_sizes = shape;
      want_sizes.back() /= 2;
      ASSERT_EQ(got.sizes(), want_sizes);
      EXPECT_LE(relative_error(got, reference_geglu(p)), tolerance(dtype))
          << dtype << " last dim " << shape.back();
      // With the projection's bias folded in: the reference adds it in float64 first.
      auto bias = torch::randn({shape.back()}).to(torch::kCUDA, dtype);
      const auto with_bias = geglu_fused(p, bias);
      const auto ref =
          reference_geglu(p.cpu().to(torch::kFloat64) + bias.cpu().to(torch::kFloat64));
      EXPECT_LE(relative_error(with_bias, ref), tolerance(dtype))
          << dtype << " last dim " << shape.back() << " with bias";
    }
  }
}

TEST(FusedKernelsCuda, BiasResidualMatchesFloat64Reference) {
  SKIP_WITHOUT_CUDA();
  if (!fused_kernels_enabled()) GTEST_SKIP() << "this build has no fused CUDA kernels";
  torch::manual_seed(9);
  // (n, c, h, w): UNet-like (vector loads in both layouts), odd sizes (scalar paths), one pixel.
  const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> shapes = {
      {2, 320, 16, 16}, {1, 128, 8, 8}, {3, 5, 7, 3}, {2, 16, 1, 1}};
  for (auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
    for (const auto& [n, c, h, w] : shapes) {
      for (bool channels_last : {false, true}) {
        const auto format =
            channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
        auto y = torch::randn({n, c, h, w}).to(torch::kCUDA, dtype).contiguous(format);
        auto r = torch::randn({n, c, h, w}).to(torch::kCUDA, dtype).contiguous(format);
        auto b = torch::randn({c}).to(torch::kCUDA, dtype);
        for (int variant = 0; variant < 3; ++variant) {  // bias + residual, bias, residual
          const auto bias = variant == 2 ? torch::Tensor() : b;
          const auto residual = variant == 1 ? torch::Tensor() : r;
          const double scale = variant == 0 ? 0.5 : 1.0;
          auto ref = y.cpu().to(torch::kFloat64);
          if (bias.defined()) ref = ref + b.cpu().to(torch::kFloat64).view({1, c, 1, 1});
          if (residual.defined()) ref = ref + r.cpu().to(torch::kFloat64);
          ref = ref * scale;
          const auto got = add_bias_residual_(y.clone(), bias, residual, scale);
          EXPECT_EQ(got.is_contiguous(torch::MemoryFormat::ChannelsLast),
                    channels_last || h * w == 1);
          // One rounding of the float32 sum to the dtype: half an ulp (tolerance()).
          EXPECT_LE(relative_error(got, ref), tolerance(dtype))
              << dtype << " " << n << "x" << c << "x" << h << "x" << w << " channels_last "
              << channels_last << " variant " << variant;
        }
      }
    }
  }
}

TEST(FusedKernelsCuda, LayerNormMatchesFloat64Reference) {
  SKIP_WITHOUT_CUDA();
  if (!fused_kernels_enabled()) GTEST_SKIP() << "this build has no fused CUDA kernels";
  torch::manual_seed(15);
  torch::NoGradGuard no_grad;
  // The UNet's widths, one row shorter than a warp's vectors, the kernel's widest row, and
  // widths the kernel refuses (torch's module takes them: the result must be the same).
  for (auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
    for (int64_t c : {320, 640, 1280, 24, 1024, 2048, 20, 4104}) {
      torch::nn::LayerNorm norm(torch::nn::LayerNormOptions({c}).eps(1e-5));
      norm->weight.uniform_(0.5, 1.5);
      norm->bias.uniform_(-0.5, 0.5);
      norm->to(torch::kCUDA, dtype);
      // An offset mean checks the variance against cancellation.
      auto x = (torch::randn({2, 37, c}) * 0.7 + 3).to(torch::kCUDA, dtype);
      const auto got = layer_norm_fused(norm, x);
      ASSERT_EQ(got.sizes(), x.sizes());
      auto ref = torch::layer_norm(x.cpu().to(torch::kFloat64), {c},
                                   norm->weight.cpu().to(torch::kFloat64),
                                   norm->bias.cpu().to(torch::kFloat64), 1e-5);
      // Float32 statistics over <= 4104 values from registers (~1e-6 relative) and one rounding
      // to the dtype: tolerance() as for the group norm.
      EXPECT_LE(relative_error(got, ref), tolerance(dtype)) << dtype << " width " << c;
    }
  }
}

// A linear layer's output (..., C): the bias runs over the last dim.
TEST(FusedKernelsCuda, LinearEpilogueMatchesFloat64Reference) {
  SKIP_WITHOUT_CUDA();
  if (!fused_kernels_enabled()) GTEST_SKIP() << "this build has no fused CUDA kernels";
  torch::manual_seed(12);
  for (auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
    for (auto shape : {std::vector<int64_t>{2, 77, 320}, {3, 5, 6}, {1, 4096, 640}}) {
      auto y = torch::randn(shape).to(torch::kCUDA, dtype);
      auto r = torch::randn(shape).to(torch::kCUDA, dtype);
      auto b = torch::randn({shape.back()}).to(torch::kCUDA, dtype);
      auto ref =
          y.cpu().to(torch::kFloat64) + b.cpu().to(torch::kFloat64) + r.cpu().to(torch::kFloat64);
      EXPECT_LE(relative_error(add_bias_residual_(y.clone(), b, r), ref), tolerance(dtype))
          << dtype << " last dim " << shape.back();
    }
  }
}

// The resnet's fused path (conv biases folded into the norm and the residual add) against the
// same block run by torch's ops in float64 on the CPU.
TEST(FusedKernelsCuda, ResnetBlockEpilogueMatchesTheUnfusedBlock) {
  SKIP_WITHOUT_CUDA();
  if (!fused_kernels_enabled()) GTEST_SKIP() << "this build has no fused CUDA kernels";
  torch::manual_seed(10);
  torch::NoGradGuard no_grad;
  // TF32 convolutions would round inputs to 10 bits: compare float32 arithmetic.
  const bool tf32 = at::globalContext().allowTF32CuDNN();
  at::globalContext().setAllowTF32CuDNN(false);
  for (int64_t temb_channels : {int64_t{0}, int64_t{24}}) {
    for (int64_t out : {int64_t{32}, int64_t{64}}) {  // same channels; a shortcut conv
      ResnetBlock2DOptions o;
      o.in_channels = 32;
      o.out_channels = out;
      o.temb_channels = temb_channels;
      o.groups = 8;
      o.output_scale_factor = temb_channels > 0 ? 1.0 : 2.0;
      ResnetBlock2D block(o);
      for (auto& p : block->parameters()) p.uniform_(-0.3, 0.3);
      auto x = torch::randn({2, 32, 12, 10});
      auto temb = temb_channels > 0 ? torch::randn({2, temb_channels}) : torch::Tensor();
      block->to(torch::kFloat64);
      const auto want =
          block->forward(x.to(torch::kFloat64), temb.defined() ? temb.to(torch::kFloat64) : temb);
      block->to(torch::kCUDA, torch::kFloat32);
      for (bool channels_last : {false, true}) {
        auto xc = x.to(torch::kCUDA);
        if (channels_last) xc = xc.contiguous(torch::MemoryFormat::ChannelsLast);
        const auto got = block->forward(xc, temb.defined() ? temb.to(torch::kCUDA) : temb);
        // Float32 throughout: convolutions over 9 * 64 products and the norms' statistics round
        // at ~1e-6 relative; 1e-4 leaves room for cuDNN's algorithm choice (Winograd, FFT).
        EXPECT_LE(relative_error(got, want), 1e-4)
            << "temb " << temb_channels << " out " << out << " channels_last " << channels_last;
      }
    }
  }
  at::globalContext().setAllowTF32CuDNN(tf32);
}

// The spatial transformer's fused path (linear biases in the epilogues with the residuals, the
// GEGLU bias in its kernel) against the same module run by torch's ops in float64 on the CPU.
TEST(FusedKernelsCuda, TransformerEpiloguesMatchTheUnfusedBlock) {
  SKIP_WITHOUT_CUDA();
  if (!fused_kernels_enabled()) GTEST_SKIP() << "this build has no fused CUDA kernels";
  torch::manual_seed(13);
  torch::NoGradGuard no_grad;
  const bool tf32_blas = at::globalContext().allowTF32CuBLAS();
  const bool tf32_dnn = at::globalContext().allowTF32CuDNN();
  at::globalContext().setAllowTF32CuBLAS(false);
  at::globalContext().setAllowTF32CuDNN(false);
  for (bool linear_projection : {false, true}) {
    Transformer2DOptions o;
    o.channels = 32;
    o.heads = 2;
    o.dim_head = 16;
    o.cross_attention_dim = 24;
    o.groups = 8;
    o.use_linear_projection = linear_projection;
    Transformer2D block(o);
    for (auto& p : block->parameters()) p.uniform_(-0.3, 0.3);
    auto x = torch::randn({2, 32, 6, 5});
    auto context = torch::randn({2, 7, 24});
    block->to(torch::kFloat64);
    const auto want = block->forward(x.to(torch::kFloat64), context.to(torch::kFloat64));
    block->to(torch::kCUDA, torch::kFloat32);
    for (bool channels_last : {false, true}) {
      auto xc = x.to(torch::kCUDA);
      if (channels_last) xc = xc.contiguous(torch::MemoryFormat::ChannelsLast);
      const auto got = block->forward(xc, context.to(torch::kCUDA));
      // Float32 GEMMs and norms over <= 128 values: ~1e-6 relative; 1e-4 as for the resnet.
      EXPECT_LE(relative_error(got, want), 1e-4)
          << "linear_projection " << linear_projection << " channels_last " << channels_last;
    }
  }
  at::globalContext().setAllowTF32CuBLAS(tf32_blas);
  at::globalContext().setAllowTF32CuDNN(tf32_dnn);
}

// Inside CUDA graphs: the UNet runner captures these kernels; CudaGraphs tests in cuda_test.cpp
// compare replay against eager execution.

}  // namespace
}  // namespace sdserve::pipeline
