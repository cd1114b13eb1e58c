// The request limits and the one place they are checked. Torch-free; the server's JSON layer uses
// rule() for its type errors, the engine calls validate() when a job is submitted, the model
// calls it again before it runs an image (the same function, as a precondition).
#pragma once

#include <string>
#include <vector>

#include "pipeline/pipeline.h"

namespace sdserve::pipeline {

struct Limits {
  static constexpr int kMinSide = 64, kMaxSide = 2048, kSideMultiple = 8;
  static constexpr int kMaxConditioningSide = 8192;  // SDXL's original/target size and crop
  static constexpr int kMaxSteps = 150;
  static constexpr double kMaxGuidanceScale = 30;
  static constexpr int kMaxImages = 16;
  static constexpr int kMaxMaskBlur = 64;  // pixels (A1111's slider stops at 64)
};

// A width or height the pipeline takes: a multiple of kSideMultiple in [kMinSide, kMaxSide].
inline bool valid_side(int side) {
  return side >= Limits::kMinSide && side <= Limits::kMaxSide && side % Limits::kSideMultiple == 0;
}

// The sentence an error about `field` starts with, e.g. "width must be a multiple of 8 between 64
// and 2048". `text_layers` bounds clip_skip (the model's; SD 1.x has 12).
std::string rule(const std::string& field, int text_layers = 12);

// Each throws RequestError naming the first field that is out of range.
// width, height, the size conditioning, steps, guidance_scale, sampler, scheduler, hires.*
void validate(const ImageSpec& spec);
// + num_images and clip_skip (1..text_layers, the model's text-encoder depth).
void validate(const GenerateRequest& request, int text_layers);

// The hires fix's fields (hires_spec.cpp): validate(ImageSpec) and rule() call these.
void validate_hires(const ImageSpec& spec);
std::string hires_rule(const std::string& field);  // "hires", "hires.scale", ...

// " (got 65)": the rejected value, for messages.
std::string got(long long value);
std::string got(double value);

}  // namespace sdserve::pipeline
