// The fused group norm and GEGLU (pipeline/nn/fused.h). On the CPU (and in CI) their fallback
// must be exactly the unfused arithmetic; the *Cuda* tests check the CUDA kernels against a
// float64 reference computed by torch on the CPU from the same inputs, and skip without a GPU.
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

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

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
    }
  }
}

// Inside CUDA graphs: the UNet runner captures these kernels; CudaGraphs tests in cuda_test.cpp
// compare replay against eager execution.

}  // namespace
}  // namespace sdserve::pipeline
