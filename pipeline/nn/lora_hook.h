// Per-call low-rank terms (LoRA) in the forward of the adaptable modules: each Linear and Conv2d
// call site of the UNet and the text encoders passes its output through with_lora(), which adds
// the module's delta for each row of the batch when a LoraCall is active on this thread, and is a
// null check otherwise. Different rows may carry different LoRA sets (S-LoRA / Punica): each
// module's factors are packed per call, every set's LoRAs concatenated along the rank with their
// scales folded into the up factor, padded to the call's largest rank, and gathered per row.
#pragma once

#include <torch/torch.h>

#include <unordered_map>
#include <vector>

namespace sdserve::pipeline {

// One module's adapters for one forward call. Row n of the batch adds
// up[g] @ (down[g] (*) x_n) for its group g = rows[n] (g = 0 for every row when `rows` is
// undefined); a group whose set does not adapt the module has zero factors.
struct LoraDelta {
  torch::Tensor down;  // (G, R, in x kh x kw), the compute dtype, on the module's device
  torch::Tensor up;    // (G, out, R)
  torch::Tensor rows;  // (N) int64, or undefined: one group for the whole batch
  // Convolutions: down is a kh x kw convolution with the module's stride, padding and dilation,
  // up a 1x1 one. A 1x1 convolution applied to tokens (Transformer2D's proj_in) takes the
  // linear form.
  bool conv = false;
  int64_t in = 0, kh = 1, kw = 1;
  std::vector<int64_t> stride{1, 1}, padding{0, 0}, dilation{1, 1};
};

class LoraCall {
 public:
  // `y` (the module's output for `x`, freshly computed: it is added to in place) plus the
  // module's delta for each row.
  torch::Tensor add(const torch::nn::Module& module, const torch::Tensor& x, torch::Tensor y) const;

  std::unordered_map<const torch::nn::Module*, LoraDelta> deltas;
};

// The call active on this thread (null: none, the usual case).
const LoraCall* active_lora_call();

// Makes `call` active on this thread for its lifetime (null: none), restoring the previous one.
class LoraCallScope {
 public:
  explicit LoraCallScope(const LoraCall* call);
  ~LoraCallScope();
  LoraCallScope(const LoraCallScope&) = delete;
  LoraCallScope& operator=(const LoraCallScope&) = delete;

 private:
  const LoraCall* previous_;
};

inline torch::Tensor with_lora(const torch::nn::Module& module, const torch::Tensor& x,
                               torch::Tensor y) {
  if (const LoraCall* call = active_lora_call()) return call->add(module, x, std::move(y));
  return y;
}

}  // namespace sdserve::pipeline
