// Small device utilities that differ between CPU-only and CUDA builds of torch.
#pragma once

#include <torch/torch.h>

#include "pipeline/bench_support.h"

namespace sdserve::pipeline {

void synchronize(torch::Device device);
bench_support::DeviceMemory device_memory(torch::Device device, bool reset_peak);
// Process-wide CUDA settings for fixed-shape inference: cuDNN autotuning, and TF32 (10-bit
// mantissa products, fp32 accumulation) for fp32 work when allowed; an fp32 model keeps exact
// fp32 so it can be checked against the CPU reference.
void configure_cuda_for_inference(bool allow_tf32);
// Keeps the module's convolution weights channels-last (NHWC): cuDNN's fastest convolutions
// are NHWC, and a convolution follows its weights' layout, so the activations become NHWC too.
void to_channels_last(torch::nn::Module& module);

}  // namespace sdserve::pipeline
