#include "pipeline/nn/lora_hook.h"

namespace sdserve::pipeline {
namespace {

thread_local const LoraCall* active_call = nullptr;

}  // namespace

const LoraCall* active_lora_call() {
  return active_call;
}

LoraCallScope::LoraCallScope(const LoraCall* call) : previous_(active_call) {
  active_call = call;
}

LoraCallScope::~LoraCallScope() {
  active_call = previous_;
}

torch::Tensor LoraCall::add(const torch::nn::Module& module, const torch::Tensor& x,
                            torch::Tensor y) const {
  const auto it = deltas.find(&module);
  if (it == deltas.end()) return y;
  const LoraDelta& d = it->second;
  const int64_t n = x.size(0);
  const int64_t rank = d.down.size(1);
  const bool grouped = d.rows.defined();
  TORCH_CHECK(!grouped || d.rows.size(0) == n, "LoRA: ", d.rows.size(0), " row groups for ", n,
              " rows");
  if (d.conv && x.dim() == 4) {
    if (!grouped) {
      const auto h = torch::conv2d(x, d.down[0].view({rank, d.in, d.kh, d.kw}), {}, d.stride,
                                   d.padding, d.dilation);
      return y.add_(torch::conv2d(h, d.up[0].view({-1, rank, 1, 1})));
    }
    // Each row its own down kernel: one grouped convolution over the rows, then a batched 1x1.
    const auto down = d.down.index_select(0, d.rows).reshape({n * rank, d.in, d.kh, d.kw});
    const auto h = torch::conv2d(x.reshape({1, n * d.in, x.size(2), x.size(3)}), down, {}, d.stride,
                                 d.padding, d.dilation, n);
    const auto delta = torch::bmm(d.up.index_select(0, d.rows), h.view({n, rank, -1}));
    return y.add_(delta.view({n, -1, h.size(2), h.size(3)}));
  }
  if (!grouped) return y.add_(torch::linear(torch::linear(x, d.down[0]), d.up[0]));
  const auto x3 = x.reshape({n, -1, x.size(-1)});
  const auto h = torch::bmm(x3, d.down.index_select(0, d.rows).transpose(1, 2));   // (N, L, R)
  const auto delta = torch::bmm(h, d.up.index_select(0, d.rows).transpose(1, 2));  // (N, L, out)
  return y.add_(delta.view(y.sizes()));
}

}  // namespace sdserve::pipeline
