// Internal to the samplers: the noise-schedule math diffusers' schedulers share, and each sampler
// family's factory. Precision follows diffusers: tables are float32 (torch), the numpy parts of
// set_timesteps are float64 and cast to float32 at the end.
#pragma once

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "pipeline/samplers/sampler.h"

namespace sdserve::pipeline::samplers {

// alphas_cumprod in float32, as diffusers builds it (torch linspace, cumprod).
std::vector<float> alphas_cumprod(const SchedulerConfig& config);
// ((1 - a) / a) ** 0.5 per train timestep, float32, ascending in t.
std::vector<float> train_sigmas(const std::vector<float>& alphas_cumprod);
// numpy.log of the float32 table (stays float32).
std::vector<float> log_of(const std::vector<float>& table);

// numpy.interp(x, arange(n), table), float64.
double interp(double x, const std::vector<float>& table);
// Karras et al. (2022) rho = 7 ramp from sigma_max down to sigma_min, n values, float64.
std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int n);
// diffusers' _sigma_to_t: the fractional train timestep of `sigma`, interpolating log sigmas.
double sigma_to_t(double sigma, const std::vector<float>& log_sigmas);
// numpy.round (half to even).
inline double round_half_even(double x) {
  return std::nearbyint(x);
}

// The config's timestep_spacing, or `fallback` (the sampler's diffusers default) when empty.
std::string spacing_or(const SchedulerConfig& config, const char* fallback);
// The integer timesteps of DDIM and PNDM (diffusers' leading / linspace / trailing spacing,
// "leading" when the config names none), descending.
std::vector<int> discrete_timesteps(const SchedulerConfig& config, int steps);

// The schedule of a sigma-space sampler: one timestep per step and N + 1 float32 sigmas
// (the last is 0).
struct SigmaSchedulePlan {
  std::vector<double> timesteps;
  std::vector<float> sigmas;
  double init_noise_sigma = 1.0;
};
// Euler, Euler ancestral, LMS and Heun (float timesteps, interpolated sigmas, VE sample scale).
SigmaSchedulePlan euler_family_schedule(const SchedulerConfig& config, int steps, bool karras);
// DPM-Solver multistep and UniPC (integer timesteps from N + 1 points, VP samples).
SigmaSchedulePlan multistep_schedule(const SchedulerConfig& config, int steps, bool karras);

// sigma -> (alpha_t, sigma_t) of the VP formulation, in float32 as diffusers computes it.
struct AlphaSigma {
  float alpha;
  float sigma;
};
inline AlphaSigma vp_alpha_sigma(float sigma) {
  const float alpha = 1.0f / std::sqrt(sigma * sigma + 1.0f);
  return {alpha, sigma * alpha};
}
inline float vp_lambda(const AlphaSigma& as) {
  return std::log(as.alpha) - std::log(as.sigma);
}

// The denoised prediction x0 of a VE (sigma-space) sample, for the sigma-space samplers.
torch::Tensor ve_denoised(const std::string& prediction_type, const torch::Tensor& sample,
                          const torch::Tensor& model_output, float sigma);
// The denoised prediction x0 of a VP sample (DPM-Solver++, UniPC convert_model_output).
torch::Tensor vp_denoised(const std::string& prediction_type, const torch::Tensor& sample,
                          const torch::Tensor& model_output, float sigma);

// Base of the samplers whose sample lives in sigma (VE) space: the UNet sees
// sample / sqrt(sigma^2 + 1).
class VeSampler : public Sampler {
 public:
  torch::Tensor scale_model_input(const torch::Tensor& sample, int eval_index) override;
  torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                          int eval_index) const override;

 protected:
  VeSampler(const SchedulerConfig& config, const SigmaSchedulePlan& plan);
  // The sigma the UNet is evaluated at for `eval_index`.
  virtual float eval_sigma(int eval_index) const { return sigmas_[eval_index]; }

  std::vector<float> sigmas_;  // N + 1, the last 0
  std::string prediction_type_;
};

// Base of the multistep solvers on VP samples (DPM-Solver++, UniPC): the schedule, and each
// step's data prediction x0.
class VpMultistepSampler : public Sampler {
 public:
  // diffusers' DPM-Solver and UniPC add noise at the sigma: alpha_t x0 + sigma_t noise.
  torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                          int eval_index) const override;

 protected:
  VpMultistepSampler(const SchedulerConfig& config, int steps, bool karras);
  torch::Tensor predict_x0(const torch::Tensor& model_output, int eval_index,
                           const torch::Tensor& sample) const {
    return vp_denoised(prediction_type_, sample, model_output, sigmas_[eval_index]);
  }

  std::string prediction_type_;
  std::vector<float> sigmas_;  // N + 1, the last 0
};

// DDPM's forward process at integer train timestep t, as DDIM's and PNDM's add_noise compute it:
// sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t]) noise, in float32.
torch::Tensor ddpm_add_noise(const std::vector<float>& alphas_cumprod, int t,
                             const torch::Tensor& x0, const torch::Tensor& noise);

// Rounds a float32 coefficient to `dtype`, where diffusers casts a coefficient tensor to the
// sample's dtype.
float round_to(float value, torch::ScalarType dtype);

std::unique_ptr<Sampler> make_pndm(const SchedulerConfig& config, int steps);
std::unique_ptr<Sampler> make_ddim(const SchedulerConfig& config, int steps);
std::unique_ptr<Sampler> make_euler(const SchedulerConfig& config, int steps, bool karras);
std::unique_ptr<Sampler> make_euler_ancestral(const SchedulerConfig& config, int steps,
                                              bool karras);
std::unique_ptr<Sampler> make_lms(const SchedulerConfig& config, int steps, bool karras);
std::unique_ptr<Sampler> make_heun(const SchedulerConfig& config, int steps, bool karras);
std::unique_ptr<Sampler> make_dpmpp_2m(const SchedulerConfig& config, int steps, bool karras);
std::unique_ptr<Sampler> make_uni_pc(const SchedulerConfig& config, int steps, bool karras);

}  // namespace sdserve::pipeline::samplers
