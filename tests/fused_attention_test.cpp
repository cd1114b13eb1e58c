// Fused q/k/v projections (the GPU path) compute the same function as separate ones.
#include <gtest/gtest.h>

#include "pipeline/nn/blocks.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

void expect_fusion_keeps_output(AttentionOptions o, bool with_context) {
  torch::manual_seed(3);
  Attention attention(o);
  auto x = torch::randn({2, 16, o.query_dim});
  auto ctx = with_context ? torch::randn({2, 7, o.context_dim}) : torch::Tensor();
  torch::NoGradGuard no_grad;
  const auto before = attention->forward(x, ctx);
  const auto params_before = attention->parameters().size();
  attention->fuse_projections();
  const auto after = attention->forward(x, ctx);
  EXPECT_LE(test::max_abs_diff(before, after), 1e-5);
  EXPECT_EQ(attention->parameters().size(), params_before);  // names and count unchanged
}

TEST(FusedAttention, SelfAttentionQkv) {
  AttentionOptions o;
  o.query_dim = 32;
  o.heads = 4;
  o.dim_head = 8;
  expect_fusion_keeps_output(o, false);
  o.bias = true;
  expect_fusion_keeps_output(o, false);
}

TEST(FusedAttention, CrossAttentionKv) {
  AttentionOptions o;
  o.query_dim = 32;
  o.context_dim = 24;
  o.heads = 4;
  o.dim_head = 8;
  expect_fusion_keeps_output(o, true);
}

}  // namespace
}  // namespace sdserve::pipeline
