// DDIM (diffusers' DDIMScheduler) with eta = 0, the StableDiffusionPipeline default. The
// pipeline's constructor forces clip_sample off (a from_config'd DDIM would default it on), and
// the reference runs confirm it off.
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "pipeline/samplers/schedule.h"

namespace sdserve::pipeline::samplers {
namespace {

class DdimSampler : public Sampler {
 public:
  DdimSampler(const SchedulerConfig& config, int steps)
      : alphas_cumprod_(alphas_cumprod(config)),
        prediction_type_(config.prediction_type),
        step_ratio_(config.num_train_timesteps / steps) {
    final_alpha_cumprod_ = config.set_alpha_to_one ? 1.0f : alphas_cumprod_[0];
    int_timesteps_ = discrete_timesteps(config, steps);
    timesteps_.assign(int_timesteps_.begin(), int_timesteps_.end());
  }

  torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                          int eval_index) const override {
    check_index(eval_index);
    return ddpm_add_noise(alphas_cumprod_, int_timesteps_[eval_index], x0, noise);
  }

  torch::Tensor step(const torch::Tensor& model_output, int eval_index, const torch::Tensor& sample,
                     at::Generator& /*generator*/) override {
    advance(eval_index);
    const int timestep = int_timesteps_[eval_index];
    const int prev_timestep = timestep - step_ratio_;
    const float a_t = alphas_cumprod_[timestep];
    const float a_prev = prev_timestep >= 0 ? alphas_cumprod_[prev_timestep] : final_alpha_cumprod_;
    const float b_t = 1.0f - a_t;
    torch::Tensor x0;
    torch::Tensor eps;
    if (prediction_type_ == "v_prediction") {
      x0 = std::sqrt(a_t) * sample - std::sqrt(b_t) * model_output;
      eps = std::sqrt(a_t) * model_output + std::sqrt(b_t) * sample;
    } else {
      x0 = (sample - std::sqrt(b_t) * model_output) / std::sqrt(a_t);
      eps = model_output;
    }
    // eta = 0: no variance term, the direction keeps all of 1 - alpha_prev.
    const torch::Tensor direction = std::sqrt(1.0f - a_prev) * eps;
    return std::sqrt(a_prev) * x0 + direction;
  }

 private:
  std::vector<float> alphas_cumprod_;
  float final_alpha_cumprod_ = 1.0f;
  std::string prediction_type_;
  int step_ratio_;
  std::vector<int> int_timesteps_;
};

}  // namespace

std::unique_ptr<Sampler> make_ddim(const SchedulerConfig& config, int steps) {
  return std::make_unique<DdimSampler>(config, steps);
}

}  // namespace sdserve::pipeline::samplers
