#include "pipeline/nn/attention.h"

#include <cmath>

namespace sdserve::pipeline {

torch::Tensor attention_reference(const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v, bool causal) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;
  if (causal) {
    const auto lq = q.size(-2), lk = k.size(-2);
    auto mask = torch::ones({lq, lk}, torch::TensorOptions().dtype(torch::kBool).device(q.device()))
                    .triu(1);
    scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
  }
  return torch::matmul(scores.softmax(-1), v);
}

bool has_fused_attention() {
#if TORCH_VERSION_MAJOR >= 2
  return true;
#else
  return false;
#endif
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        bool causal) {
#if TORCH_VERSION_MAJOR >= 2
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, causal);
#else
  return attention_reference(q, k, v, causal);
#endif
}

}  // namespace sdserve::pipeline
