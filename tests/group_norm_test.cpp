// The reduction-based GroupNorm (the CUDA fast path for few rows) equals torch's GroupNorm.
#include <gtest/gtest.h>

#include "pipeline/nn/blocks.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

TEST(GroupNormFastPath, MatchesTorchGroupNorm) {
  torch::manual_seed(1);
  torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(4, 16).eps(1e-6));
  torch::NoGradGuard no_grad;
  norm->weight.uniform_(0.5, 1.5);
  norm->bias.uniform_(-0.5, 0.5);
  for (auto shape : {std::vector<int64_t>{1, 16, 9, 7}, {3, 16, 5, 5}, {2, 16, 40}}) {
    auto x = torch::randn(shape) * 3 + 1;
    const auto want = norm->forward(x);
    const auto got = group_norm_forward(norm, x, /*force=*/true);
    EXPECT_EQ(got.sizes(), want.sizes());
    EXPECT_LE(test::max_abs_diff(got, want), 1e-5);
  }
}

TEST(GroupNormFastPath, ChannelsLastKeepsLayoutAndValues) {
  torch::manual_seed(2);
  torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(4, 16).eps(1e-5));
  torch::NoGradGuard no_grad;
  norm->weight.uniform_(0.5, 1.5);
  norm->bias.uniform_(-0.5, 0.5);
  auto x = (torch::randn({2, 16, 6, 5}) * 2 - 1).contiguous(torch::MemoryFormat::ChannelsLast);
  const auto got = group_norm_forward(norm, x, /*force=*/true);
  EXPECT_TRUE(got.is_contiguous(torch::MemoryFormat::ChannelsLast));
  EXPECT_LE(test::max_abs_diff(got, norm->forward(x.contiguous())), 1e-5);
}

TEST(GroupNormFastPath, CpuUsesTorchKernel) {
  torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(2, 4));
  auto x = torch::randn({1, 4, 3, 3});
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(group_norm_forward(norm, x), norm->forward(x)));
}

}  // namespace
}  // namespace sdserve::pipeline
