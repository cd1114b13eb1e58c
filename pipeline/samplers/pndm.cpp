// PNDM in its PLMS form (diffusers' PNDMScheduler with skip_prk_steps, SD 1.5's default): a
// linear multistep method on the model output, warmed up by one Heun-like step that evaluates the
// second timestep twice.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "pipeline/samplers/schedule.h"

namespace sdserve::pipeline::samplers {
namespace {

class PndmSampler : public Sampler {
 public:
  PndmSampler(const SchedulerConfig& config, int steps)
      : alphas_cumprod_(alphas_cumprod(config)),
        prediction_type_(config.prediction_type),
        step_ratio_(config.num_train_timesteps / steps) {
    final_alpha_cumprod_ = config.set_alpha_to_one ? 1.0f : alphas_cumprod_[0];
    // PLMS timesteps: every base timestep but the last, the second-to-last again, the last;
    // then descending.
    auto base = discrete_timesteps(config, steps);
    std::reverse(base.begin(), base.end());  // ascending, as diffusers' PNDM _timesteps
    std::vector<int> plms(base.begin(), base.end() - 1);
    if (base.size() >= 2) plms.push_back(base[base.size() - 2]);
    plms.push_back(base.back());
    std::reverse(plms.begin(), plms.end());
    int_timesteps_ = plms;
    timesteps_.assign(plms.begin(), plms.end());
  }

  torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                          int eval_index) const override {
    check_index(eval_index);
    return ddpm_add_noise(alphas_cumprod_, int_timesteps_[eval_index], x0, noise);
  }

  torch::Tensor step(const torch::Tensor& model_output, int eval_index, const torch::Tensor& sample,
                     at::Generator& /*generator*/) override {
    advance(eval_index);
    // diffusers' PNDM counts the steps it ran (it has no begin index): image to image starts its
    // warm-up on the first timestep that runs.
    const int counter = eval_index - first_eval();
    int timestep = int_timesteps_[eval_index];
    int prev_timestep = timestep - step_ratio_;
    if (counter != 1) {
      while (ets_.size() > 3) ets_.erase(ets_.begin());
      ets_.push_back(model_output);
    } else {
      // The warm-up's second evaluation: step again from the first timestep.
      prev_timestep = timestep;
      timestep = timestep + step_ratio_;
    }
    torch::Tensor x = sample;
    torch::Tensor eps;
    const size_t n = ets_.size();
    if (n == 1 && counter == 0) {
      eps = model_output;
      cur_sample_ = sample;
    } else if (n == 1 && counter == 1) {
      eps = (model_output + ets_[n - 1]) / 2;
      x = cur_sample_;
      cur_sample_ = torch::Tensor();
    } else if (n == 2) {
      eps = (3 * ets_[n - 1] - ets_[n - 2]) / 2;
    } else if (n == 3) {
      eps = (23 * ets_[n - 1] - 16 * ets_[n - 2] + 5 * ets_[n - 3]) / 12;
    } else {
      eps = (1.0 / 24) * (55 * ets_[n - 1] - 59 * ets_[n - 2] + 37 * ets_[n - 3] - 9 * ets_[n - 4]);
    }
    return prev_sample(x, timestep, prev_timestep, eps);
  }

 private:
  // Formula (9) of the PNDM paper, in float32 as diffusers' 0-dim tensors compute it.
  torch::Tensor prev_sample(const torch::Tensor& sample, int timestep, int prev_timestep,
                            torch::Tensor model_output) const {
    const float a_t = alphas_cumprod_[timestep];
    const float a_prev = prev_timestep >= 0 ? alphas_cumprod_[prev_timestep] : final_alpha_cumprod_;
    const float b_t = 1.0f - a_t;
    const float b_prev = 1.0f - a_prev;
    if (prediction_type_ == "v_prediction") {
      model_output = std::sqrt(a_t) * model_output + std::sqrt(b_t) * sample;
    }
    const float sample_coeff = std::sqrt(a_prev / a_t);
    const float denom = a_t * std::sqrt(b_prev) + std::sqrt(a_t * b_t * a_prev);
    return sample_coeff * sample - (a_prev - a_t) * model_output / denom;
  }

  std::vector<float> alphas_cumprod_;
  float final_alpha_cumprod_ = 1.0f;
  std::string prediction_type_;
  int step_ratio_;
  std::vector<int> int_timesteps_;
  std::vector<torch::Tensor> ets_;  // the model outputs of the multistep history
  torch::Tensor cur_sample_;        // the sample the warm-up step started from
};

}  // namespace

std::unique_ptr<Sampler> make_pndm(const SchedulerConfig& config, int steps) {
  return std::make_unique<PndmSampler>(config, steps);
}

}  // namespace sdserve::pipeline::samplers
