// A LoRA file's adapters in host memory (internal header: torch).
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "pipeline/io/lora_convert.h"
#include "pipeline/lora.h"

namespace sdserve::pipeline {

struct Lora::Impl {
  LoraInfo info;
  uint64_t id = 0;
  // One adapted module: delta W = scale x up @ down (convolutions: down's kernel, up 1x1).
  struct Adapter {
    lora_names::Component component = lora_names::Component::kUnet;
    bool kohya = false;  // `module` is kohya's underscored spelling
    std::string module;  // lora_names::ParsedKey::module
    std::string key;     // the file's name of the down factor (messages)
    torch::Tensor down;  // (rank, in) or (rank, in, kh, kw); CPU, the file's dtype
    torch::Tensor up;    // (out, rank) or (out, rank, 1, 1)
    double scale = 1.0;  // alpha / rank (kohya, A1111, diffusers); PEFT metadata's lora_alpha / r
    int64_t rank() const { return down.size(0); }
  };
  std::vector<Adapter> adapters;
};

}  // namespace sdserve::pipeline
