// The schedule math the samplers share (betas, sigma tables, timestep spacing, Karras sigmas),
// SchedulerConfig::from_json, and the sampler factory.
#include "pipeline/samplers/schedule.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "pipeline/errors.h"
#include "pipeline/sampler_names.h"

namespace sdserve::pipeline {

namespace {

template <typename T>
T config_value(const nlohmann::json& config, const char* key, T fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const nlohmann::json::exception&) {
    throw ModelError(std::string("scheduler config: '") + key + "' has the wrong type (" +
                     it->dump() + ")");
  }
}

}  // namespace

SchedulerConfig SchedulerConfig::from_json(const nlohmann::json& config) {
  if (!config.is_object()) throw ModelError("scheduler config: expected a JSON object");
  SchedulerConfig c;
  c.num_train_timesteps = config_value(config, "num_train_timesteps", c.num_train_timesteps);
  c.beta_start = config_value(config, "beta_start", c.beta_start);
  c.beta_end = config_value(config, "beta_end", c.beta_end);
  c.beta_schedule = config_value(config, "beta_schedule", c.beta_schedule);
  c.prediction_type = config_value(config, "prediction_type", c.prediction_type);
  c.steps_offset = config_value(config, "steps_offset", c.steps_offset);
  c.set_alpha_to_one = config_value(config, "set_alpha_to_one", c.set_alpha_to_one);
  // timestep_spacing counts only where it differs from the default of the config's own class
  // (see the field's comment in sampler.h): SDXL's Euler config says "leading" on purpose, and
  // every sampler follows it; SD 2.x's DDIM config says "leading", DDIM's default, and the
  // other samplers keep their own.
  const auto spacing = config_value(config, "timestep_spacing", std::string());
  const auto cls = config_value(config, "_class_name", std::string());
  const bool leading_by_default = cls == "DDIMScheduler" || cls == "PNDMScheduler" || cls.empty();
  const std::string class_default = leading_by_default ? "leading" : "linspace";
  if (!spacing.empty() && spacing != class_default) c.timestep_spacing = spacing;

  if (c.num_train_timesteps < 2) {
    throw ModelError("scheduler config: num_train_timesteps must be at least 2, got " +
                     std::to_string(c.num_train_timesteps));
  }
  if (c.beta_schedule != "scaled_linear" && c.beta_schedule != "linear") {
    throw ModelError("scheduler config: beta_schedule '" + c.beta_schedule +
                     "' is not supported (use scaled_linear or linear)");
  }
  if (c.prediction_type != "epsilon" && c.prediction_type != "v_prediction") {
    throw ModelError("scheduler config: prediction_type '" + c.prediction_type +
                     "' is not supported (use epsilon or v_prediction)");
  }
  auto trained = config.find("trained_betas");
  if (trained != config.end() && !trained->is_null()) {
    throw ModelError("scheduler config: trained_betas is not supported");
  }
  if (!(c.beta_start > 0 && c.beta_end > 0 && c.beta_start < 1 && c.beta_end < 1)) {
    throw ModelError("scheduler config: beta_start and beta_end must lie in (0, 1)");
  }
  return c;
}

void Sampler::advance(int eval_index) {
  if (eval_index != next_eval_) {
    throw std::logic_error("Sampler::step: expected evaluation " + std::to_string(next_eval_) +
                           ", got " + std::to_string(eval_index));
  }
  check_index(eval_index);
  ++next_eval_;
}

void Sampler::start_at(int eval_index) {
  if (next_eval_ != first_eval_) throw std::logic_error("Sampler::start_at after a step");
  check_index(eval_index);
  next_eval_ = first_eval_ = eval_index;
}

void Sampler::check_index(int eval_index) const {
  if (eval_index < 0 || eval_index >= num_evals()) {
    throw std::logic_error("Sampler: evaluation index " + std::to_string(eval_index) +
                           " outside [0, " + std::to_string(num_evals()) + ")");
  }
}

std::vector<std::string> sampler_names() {
  std::vector<std::string> names;
  for (const auto& s : sampler_catalog()) names.push_back(s.name);
  return names;
}

bool sampler_accepts_karras(const std::string& name) {
  for (const auto& s : sampler_catalog())
    if (s.name == name) return s.supports_karras;
  return false;
}

torch::Tensor Sampler::scale_model_input(const torch::Tensor& sample, int eval_index) {
  check_index(eval_index);
  return sample;
}

std::unique_ptr<Sampler> make_sampler(const std::string& name, SigmaSchedule schedule, int steps,
                                      const SchedulerConfig& config) {
  const auto names = sampler_names();
  auto join = [](const std::vector<std::string>& list) {
    std::string out;
    for (const auto& n : list) out += (out.empty() ? "" : ", ") + n;
    return out;
  };
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    throw RequestError("sampler", "unknown sampler '" + name + "'; known samplers: " + join(names));
  }
  if (steps < 1 || steps > config.num_train_timesteps) {
    throw RequestError("steps", "steps must be between 1 and " +
                                    std::to_string(config.num_train_timesteps) + ", got " +
                                    std::to_string(steps));
  }
  const bool karras = schedule == SigmaSchedule::kKarras;
  if (karras && !sampler_accepts_karras(name)) {
    std::vector<std::string> ok;
    for (const auto& n : names) {
      if (sampler_accepts_karras(n)) ok.push_back(n);
    }
    throw RequestError(
        "scheduler", "sampler '" + name +
                         "' has no sigma schedule, so it cannot use the karras schedule; samplers "
                         "that accept karras: " +
                         join(ok));
  }
  const std::string spacing = config.timestep_spacing;
  if (!spacing.empty() && spacing != "leading" && spacing != "trailing" && spacing != "linspace") {
    throw RequestError("", "timestep_spacing '" + spacing +
                               "' is not supported (use leading, trailing or linspace)");
  }
  using namespace samplers;
  if (name == "pndm") return make_pndm(config, steps);
  if (name == "ddim") return make_ddim(config, steps);
  if (name == "euler") return make_euler(config, steps, karras);
  if (name == "euler_ancestral") return make_euler_ancestral(config, steps, karras);
  if (name == "dpmpp_2m") return make_dpmpp_2m(config, steps, karras);
  if (name == "lms") return make_lms(config, steps, karras);
  if (name == "heun") return make_heun(config, steps, karras);
  return make_uni_pc(config, steps, karras);
}

namespace samplers {

std::vector<float> alphas_cumprod(const SchedulerConfig& config) {
  const int64_t n = config.num_train_timesteps;
  torch::Tensor betas;
  if (config.beta_schedule == "scaled_linear") {
    betas = torch::linspace(std::sqrt(config.beta_start), std::sqrt(config.beta_end), n,
                            torch::kFloat32)
                .pow(2);
  } else {
    betas = torch::linspace(config.beta_start, config.beta_end, n, torch::kFloat32);
  }
  // torch's CPU cumprod accumulates float32 in double, as it did for the reference.
  const auto cumprod = torch::cumprod(1.0 - betas, 0).contiguous();
  const float* p = cumprod.data_ptr<float>();
  return std::vector<float>(p, p + n);
}

std::vector<float> train_sigmas(const std::vector<float>& alphas_cumprod) {
  std::vector<float> out(alphas_cumprod.size());
  for (size_t i = 0; i < out.size(); ++i) {
    const float a = alphas_cumprod[i];
    out[i] = std::sqrt((1.0f - a) / a);
  }
  return out;
}

std::vector<float> log_of(const std::vector<float>& table) {
  std::vector<float> out(table.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = std::log(table[i]);
  return out;
}

double interp(double x, const std::vector<float>& table) {
  const auto n = static_cast<double>(table.size());
  if (x >= n - 1) return table.back();
  if (x <= 0) return table.front();
  const auto j = static_cast<size_t>(std::floor(x));
  if (static_cast<double>(j) == x) return table[j];
  const double slope = static_cast<double>(table[j + 1]) - static_cast<double>(table[j]);
  return slope * (x - static_cast<double>(j)) + static_cast<double>(table[j]);
}

std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int n) {
  constexpr double kRho = 7.0;
  const double min_inv_rho = std::pow(sigma_min, 1.0 / kRho);
  const double max_inv_rho = std::pow(sigma_max, 1.0 / kRho);
  std::vector<double> out(n);
  for (int i = 0; i < n; ++i) {
    // numpy.linspace(0, 1, n): i * step, the last point exactly 1.
    const double ramp = (n > 1) ? (i == n - 1 ? 1.0 : i * (1.0 / (n - 1))) : 0.0;
    out[i] = std::pow(max_inv_rho + ramp * (min_inv_rho - max_inv_rho), kRho);
  }
  return out;
}

double sigma_to_t(double sigma, const std::vector<float>& log_sigmas) {
  const double log_sigma = std::log(std::max(sigma, 1e-10));
  const int n = static_cast<int>(log_sigmas.size());
  // The last index whose log sigma is <= log_sigma (0 when there is none), at most n - 2.
  int low = 0;
  for (int j = 0; j < n; ++j) {
    if (log_sigma - static_cast<double>(log_sigmas[j]) >= 0) low = j;
  }
  low = std::min(low, n - 2);
  const float lo = log_sigmas[low];
  const float hi = log_sigmas[low + 1];
  const float span = lo - hi;  // float32 in numpy too (both operands float32)
  double w = (static_cast<double>(lo) - log_sigma) / static_cast<double>(span);
  w = std::clamp(w, 0.0, 1.0);
  return (1.0 - w) * low + w * (low + 1);
}

std::string spacing_or(const SchedulerConfig& config, const char* fallback) {
  return config.timestep_spacing.empty() ? std::string(fallback) : config.timestep_spacing;
}

std::vector<int> discrete_timesteps(const SchedulerConfig& config, int steps) {
  const int train = config.num_train_timesteps;
  const std::string spacing = spacing_or(config, "leading");
  std::vector<int> ts;
  if (spacing == "linspace") {
    const double step = steps > 1 ? static_cast<double>(train - 1) / (steps - 1) : 0.0;
    for (int i = 0; i < steps; ++i) {
      const double v = (i == steps - 1 && steps > 1) ? train - 1 : i * step;
      ts.push_back(static_cast<int>(round_half_even(v)));
    }
  } else if (spacing == "leading") {
    const int ratio = train / steps;
    for (int i = 0; i < steps; ++i) ts.push_back(i * ratio + config.steps_offset);
  } else {  // trailing: round(arange(train, 0, -train / steps)) - 1, already descending
    const double step = static_cast<double>(train) / steps;
    const auto len = static_cast<int>(std::ceil(train / step));
    const double second = train - step;
    const double delta = second - train;
    for (int i = 0; i < len; ++i) {
      const double v = i == 0 ? train : i == 1 ? second : train + i * delta;
      ts.push_back(static_cast<int>(round_half_even(v)) - 1);
    }
    return ts;
  }
  std::reverse(ts.begin(), ts.end());  // linspace and leading were built ascending
  return ts;
}

namespace {

// numpy.linspace(0, stop, num) in float64 (the last point exactly `stop`).
std::vector<double> np_linspace(double stop, int num) {
  std::vector<double> out(num);
  if (num == 1) {
    out[0] = 0.0;
    return out;
  }
  const double step = stop / (num - 1);
  for (int i = 0; i < num; ++i) out[i] = i * step;
  out[num - 1] = stop;
  return out;
}

// numpy.arange(start, 0, -step) for a float step: numpy fills start + i * delta with delta
// recomputed from the first two values.
std::vector<double> np_arange_down(double start, double step) {
  const auto len = static_cast<int64_t>(std::ceil(start / step));
  std::vector<double> out;
  const double second = start + -step;
  const double delta = second - start;
  for (int64_t i = 0; i < len; ++i) {
    out.push_back(i == 0 ? start : i == 1 ? second : start + static_cast<double>(i) * delta);
  }
  return out;
}

}  // namespace

SigmaSchedulePlan euler_family_schedule(const SchedulerConfig& config, int steps, bool karras) {
  const int train = config.num_train_timesteps;
  const std::string spacing = spacing_or(config, "linspace");
  // Timesteps are float32 in diffusers before the sigmas are interpolated at them.
  std::vector<float> ts;
  if (spacing == "linspace") {
    for (double t : np_linspace(train - 1, steps)) ts.push_back(static_cast<float>(t));
    std::reverse(ts.begin(), ts.end());
  } else if (spacing == "leading") {
    const int ratio = train / steps;
    for (int i = steps - 1; i >= 0; --i) {
      ts.push_back(static_cast<float>(i * ratio) + static_cast<float>(config.steps_offset));
    }
  } else {  // trailing
    for (double t : np_arange_down(train, static_cast<double>(train) / steps)) {
      ts.push_back(static_cast<float>(round_half_even(t)) - 1.0f);
    }
  }
  const auto table = train_sigmas(alphas_cumprod(config));
  std::vector<double> sigmas;
  for (float t : ts) sigmas.push_back(interp(t, table));
  std::vector<double> timesteps(ts.begin(), ts.end());
  if (karras) {
    sigmas = karras_sigmas(sigmas.back(), sigmas.front(), static_cast<int>(ts.size()));
    const auto log_sigmas = log_of(table);
    timesteps.clear();
    for (double s : sigmas) {
      timesteps.push_back(static_cast<float>(sigma_to_t(s, log_sigmas)));
    }
  }
  SigmaSchedulePlan plan;
  plan.timesteps = timesteps;
  for (double s : sigmas) plan.sigmas.push_back(static_cast<float>(s));
  plan.sigmas.push_back(0.0f);
  const float max_sigma = *std::max_element(plan.sigmas.begin(), plan.sigmas.end());
  plan.init_noise_sigma =
      (spacing == "leading") ? std::sqrt(max_sigma * max_sigma + 1.0f) : max_sigma;
  return plan;
}

SigmaSchedulePlan multistep_schedule(const SchedulerConfig& config, int steps, bool karras) {
  const int train = config.num_train_timesteps;
  const std::string spacing = spacing_or(config, "linspace");
  std::vector<double> timesteps;
  if (spacing == "linspace") {
    // N + 1 points from 0 to train - 1, descending, the 0 dropped.
    auto pts = np_linspace(train - 1, steps + 1);
    for (int i = steps; i >= 1; --i) timesteps.push_back(round_half_even(pts[i]));
  } else if (spacing == "leading") {
    const int ratio = train / (steps + 1);
    for (int i = steps; i >= 1; --i) {
      timesteps.push_back(static_cast<double>(i * ratio + config.steps_offset));
    }
  } else {  // trailing
    for (double t : np_arange_down(train, static_cast<double>(train) / steps)) {
      timesteps.push_back(round_half_even(t) - 1.0);
    }
  }
  const auto table = train_sigmas(alphas_cumprod(config));
  std::vector<double> sigmas;
  if (karras) {
    // The full training range, not the sigmas at the chosen timesteps.
    sigmas = karras_sigmas(table.front(), table.back(), steps);
    const auto log_sigmas = log_of(table);
    timesteps.clear();
    for (double s : sigmas) timesteps.push_back(round_half_even(sigma_to_t(s, log_sigmas)));
  } else {
    for (double t : timesteps) sigmas.push_back(interp(t, table));
  }
  SigmaSchedulePlan plan;
  plan.timesteps = timesteps;
  for (double s : sigmas) plan.sigmas.push_back(static_cast<float>(s));
  plan.sigmas.push_back(0.0f);  // final_sigmas_type "zero"
  plan.init_noise_sigma = 1.0;
  return plan;
}

VpMultistepSampler::VpMultistepSampler(const SchedulerConfig& config, int steps, bool karras)
    : prediction_type_(config.prediction_type) {
  const auto plan = multistep_schedule(config, steps, karras);
  timesteps_ = plan.timesteps;
  sigmas_ = plan.sigmas;
}

VeSampler::VeSampler(const SchedulerConfig& config, const SigmaSchedulePlan& plan)
    : sigmas_(plan.sigmas), prediction_type_(config.prediction_type) {
  timesteps_ = plan.timesteps;
  init_noise_sigma_ = plan.init_noise_sigma;
}

torch::Tensor VeSampler::scale_model_input(const torch::Tensor& sample, int eval_index) {
  check_index(eval_index);
  const float sigma = eval_sigma(eval_index);
  return sample / std::sqrt(sigma * sigma + 1.0f);
}

torch::Tensor VeSampler::add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                                   int eval_index) const {
  check_index(eval_index);
  return x0 + noise * eval_sigma(eval_index);
}

torch::Tensor VpMultistepSampler::add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                                            int eval_index) const {
  check_index(eval_index);
  const AlphaSigma as = vp_alpha_sigma(sigmas_[eval_index]);
  return as.alpha * x0 + as.sigma * noise;
}

torch::Tensor ddpm_add_noise(const std::vector<float>& alphas_cumprod, int t,
                             const torch::Tensor& x0, const torch::Tensor& noise) {
  const float a = alphas_cumprod.at(static_cast<size_t>(t));
  return std::sqrt(a) * x0 + std::sqrt(1.0f - a) * noise;
}

float round_to(float value, torch::ScalarType dtype) {
  if (dtype == torch::kHalf) return static_cast<float>(c10::Half(value));
  if (dtype == torch::kBFloat16) return static_cast<float>(c10::BFloat16(value));
  return value;
}

torch::Tensor ve_denoised(const std::string& prediction_type, const torch::Tensor& sample,
                          const torch::Tensor& model_output, float sigma) {
  if (prediction_type == "v_prediction") {
    const float c_out = -sigma / std::sqrt(sigma * sigma + 1.0f);
    const float c_skip = sigma * sigma + 1.0f;
    return model_output * c_out + sample / c_skip;
  }
  return sample - sigma * model_output;
}

torch::Tensor vp_denoised(const std::string& prediction_type, const torch::Tensor& sample,
                          const torch::Tensor& model_output, float sigma) {
  const AlphaSigma as = vp_alpha_sigma(sigma);
  if (prediction_type == "v_prediction") return as.alpha * sample - as.sigma * model_output;
  return (sample - as.sigma * model_output) / as.alpha;
}

}  // namespace samplers
}  // namespace sdserve::pipeline
