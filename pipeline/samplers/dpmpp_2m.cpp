// DPM-Solver++(2M) (diffusers' DPMSolverMultistepScheduler defaults: solver_order 2,
// algorithm_type dpmsolver++, solver_type midpoint, lower_order_final, final_sigmas_type zero).
// Works on VP samples on the data prediction x0; first order on the first and the last step.
#include <torch/torch.h>

#include <cmath>
#include <memory>

#include "pipeline/samplers/schedule.h"

namespace sdserve::pipeline::samplers {
namespace {

class DpmSolverPlusPlus2M : public VpMultistepSampler {
 public:
  DpmSolverPlusPlus2M(const SchedulerConfig& config, int steps, bool karras)
      : VpMultistepSampler(config, steps, karras) {}

  torch::Tensor step(const torch::Tensor& model_output, int eval_index, const torch::Tensor& sample,
                     at::Generator& /*generator*/) override {
    advance(eval_index);
    const int i = eval_index;
    const torch::Tensor denoised = predict_x0(model_output, i, sample);
    previous_ = current_;
    current_ = denoised;
    const torch::Tensor x = sample.to(torch::kFloat32);
    // final_sigmas_type "zero" makes the last step first order whatever the step count.
    const bool last = i == num_evals() - 1;
    const AlphaSigma t = vp_alpha_sigma(sigmas_[i + 1]);
    const AlphaSigma s0 = vp_alpha_sigma(sigmas_[i]);
    const float lambda_t = vp_lambda(t);
    const float lambda_s0 = vp_lambda(s0);
    const float h = lambda_t - lambda_s0;
    const float coeff = t.alpha * (std::exp(-h) - 1.0f);
    torch::Tensor prev;
    if (lower_order_nums_ < 1 || last) {
      prev = (t.sigma / s0.sigma) * x - coeff * denoised;
    } else {
      const float lambda_s1 = vp_lambda(vp_alpha_sigma(sigmas_[i - 1]));
      const float r0 = (lambda_s0 - lambda_s1) / h;
      const torch::Tensor d1 = (1.0f / r0) * (current_ - previous_);
      prev = (t.sigma / s0.sigma) * x - coeff * current_ - (0.5f * coeff) * d1;
    }
    if (lower_order_nums_ < kSolverOrder) ++lower_order_nums_;
    return prev.to(denoised.scalar_type());
  }

 private:
  static constexpr int kSolverOrder = 2;

  torch::Tensor current_;   // this step's x0 prediction
  torch::Tensor previous_;  // the previous step's
  int lower_order_nums_ = 0;
};

}  // namespace

std::unique_ptr<Sampler> make_dpmpp_2m(const SchedulerConfig& config, int steps, bool karras) {
  return std::make_unique<DpmSolverPlusPlus2M>(config, steps, karras);
}

}  // namespace sdserve::pipeline::samplers
