// Euler and Euler ancestral (diffusers' EulerDiscreteScheduler with s_churn = 0, and
// EulerAncestralDiscreteScheduler). Both upcast the sample to float32 and return the model
// output's dtype, as diffusers does.
#include <torch/torch.h>

#include <cmath>
#include <memory>

#include "pipeline/samplers/schedule.h"

namespace sdserve::pipeline::samplers {
namespace {

class EulerSampler : public VeSampler {
 public:
  EulerSampler(const SchedulerConfig& config, int steps, bool karras)
      : VeSampler(config, euler_family_schedule(config, steps, karras)) {}

  torch::Tensor step(const torch::Tensor& model_output, int eval_index, const torch::Tensor& sample,
                     at::Generator& /*generator*/) override {
    advance(eval_index);
    const float sigma = sigmas_[eval_index];
    const torch::Tensor x = sample.to(torch::kFloat32);
    const torch::Tensor denoised = ve_denoised(prediction_type_, x, model_output, sigma);
    const torch::Tensor derivative = (x - denoised) / sigma;
    const float dt = sigmas_[eval_index + 1] - sigma;
    return (x + derivative * dt).to(model_output.scalar_type());
  }
};

// Steps down to sigma_down deterministically, then adds fresh noise of scale sigma_up drawn from
// the image's generator (drawn at every step, the last included, as diffusers does).
class EulerAncestralSampler : public VeSampler {
 public:
  EulerAncestralSampler(const SchedulerConfig& config, int steps, bool karras)
      : VeSampler(config, euler_family_schedule(config, steps, karras)) {}

  torch::Tensor step(const torch::Tensor& model_output, int eval_index, const torch::Tensor& sample,
                     at::Generator& generator) override {
    advance(eval_index);
    const float sigma = sigmas_[eval_index];
    const float sigma_to = sigmas_[eval_index + 1];
    const torch::Tensor x = sample.to(torch::kFloat32);
    const torch::Tensor denoised = ve_denoised(prediction_type_, x, model_output, sigma);
    const float sigma_up =
        std::sqrt(sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma));
    const float sigma_down = std::sqrt(sigma_to * sigma_to - sigma_up * sigma_up);
    const torch::Tensor derivative = (x - denoised) / sigma;
    const float dt = sigma_down - sigma;
    torch::Tensor prev = x + derivative * dt;
    const torch::Tensor noise =
        torch::randn(sample.sizes(), generator, torch::TensorOptions().dtype(torch::kFloat32))
            .to(model_output.device(), model_output.scalar_type());
    prev = prev + noise * sigma_up;
    return prev.to(model_output.scalar_type());
  }
};

}  // namespace

std::unique_ptr<Sampler> make_euler(const SchedulerConfig& config, int steps, bool karras) {
  return std::make_unique<EulerSampler>(config, steps, karras);
}

std::unique_ptr<Sampler> make_euler_ancestral(const SchedulerConfig& config, int steps,
                                              bool karras) {
  return std::make_unique<EulerAncestralSampler>(config, steps, karras);
}

}  // namespace sdserve::pipeline::samplers
