// Reading torch::nn modules' options across the torch versions the project builds with
// (Debian's 1.13, the GPU machine's 2.x).
#pragma once

#include <torch/torch.h>

#include <variant>

namespace sdserve::pipeline {

// The options' variants (a Conv2d's padding, ...) are c10's own before torch 2.1 and
// std::variant since.
template <typename T, typename Variant>
const T* variant_get_if(const Variant& v) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  return std::get_if<T>(&v);
#else
  return c10::get_if<T>(&v);
#endif
}

}  // namespace sdserve::pipeline
