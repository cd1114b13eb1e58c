// The hires fix's rules, torch-free (the server and the engine check requests and size memory
// with them): A1111's second-pass geometry, the second pass's settings, and the field checks.
#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "pipeline/errors.h"
#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"
#include "pipeline/validate.h"

namespace sdserve::pipeline {
namespace {

// A1111's web UI offers 1..4; a scale outside it is almost surely a mistake (and past 4 nearly
// every first-pass size leaves the 2048 px limit anyway).
constexpr double kMinScale = 1, kMaxScale = 4;
constexpr int kLatentFactor = 8;  // pixels per latent, every family's VAE

std::string upscaler_list() {
  std::string out;
  for (const auto& u : hires_upscalers()) out += (out.empty() ? "" : ", ") + u;
  return out;
}

std::string size_text(int w, int h) {
  return std::to_string(w) + "x" + std::to_string(h);
}

}  // namespace

const std::vector<std::string>& hires_upscalers() {
  static const std::vector<std::string> names = {"Latent",           "Latent (antialiased)",
                                                 "Latent (bicubic)", "Latent (bicubic antialiased)",
                                                 "Latent (nearest)", "Latent (nearest-exact)"};
  return names;
}

HiresSize hires_size(const ImageSpec& spec) {
  const HiresSpec& h = *spec.hires;
  const int w = spec.width, ht = spec.height, rx = h.width, ry = h.height;
  // A1111's calculate_target_resolution, in pixels, then whole latents: interpolate makes
  // (to // 8) latents, and A1111 cuts (to - resize) // 8 of them, half (rounded down) from the
  // left or top.
  int to_x = 0, to_y = 0, cut_x = 0, cut_y = 0;
  if (rx == 0 && ry == 0) {
    to_x = static_cast<int>(w * h.scale);
    to_y = static_cast<int>(ht * h.scale);
  } else if (ry == 0) {
    to_x = rx;
    to_y = rx * ht / w;
  } else if (rx == 0) {
    to_x = ry * w / ht;
    to_y = ry;
  } else {
    if (static_cast<double>(w) / ht < static_cast<double>(rx) / ry) {
      to_x = rx;
      to_y = rx * ht / w;
    } else {
      to_x = ry * w / ht;
      to_y = ry;
    }
    cut_x = (to_x - rx) / kLatentFactor;
    cut_y = (to_y - ry) / kLatentFactor;
  }
  HiresSize s;
  s.upscaled_width = to_x / kLatentFactor * kLatentFactor;
  s.upscaled_height = to_y / kLatentFactor * kLatentFactor;
  s.crop_left = cut_x / 2 * kLatentFactor;
  s.crop_top = cut_y / 2 * kLatentFactor;
  s.width = s.upscaled_width - cut_x * kLatentFactor;
  s.height = s.upscaled_height - cut_y * kLatentFactor;
  return s;
}

ImageSpec second_pass_spec(const ImageSpec& spec) {
  const HiresSpec& h = *spec.hires;
  ImageSpec s = spec;
  const auto size = hires_size(spec);
  s.width = size.width;
  s.height = size.height;
  s.steps = h.steps > 0 ? h.steps : spec.steps;
  if (!h.sampler.empty()) {
    s.sampler = h.sampler;
    s.scheduler = h.scheduler.empty() ? "normal" : h.scheduler;
  }
  s.strength = h.strength;
  s.init_image = nullptr;
  s.hires.reset();
  return s;
}

int second_pass_steps_that_run(const ImageSpec& second_pass) {
  // As diffusers' get_timesteps (steps_that_run's rule for an init image).
  return std::min(static_cast<int>(second_pass.steps * second_pass.strength), second_pass.steps);
}

int steps_in_all_passes(const ImageSpec& spec) {
  const int first = steps_that_run(spec);
  return spec.hires ? first + second_pass_steps_that_run(second_pass_spec(spec)) : first;
}

std::pair<int, int> final_size(const ImageSpec& spec) {
  if (!spec.hires) return {spec.width, spec.height};
  const auto s = hires_size(spec);
  return {s.width, s.height};
}

std::vector<std::pair<int, int>> pass_sizes(const ImageSpec& spec) {
  std::vector<std::pair<int, int>> out = {{spec.width, spec.height}};
  if (spec.hires && final_size(spec) != out.front()) out.push_back(final_size(spec));
  return out;
}

std::string hires_rule(const std::string& field) {
  const auto range = [](auto lo, auto hi) {
    return " between " + nlohmann::json(lo).dump() + " and " + nlohmann::json(hi).dump();
  };
  if (field == "hires")
    return "hires must be an object such as {\"scale\": 2, \"upscaler\": \"Latent\", \"steps\": "
           "0, \"strength\": 0.7}, or absent (one pass)";
  if (field == "hires.scale")
    return "hires.scale must be a number" +
           range(static_cast<int>(kMinScale), static_cast<int>(kMaxScale)) +
           " (the second pass's size over the first's, when hires.width and hires.height are 0)";
  if (field == "hires.width" || field == "hires.height")
    return field + " must be 0 (from hires.scale) or an integer" +
           range(Limits::kMinSide, Limits::kMaxSide);
  if (field == "hires.upscaler")
    return "hires.upscaler must be one of " + upscaler_list() +
           " (latent upscalers; pixel upscalers such as ESRGAN or Lanczos are not supported)";
  if (field == "hires.steps")
    return "hires.steps must be an integer" + range(0, Limits::kMaxSteps) +
           " (0: the first pass's steps)";
  if (field == "hires.strength")
    return "hires.strength must be a number between 0 and 1, with int(second-pass steps x "
           "strength) at least 1 (the second pass's steps that run)";
  if (field == "hires.sampler")
    return "hires.sampler must be a string naming one of " + known_sampler_list() +
           ", or absent (the first pass's)";
  if (field == "hires.scheduler") return "hires.scheduler must be one of normal, karras";
  return field + " is invalid";
}

void validate_hires(const ImageSpec& spec) {
  if (!spec.hires) return;
  const HiresSpec& h = *spec.hires;
  if (spec.init_image)
    throw RequestError("hires",
                       "hires (a second pass after text to image) cannot start from an "
                       "init_image; leave one of them out");
  if (!(h.scale >= kMinScale && h.scale <= kMaxScale))
    throw RequestError("hires.scale", hires_rule("hires.scale") + got(h.scale));
  for (const auto& [field, side] : {std::pair{"hires.width", h.width}, {"hires.height", h.height}})
    if (side != 0 && (side < Limits::kMinSide || side > Limits::kMaxSide))
      throw RequestError(field, hires_rule(field) + got(static_cast<long long>(side)));
  const auto size = hires_size(spec);
  for (const auto& [field, side] : {std::pair{"width", size.width}, {"height", size.height}}) {
    if (valid_side(side)) continue;
    // The field that chose the size: the scale, or the resize side that is set.
    const std::string cause = h.width == 0 && h.height == 0 ? "hires.scale"
                              : h.width != 0                ? "hires.width"
                                                            : "hires.height";
    throw RequestError(cause, "the second pass would be " + size_text(size.width, size.height) +
                                  " (from " + size_text(spec.width, spec.height) +
                                  "): its width and height must be" + " between " +
                                  std::to_string(Limits::kMinSide) + " and " +
                                  std::to_string(Limits::kMaxSide) + "; " + hires_rule(cause));
  }
  const auto& names = hires_upscalers();
  if (std::find(names.begin(), names.end(), h.upscaler) == names.end()) {
    const std::string shown =
        h.upscaler.size() > 64 ? h.upscaler.substr(0, 64) + "..." : h.upscaler;
    throw RequestError("hires.upscaler",
                       "hires.upscaler '" + shown + "' is not one of the latent upscalers (" +
                           upscaler_list() +
                           "); pixel upscalers such as ESRGAN or Lanczos are not supported");
  }
  if (h.steps < 0 || h.steps > Limits::kMaxSteps)
    throw RequestError("hires.steps",
                       hires_rule("hires.steps") + got(static_cast<long long>(h.steps)));
  const ImageSpec second = second_pass_spec(spec);
  if (!(h.strength >= 0 && h.strength <= 1) || second_pass_steps_that_run(second) < 1)
    throw RequestError("hires.strength", hires_rule("hires.strength") + got(h.strength) +
                                             ", second-pass steps " + std::to_string(second.steps));
  if (!h.sampler.empty()) {
    SamplerChoice choice;
    try {
      choice = resolve_sampler(h.sampler, h.scheduler);
    } catch (const RequestError& e) {
      const std::string field = e.field() == "scheduler" ? "hires.scheduler" : "hires.sampler";
      throw RequestError(field, field + ": " + e.what());
    }
    if (choice.sampler != h.sampler || choice.scheduler != second.scheduler)
      throw RequestError("hires.sampler", "hires.sampler '" + h.sampler + "' / scheduler '" +
                                              h.scheduler +
                                              "' must be canonical (use resolve_sampler first)");
  } else if (!h.scheduler.empty()) {
    throw RequestError("hires.scheduler",
                       "hires.scheduler needs hires.sampler (without it the second pass runs the "
                       "first pass's sampler and scheduler)");
  }
}

}  // namespace sdserve::pipeline
