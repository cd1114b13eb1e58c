// Bridges safetensors views and torch: tensor conversion and loading checkpoint weights into
// modules whose registered names are the checkpoint's (diffusers) names.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pipeline/io/safetensors.h"

namespace sdserve::pipeline {

// A stored dtype as torch's (every safetensors dtype has one).
torch::Dtype torch_dtype(DType dtype);

// Copies a view into a new tensor of `dtype` on `device` (any stored float dtype converts).
torch::Tensor to_tensor(const TensorView& view, torch::Dtype dtype = torch::kFloat32,
                        torch::Device device = torch::kCPU);

// Every tensor of a file, as float32 CPU tensors (test references, small files).
std::map<std::string, torch::Tensor> load_all(const std::string& path);

// The weights of one component (text encoder, UNet, VAE) under the names its module registers.
struct WeightSource {
  std::string component;  // "unet", "vae", "text_encoder": used in messages
  std::string origin;     // the file the tensors came from: used in messages
  std::map<std::string, TensorView> tensors;
  std::vector<std::shared_ptr<SafetensorsFile>> files;  // keep the mappings alive
};

// Copies every parameter and buffer of `module` from `source`. Throws ModelError naming the
// tensor when one is missing or its shape differs from the one the config implies.
void load_weights(torch::nn::Module& module, const WeightSource& source, torch::Dtype dtype,
                  torch::Device device);

std::string shape_string(at::IntArrayRef shape);

}  // namespace sdserve::pipeline
