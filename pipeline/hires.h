// The hires fix's second pass (internal header, torch): pipeline.cpp hooks these into begin(),
// step() and evals_total(); the parity tests call upscale_latents() on its own.
#pragma once

#include <torch/torch.h>

#include <string>

#include "pipeline/model_impl.h"

namespace sdserve::pipeline {

// (B, C, h, w) latents interpolated to (B, C, height, width) as A1111's latent upscaler
// `upscaler` (one of hires_upscalers()) does it: torch's interpolate in its mode, with antialias
// where the name says so. Throws RequestError("hires.upscaler") for another name.
torch::Tensor upscale_latents(const torch::Tensor& latents, const std::string& upscaler,
                              int64_t height, int64_t width);
// The evaluations the second pass of `spec` (hires set) takes.
int second_pass_evals(const Model::Impl& impl, const ImageSpec& spec);
// begin(): notes the second pass in the new trajectory's state.
void plan_second_pass(const Model::Impl& impl, Trajectory::State& state);
// step(), once the first pass's last evaluation is done: the latents upscaled (and cropped),
// noised with a fresh generator seeded as the first pass's, and the second pass's sampler set to
// start where its strength says.
void begin_second_pass(Model::Impl& impl, Trajectory::State& state);

}  // namespace sdserve::pipeline
