// Scaled dot-product attention: torch's fused kernels (Flash / memory-efficient) on torch >= 2.0,
// an exact matmul-softmax fallback otherwise (Debian's torch 1.13 has no SDPA).
#pragma once

#include <torch/torch.h>

namespace sdserve::pipeline {

// q: (B, heads, Lq, d), k/v: (B, heads, Lk, d). Returns (B, heads, Lq, d).
// `causal` masks key j > query i (CLIP's text encoder).
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        bool causal = false);

// The fallback, always available; tests compare the two where both exist.
torch::Tensor attention_reference(const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v, bool causal = false);

bool has_fused_attention();

}  // namespace sdserve::pipeline
