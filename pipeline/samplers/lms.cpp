// LMS (diffusers' LMSDiscreteScheduler): a linear multistep method of up to order 4 on the
// derivative d = (x - x0) / sigma, whose coefficients integrate the Lagrange basis polynomials over
// [sigma_i, sigma_i+1]. diffusers integrates them with scipy's quad; the integrand is a
// polynomial of degree <= 3, which Gauss-Legendre integrates exactly, in float64.
#include <torch/torch.h>

#include <algorithm>
#include <deque>
#include <memory>

#include "pipeline/samplers/schedule.h"

namespace sdserve::pipeline::samplers {
namespace {

constexpr int kMaxOrder = 4;

class LmsSampler : public VeSampler {
 public:
  LmsSampler(const SchedulerConfig& config, int steps, bool karras)
      : VeSampler(config, euler_family_schedule(config, steps, karras)) {}

  torch::Tensor step(const torch::Tensor& model_output, int eval_index, const torch::Tensor& sample,
                     at::Generator& /*generator*/) override {
    advance(eval_index);
    const float sigma = sigmas_[eval_index];
    const torch::Tensor denoised = ve_denoised(prediction_type_, sample, model_output, sigma);
    derivatives_.push_back((sample - denoised) / sigma);
    if (derivatives_.size() > kMaxOrder) derivatives_.pop_front();
    const int order = std::min(eval_index + 1, kMaxOrder);
    // Newest derivative first, summed in that order as diffusers' sum() does. The order follows
    // the absolute step index while the history holds only the steps that ran: image to image
    // starts with fewer derivatives than the order, and diffusers' zip() then uses the first
    // coefficients alone.
    const int terms = std::min(order, static_cast<int>(derivatives_.size()));
    torch::Tensor acc;
    for (int j = 0; j < terms; ++j) {
      const double coeff = coefficient(order, eval_index, j);
      const torch::Tensor term = derivatives_[derivatives_.size() - 1 - j] * coeff;
      acc = j == 0 ? term : acc + term;
    }
    return sample + acc;
  }

 private:
  // Integral over [sigma_t, sigma_t+1] of the Lagrange basis polynomial of node t - j among the
  // nodes sigma_t, ..., sigma_t-order+1.
  double coefficient(int order, int t, int j) const {
    auto basis = [&](double tau) {
      double prod = 1.0;
      for (int k = 0; k < order; ++k) {
        if (k == j) continue;
        const double sk = sigmas_[t - k];
        prod *= (tau - sk) / (static_cast<double>(sigmas_[t - j]) - sk);
      }
      return prod;
    };
    // 3-point Gauss-Legendre: exact for degree <= 5.
    static const double kNodes[3] = {-0.7745966692414834, 0.0, 0.7745966692414834};
    static const double kWeights[3] = {5.0 / 9.0, 8.0 / 9.0, 5.0 / 9.0};
    const double a = sigmas_[t];
    const double b = sigmas_[t + 1];
    const double half = 0.5 * (b - a);
    const double mid = 0.5 * (a + b);
    double sum = 0.0;
    for (int i = 0; i < 3; ++i) sum += kWeights[i] * basis(mid + half * kNodes[i]);
    return sum * half;
  }

  std::deque<torch::Tensor> derivatives_;
};

}  // namespace

std::unique_ptr<Sampler> make_lms(const SchedulerConfig& config, int steps, bool karras) {
  return std::make_unique<LmsSampler>(config, steps, karras);
}

}  // namespace sdserve::pipeline::samplers
