#include "pipeline/io/tensor_io.h"

#include <algorithm>

#include "pipeline/errors.h"

namespace sdserve::pipeline {

torch::Dtype torch_dtype(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return torch::kFloat32;
    case DType::kF16:
      return torch::kFloat16;
    case DType::kBF16:
      return torch::kBFloat16;
    case DType::kF64:
      return torch::kFloat64;
    case DType::kI64:
      return torch::kInt64;
    case DType::kI32:
      return torch::kInt32;
    case DType::kI16:
      return torch::kInt16;
    case DType::kI8:
      return torch::kInt8;
    case DType::kU8:
      return torch::kUInt8;
    case DType::kBool:
      return torch::kBool;
  }
  throw ModelError("unknown dtype");
}

std::string shape_string(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

torch::Tensor to_tensor(const TensorView& view, torch::Dtype dtype, torch::Device device) {
  // from_blob does not copy; the mapping is read-only, so the const_cast is never written through.
  std::vector<int64_t> stored = view.shape;
  if (view.transposed) std::reverse(stored.begin(), stored.end());
  auto raw = torch::from_blob(const_cast<std::byte*>(view.data), stored,
                              torch::TensorOptions().dtype(torch_dtype(view.dtype)));
  if (view.transposed) raw = raw.t().contiguous();
  return raw.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
}

std::map<std::string, torch::Tensor> load_all(const std::string& path) {
  auto file = SafetensorsFile::open(path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, view] : file->tensors()) out.emplace(name, to_tensor(view));
  return out;
}

void load_weights(torch::nn::Module& module, const WeightSource& source, torch::Dtype dtype,
                  torch::Device device) {
  torch::NoGradGuard no_grad;
  auto load_one = [&](const std::string& name, torch::Tensor& target) {
    auto it = source.tensors.find(name);
    if (it == source.tensors.end())
      throw ModelError("the " + source.component + " weights in '" + source.origin +
                       "' lack tensor '" + name + "'");
    const TensorView& view = it->second;
    if (!target.sizes().equals(view.shape))
      throw ModelError("tensor '" + name + "' in '" + source.origin + "' has shape " +
                       shape_string(view.shape) + " but the " + source.component +
                       " config expects " + shape_string(target.sizes()));
    target.set_data(to_tensor(view, dtype, device));
  };
  for (auto& item : module.named_parameters(/*recurse=*/true)) load_one(item.key(), item.value());
  for (auto& item : module.named_buffers(/*recurse=*/true)) load_one(item.key(), item.value());
}

}  // namespace sdserve::pipeline
