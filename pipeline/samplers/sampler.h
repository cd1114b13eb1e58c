// Samplers (diffusers' schedulers under ComfyUI's names). A Sampler holds ONE image's
// trajectory state (model-output history, step counter), never the pipeline's, so that images at
// different steps with different samplers can share one UNet batch.
#pragma once

#include <torch/torch.h>

#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <vector>

namespace sdserve::pipeline {

// The model's noise schedule: the keys of a diffusers scheduler_config.json that SD 1.x/2.x use.
struct SchedulerConfig {
  int num_train_timesteps = 1000;
  double beta_start = 0.00085;
  double beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";  // scaled_linear | linear
  std::string prediction_type = "epsilon";      // epsilon | v_prediction
  int steps_offset = 1;
  bool set_alpha_to_one = false;
  // leading | trailing | linspace; empty: each sampler's own diffusers default (leading for pndm
  // and ddim, linspace for the rest). from_json sets it only when the config's value differs
  // from its own class's default: diffusers' from_config drops a key the source scheduler took
  // from its defaults (SD 1.5's config has none, SD 2.x's DDIM one repeats DDIM's "leading"),
  // while SDXL's Euler config asks for "leading" and every sampler follows it.
  std::string timestep_spacing;

  // Defaults as SD 1.5 for absent keys. ModelError for a value we cannot run.
  static SchedulerConfig from_json(const nlohmann::json& config);
};

enum class SigmaSchedule { kNormal, kKarras };

class Sampler {
 public:
  virtual ~Sampler() = default;

  // The timesteps the UNet is called with, one per model evaluation: exactly diffusers'
  // scheduler.timesteps (heun has 2N-1; pndm with skip_prk_steps has N+1).
  const std::vector<double>& timesteps() const { return timesteps_; }
  int num_evals() const { return static_cast<int>(timesteps_.size()); }
  // The initial latents are randn * init_noise_sigma.
  double init_noise_sigma() const { return init_noise_sigma_; }

  // The UNet input for evaluation `eval_index` (stateless: may be called any time). The
  // default is the sample itself (the VP samplers: pndm, ddim, dpmpp_2m, uni_pc).
  virtual torch::Tensor scale_model_input(const torch::Tensor& sample, int eval_index);

  // Advances the trajectory after model evaluation `eval_index` (0-based, called in order) and
  // returns the new sample. `generator` is the image's own CPU generator: ancestral samplers draw
  // torch::randn(sample.sizes(), generator) on the CPU and move it to the sample's device/dtype.
  virtual torch::Tensor step(const torch::Tensor& model_output, int eval_index,
                             const torch::Tensor& sample, at::Generator& generator) = 0;

  // Image to image. Evaluations per step (2 for heun, else 1): a schedule truncated after k steps
  // starts at evaluation k x order(), as diffusers' pipelines index scheduler.timesteps.
  virtual int order() const { return 1; }
  // x0 noised to the level evaluation `eval_index` starts from: diffusers' scheduler.add_noise
  // at timesteps[eval_index] (sigma-space samplers: x0 + noise x sigma; the others in VP form).
  virtual torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                                  int eval_index) const = 0;
  // Skips the evaluations before `eval_index` (before the first step(); set_begin_index in
  // diffusers): the next step() is `eval_index`, and multistep history starts empty there.
  void start_at(int eval_index);
  int first_eval() const { return first_eval_; }

 protected:
  // Throws std::logic_error unless `eval_index` is the next evaluation (a caller bug).
  void advance(int eval_index);
  // Throws std::logic_error unless 0 <= eval_index < num_evals().
  void check_index(int eval_index) const;

  std::vector<double> timesteps_;
  double init_noise_sigma_ = 1.0;

 private:
  int next_eval_ = 0;
  int first_eval_ = 0;
};

// RequestError for an unknown name (listing the known ones), steps < 1, or karras on a sampler
// that has no sigma schedule (pndm, ddim).
std::unique_ptr<Sampler> make_sampler(const std::string& name, SigmaSchedule schedule, int steps,
                                      const SchedulerConfig& config);

// Known names, in the order of pipeline/sampler_names.h's catalogue (the one list of samplers).
std::vector<std::string> sampler_names();

// Which names accept SigmaSchedule::kKarras (from the same catalogue).
bool sampler_accepts_karras(const std::string& name);

}  // namespace sdserve::pipeline
