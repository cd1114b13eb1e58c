#include "pipeline/validate.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "pipeline/errors.h"
#include "pipeline/sampler_names.h"

namespace sdserve::pipeline {

std::string rule(const std::string& field, int text_layers) {
  using L = Limits;
  const auto range = [](auto lo, auto hi) {
    return " between " + nlohmann::json(lo).dump() + " and " + nlohmann::json(hi).dump();
  };
  if (field == "width" || field == "height")
    return field + " must be a multiple of " + std::to_string(L::kSideMultiple) +
           range(L::kMinSide, L::kMaxSide);
  if (field == "original_size.width" || field == "original_size.height" ||
      field == "target_size.width" || field == "target_size.height")
    return field + " must be an integer" + range(0, L::kMaxConditioningSide) +
           " (0: the image's own size)";
  if (field == "crops_coords_top_left.top" || field == "crops_coords_top_left.left")
    return field + " must be an integer" + range(0, L::kMaxConditioningSide);
  if (field == "original_size" || field == "target_size")
    return field + " must be an object {\"width\": W, \"height\": H}, each an integer" +
           range(0, L::kMaxConditioningSide) + " (0: the image's own size), or absent";
  if (field == "crops_coords_top_left")
    return field + " must be an object {\"top\": T, \"left\": L}, each an integer" +
           range(0, L::kMaxConditioningSide) + ", or absent";
  if (field == "steps") return "steps must be an integer" + range(1, L::kMaxSteps);
  if (field == "guidance_scale")
    return "guidance_scale must be a number" + range(0, static_cast<int>(L::kMaxGuidanceScale));
  if (field == "strength")
    return "strength must be a number between 0 and 1, with int(steps x strength) at least 1 "
           "(the steps that run)";
  if (field == "mask_blur" || field == "mask_blur_x" || field == "mask_blur_y")
    return field + " must be an integer" + range(0, L::kMaxMaskBlur) + " (pixels)";
  if (field == "resize_mode")
    return "resize_mode must be 0 (just resize), 1 (crop and resize) or 2 (resize and fill)";
  if (field == "inpainting_fill")
    return "inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent "
           "nothing)";
  if (field == "inpaint_full_res_padding")
    return "inpaint_full_res_padding must be an integer" + range(0, L::kMaxSide) + " (pixels)";
  if (field == "inpaint_full_res" || field == "inpainting_mask_invert" ||
      field == "inpaint_paste_back" || field == "resize_mask")
    return field + " must be true or false (or 1 or 0)";
  if (field == "hires" || field.rfind("hires.", 0) == 0) return hires_rule(field);
  if (field == "num_images") return "num_images must be an integer" + range(1, L::kMaxImages);
  if (field == "clip_skip") return "clip_skip must be an integer" + range(1, text_layers);
  if (field == "sampler") return "sampler must be a string naming one of " + known_sampler_list();
  if (field == "scheduler") return "scheduler must be one of normal, karras";
  if (field == "prompt_syntax")
    return "prompt_syntax must be \"a1111\" (weights, BREAK, long prompts in chunks) or "
           "\"none\" (the text as it is, cut at 75 tokens, as diffusers)";
  return field + " is invalid";
}

std::string got(long long value) {
  return " (got " + std::to_string(value) + ")";
}

std::string got(double value) {
  return " (got " + (std::isfinite(value) ? nlohmann::json(value).dump() : "not finite") + ")";
}

void validate(const ImageSpec& spec) {
  using L = Limits;
  for (const auto& [field, side] : {std::pair{"width", spec.width}, {"height", spec.height}})
    if (!valid_side(side))
      throw RequestError(field, rule(field) + got(static_cast<long long>(side)));
  // SDXL's size conditioning: numbers the UNet embeds, not sizes it computes at.
  for (const auto& [field, value] : {std::pair{"original_size.width", spec.original_width},
                                     {"original_size.height", spec.original_height},
                                     {"crops_coords_top_left.top", spec.crop_top},
                                     {"crops_coords_top_left.left", spec.crop_left},
                                     {"target_size.width", spec.target_width},
                                     {"target_size.height", spec.target_height}})
    if (value < 0 || value > L::kMaxConditioningSide)
      throw RequestError(field, rule(field) + got(static_cast<long long>(value)));
  if (spec.steps < 1 || spec.steps > L::kMaxSteps)
    throw RequestError("steps", rule("steps") + got(static_cast<long long>(spec.steps)));
  if (!(spec.guidance_scale >= 0 && spec.guidance_scale <= L::kMaxGuidanceScale))
    throw RequestError("guidance_scale", rule("guidance_scale") + got(spec.guidance_scale));
  if (spec.init_image) {
    if (!(spec.strength >= 0 && spec.strength <= 1) || steps_that_run(spec) < 1)
      throw RequestError("strength", rule("strength") + got(spec.strength) + ", steps " +
                                         std::to_string(spec.steps));
    const auto& image = *spec.init_image;
    if (image.width != spec.width || image.height != spec.height ||
        image.pixels.size() != static_cast<size_t>(image.width) * image.height * 3)
      throw RequestError("init_image", "init_image is " + std::to_string(image.width) + "x" +
                                           std::to_string(image.height) + ", the request " +
                                           std::to_string(spec.width) + "x" +
                                           std::to_string(spec.height) +
                                           " (resize it first: server/init_image.h)");
  }
  if (spec.mask) {
    if (!spec.init_image) throw RequestError("mask", "mask needs an init_image to repaint");
    const auto& mask = *spec.mask;
    if (mask.width != spec.width || mask.height != spec.height ||
        mask.pixels.size() != static_cast<size_t>(mask.width) * mask.height)
      throw RequestError("mask", "mask is " + std::to_string(mask.width) + "x" +
                                     std::to_string(mask.height) + ", the request " +
                                     std::to_string(spec.width) + "x" +
                                     std::to_string(spec.height) + " (prepare_inpaint fits it)");
  }
  if (spec.overlay) {
    const auto& o = *spec.overlay;
    const auto& p = o.original;
    if (p.pixels.size() != static_cast<size_t>(p.width) * p.height * 3 ||
        o.alpha.width != p.width || o.alpha.height != p.height || o.w < 1 || o.h < 1 || o.x < 0 ||
        o.y < 0 || o.x + o.w > p.width || o.y + o.h > p.height)
      throw RequestError("mask", "the paste-back region does not fit the picture");
  }
  const SamplerChoice choice = resolve_sampler(spec.sampler, spec.scheduler);
  if (choice.sampler != spec.sampler || choice.scheduler != spec.scheduler)
    throw RequestError("sampler", "sampler '" + spec.sampler + "' / scheduler '" + spec.scheduler +
                                      "' must be canonical (use resolve_sampler first)");
  validate_hires(spec);
}

int steps_that_run(const ImageSpec& spec) {
  if (!spec.init_image) return spec.steps;
  // As diffusers' get_timesteps: int() of the double product (12 x 0.3 runs 3 steps).
  return std::min(static_cast<int>(spec.steps * spec.strength), spec.steps);
}

void validate(const GenerateRequest& request, int text_layers) {
  validate(request.image);
  if (request.num_images < 1 || request.num_images > Limits::kMaxImages)
    throw RequestError("num_images",
                       rule("num_images") + got(static_cast<long long>(request.num_images)));
  if (request.clip_skip < 1 || request.clip_skip > text_layers)
    throw RequestError("clip_skip", rule("clip_skip", text_layers) +
                                        got(static_cast<long long>(request.clip_skip)));
}

}  // namespace sdserve::pipeline
