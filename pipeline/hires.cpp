// The hires fix's second pass: latent upscaling and the switch from the first pass to the second
// within one trajectory, so the engine keeps stepping it beside every other row.
#include "pipeline/hires.h"

#include "pipeline/errors.h"
#include "pipeline/validate.h"

namespace sdserve::pipeline {
namespace {

std::unique_ptr<Sampler> sampler_for(const ImageSpec& spec, const SchedulerConfig& config) {
  return make_sampler(spec.sampler,
                      spec.scheduler == "karras" ? SigmaSchedule::kKarras : SigmaSchedule::kNormal,
                      spec.steps, config);
}

// The second pass's first evaluation: diffusers' get_timesteps skips the first steps -
// int(steps x strength) steps, order() evaluations each (as image to image).
int first_eval(const ImageSpec& second, const Sampler& sampler) {
  return (second.steps - second_pass_steps_that_run(second)) * sampler.order();
}

}  // namespace

torch::Tensor upscale_latents(const torch::Tensor& latents, const std::string& upscaler,
                              int64_t height, int64_t width) {
  const std::vector<int64_t> size = {height, width};
  // The sizes alone set the scale (no scale factors), as interpolate(size=...) does; bilinear
  // and bicubic without corner alignment, interpolate's default.
  if (upscaler == "Latent") return at::upsample_bilinear2d(latents, size, false);
  if (upscaler == "Latent (antialiased)") return at::_upsample_bilinear2d_aa(latents, size, false);
  if (upscaler == "Latent (bicubic)") return at::upsample_bicubic2d(latents, size, false);
  if (upscaler == "Latent (bicubic antialiased)")
    return at::_upsample_bicubic2d_aa(latents, size, false);
  if (upscaler == "Latent (nearest)") return at::upsample_nearest2d(latents, size);
  if (upscaler == "Latent (nearest-exact)") return at::_upsample_nearest_exact2d(latents, size);
  throw RequestError("hires.upscaler", hires_rule("hires.upscaler"));
}

int second_pass_evals(const Model::Impl& impl, const ImageSpec& spec) {
  const ImageSpec second = second_pass_spec(spec);
  const auto sampler = sampler_for(second, impl.scheduler);
  return sampler->num_evals() - first_eval(second, *sampler);
}

void plan_second_pass(const Model::Impl& impl, Trajectory::State& state) {
  Trajectory::State::SecondPass pass;
  pass.spec = second_pass_spec(state.spec);
  pass.size = hires_size(state.spec);
  pass.upscaler = state.spec.hires->upscaler;
  pass.evals = second_pass_evals(impl, state.spec);
  state.second_pass = std::move(pass);
}

void begin_second_pass(Model::Impl& impl, Trajectory::State& state) {
  const Trajectory::State::SecondPass pass = std::move(*state.second_pass);
  state.second_pass.reset();
  const HiresSize& size = pass.size;
  // The first pass's latents as diffusers' output_type="latent" gives them (float32, unscaled),
  // upscaled, then cropped as A1111 crops them to a hires.width x hires.height of another aspect.
  const auto upscaled = upscale_latents(state.latent, pass.upscaler, size.upscaled_height / 8,
                                        size.upscaled_width / 8)
                            .narrow(2, size.crop_top / 8, size.height / 8)
                            .narrow(3, size.crop_left / 8, size.width / 8);
  state.earlier_evals += state.evals_done - state.first_eval;
  state.spec = pass.spec;
  state.sampler = sampler_for(pass.spec, impl.scheduler);
  // A fresh generator with the image's seed: its first draw is the noise (diffusers' img2img
  // given latents encodes nothing, so draws nothing before it), later ones the ancestral noise.
  state.generator = at::detail::createCPUGenerator(pass.spec.seed);
  const auto noise =
      torch::randn(upscaled.sizes(), state.generator, torch::TensorOptions().dtype(torch::kFloat32))
          .to(impl.device);
  const int first = first_eval(pass.spec, *state.sampler);
  state.latent = state.sampler->add_noise(upscaled.contiguous(), noise, first);
  state.sampler->start_at(first);
  state.evals_done = state.first_eval = first;
  // last_input / last_eps stay the first pass's last: a preview now shows its prediction.
}

}  // namespace sdserve::pipeline
