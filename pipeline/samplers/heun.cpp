// Heun (diffusers' HeunDiscreteScheduler): each step but the last evaluates the model twice, at
// sigma_k and after an Euler step at sigma_k+1, and averages the two derivatives. The last step is
// a plain Euler step to sigma = 0, so N steps take 2N - 1 evaluations.
#include <torch/torch.h>

#include <memory>

#include "pipeline/samplers/schedule.h"

namespace sdserve::pipeline::samplers {
namespace {

class HeunSampler : public VeSampler {
 public:
  HeunSampler(const SchedulerConfig& config, int steps, bool karras)
      : VeSampler(config, euler_family_schedule(config, steps, karras)) {
    // diffusers repeats every timestep but the first: t0, t1, t1, t2, t2, ...
    const std::vector<double> per_step = timesteps_;
    timesteps_.clear();
    for (int i = 0; i < 2 * static_cast<int>(per_step.size()) - 1; ++i) {
      timesteps_.push_back(per_step[(i + 1) / 2]);
    }
  }

  torch::Tensor step(const torch::Tensor& model_output, int eval_index, const torch::Tensor& sample,
                     at::Generator& /*generator*/) override {
    advance(eval_index);
    const int k = eval_index / 2;  // the step this evaluation belongs to
    const float sigma = sigmas_[k];
    const float sigma_next = sigmas_[k + 1];
    if (eval_index % 2 == 0) {
      const torch::Tensor denoised = ve_denoised(prediction_type_, sample, model_output, sigma);
      const torch::Tensor derivative = (sample - denoised) / sigma;
      const float dt = sigma_next - sigma;
      prev_derivative_ = derivative;
      dt_ = dt;
      start_sample_ = sample;
      return sample + derivative * dt;
    }
    const torch::Tensor denoised = ve_denoised(prediction_type_, sample, model_output, sigma_next);
    const torch::Tensor derivative = (prev_derivative_ + (sample - denoised) / sigma_next) / 2;
    const torch::Tensor prev = start_sample_ + derivative * dt_;
    prev_derivative_ = torch::Tensor();
    start_sample_ = torch::Tensor();
    return prev;
  }

 public:
  int order() const override { return 2; }

 protected:
  // Evaluation i runs at sigma (i + 1) / 2: s0, s1, s1, s2, s2, ...
  float eval_sigma(int eval_index) const override { return sigmas_[(eval_index + 1) / 2]; }

 private:
  torch::Tensor prev_derivative_;
  torch::Tensor start_sample_;
  float dt_ = 0.0f;
};

}  // namespace

std::unique_ptr<Sampler> make_heun(const SchedulerConfig& config, int steps, bool karras) {
  return std::make_unique<HeunSampler>(config, steps, karras);
}

}  // namespace sdserve::pipeline::samplers
