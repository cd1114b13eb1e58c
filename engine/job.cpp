#include "engine/job.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <random>

#include "pipeline/errors.h"
#include "pipeline/validate.h"

namespace sdserve::engine {

std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

std::string random_id() {
  static std::random_device device;
  static std::mutex mutex;
  static const char* hex = "0123456789abcdef";
  std::string id;
  id.reserve(32);
  std::lock_guard<std::mutex> lock(mutex);
  for (int word = 0; word < 4; ++word) {
    uint32_t bits = device();
    for (int i = 0; i < 8; ++i, bits >>= 4) id += hex[bits & 15];
  }
  return id;
}

std::string to_string(JobStatus s) {
  switch (s) {
    case JobStatus::kQueued:
      return "queued";
    case JobStatus::kRunning:
      return "running";
    case JobStatus::kSucceeded:
      return "succeeded";
    case JobStatus::kFailed:
      return "failed";
    case JobStatus::kCancelled:
      return "cancelled";
    case JobStatus::kExpired:
      return "expired";
    case JobStatus::kTimedOut:
      return "timed_out";
  }
  return "unknown";
}

std::string to_string(Priority p) {
  switch (p) {
    case Priority::kHigh:
      return "high";
    case Priority::kNormal:
      return "normal";
    case Priority::kLow:
      return "low";
  }
  return "normal";
}

std::vector<pipeline::LoraUse> lora_uses(const JobRequest& request) {
  std::vector<pipeline::LoraUse> out;
  for (const auto& l : request.loras)
    if (l.file) out.push_back({l.file, l.unet_weight, l.te_weight});
  return out;
}

pipeline::ImageSpec image_spec(const JobRequest& request, int k) {
  pipeline::ImageSpec spec;
  spec.loras = lora_uses(request);
  spec.width = request.width;
  spec.height = request.height;
  spec.original_width = request.original_width;
  spec.original_height = request.original_height;
  spec.crop_top = request.crop_top;
  spec.crop_left = request.crop_left;
  spec.target_width = request.target_width;
  spec.target_height = request.target_height;
  spec.steps = request.steps;
  spec.guidance_scale = request.guidance_scale;
  spec.sampler = request.sampler;
  spec.scheduler = request.scheduler;
  spec.seed = request.seed.value_or(0) + static_cast<uint64_t>(k);
  spec.init_image = request.init_image;  // shared by the request's images, never copied
  spec.strength = request.strength;
  spec.mask = request.mask;
  spec.masked_content = request.inpaint.fill;
  spec.overlay = request.overlay;
  spec.mask_blur =
      request.inpaint.mask_blur_x == request.inpaint.mask_blur_y ? request.inpaint.mask_blur_x : -1;
  spec.hires = request.hires;
  return spec;
}

std::vector<std::pair<int, int>> pass_sizes(const JobRequest& request) {
  return pipeline::pass_sizes(image_spec(request));
}

std::pair<int, int> final_size(const JobRequest& request) {
  return pipeline::final_size(image_spec(request));
}

std::string rule(const std::string& field, const RequestBounds& bounds, int steps) {
  if (field == "preview.every")
    return "preview.every must be an integer between 1 and " + std::to_string(std::max(1, steps)) +
           " (the steps)";
  if (field == "preview.max_size")
    return "preview.max_size must be an integer between 16 and " +
           std::to_string(pipeline::Limits::kMaxSide);
  if (field == "preview.format") return "preview.format must be one of jpeg, png";
  if (field == "preview.method") return "preview.method must be one of latent2rgb, vae";
  if (field == "preview")
    return "preview must be an object such as {\"every\": 5, \"format\": \"jpeg\", "
           "\"max_size\": 256, \"method\": \"latent2rgb\"}, or absent";
  if (field == "priority") return "priority must be one of high, normal, low";
  if (field == "timeout_s")
    return "timeout_s must be a number greater than 0 and at most " +
           std::to_string(static_cast<long long>(bounds.max_timeout_s));
  if (field == "max_run_s")
    return "max_run_s must be a number greater than 0 and at most " +
           seconds_text(bounds.max_run_s) + " (the service's max_run_s)";
  if (field == "seed")
    return "seed must be an integer between 0 and 18446744073709551615, or -1 for a random one";
  if (field == "cancel_on_disconnect") return "cancel_on_disconnect must be true or false";
  if (field == "prompt" || field == "negative_prompt") return field + " must be a string";
  if (field == "loras")
    return "loras must be a list of at most " + std::to_string(kMaxLoras) +
           " objects {\"name\": NAME, \"weight\": W} (or te_weight and unet_weight), each "
           "weight a number between -100 and 100";
  return pipeline::rule(field, bounds.text_layers);
}

void validate(const JobRequest& request, const RequestBounds& bounds) {
  using pipeline::RequestError;
  pipeline::GenerateRequest g;  // without the prompts, which have no limits to check
  g.clip_skip = request.clip_skip;
  g.num_images = request.num_images;
  g.image = image_spec(request);
  pipeline::validate(g, bounds.text_layers);
  if (const auto& p = request.preview) {
    const auto check_int = [&](const char* field, int v, int lo, int hi) {
      if (v < lo || v > hi)
        throw RequestError(field, rule(field, bounds, request.steps) + pipeline::got(v * 1LL));
    };
    check_int("preview.every", p->every, 1, std::max(1, request.steps));
    check_int("preview.max_size", p->max_size, 16, pipeline::Limits::kMaxSide);
    if (p->format != "jpeg" && p->format != "png")
      throw RequestError("preview.format", rule("preview.format", bounds));
    if (p->method != "latent2rgb" && p->method != "vae")
      throw RequestError("preview.method", rule("preview.method", bounds));
  }
  if (request.loras.size() > kMaxLoras)
    throw RequestError("loras", rule("loras", bounds) +
                                    pipeline::got(static_cast<long long>(request.loras.size())));
  for (const auto& l : request.loras)
    if (!(std::fabs(l.te_weight) <= 100 && std::fabs(l.unet_weight) <= 100))
      throw RequestError("loras", rule("loras", bounds) + " (LoRA " + l.name + ")");
  if (request.timeout_s && !(*request.timeout_s > 0 && *request.timeout_s <= bounds.max_timeout_s))
    throw RequestError("timeout_s", rule("timeout_s", bounds) + pipeline::got(*request.timeout_s));
  if (request.max_run_s && !(*request.max_run_s > 0 && *request.max_run_s <= bounds.max_run_s))
    throw RequestError("max_run_s", rule("max_run_s", bounds) + pipeline::got(*request.max_run_s));
}

int steps_done(int evaluations, int evaluations_total, int steps) {
  if (evaluations_total <= 0) return 0;
  return static_cast<int>(static_cast<int64_t>(std::min(evaluations, evaluations_total)) * steps /
                          evaluations_total);
}

std::string to_string(EventType t) {
  switch (t) {
    case EventType::kQueued:
      return "queued";
    case EventType::kStarted:
      return "started";
    case EventType::kProgress:
      return "progress";
    case EventType::kPreview:
      return "preview";
    case EventType::kSucceeded:
      return "succeeded";
    case EventType::kFailed:
      return "failed";
    case EventType::kCancelled:
      return "cancelled";
    case EventType::kExpired:
      return "expired";
    case EventType::kTimedOut:
      return "timed_out";
  }
  return "unknown";
}

bool is_final(EventType t) {
  return t == EventType::kSucceeded || t == EventType::kFailed || t == EventType::kCancelled ||
         t == EventType::kExpired || t == EventType::kTimedOut;
}

bool is_final(JobStatus s) {
  return s != JobStatus::kQueued && s != JobStatus::kRunning;
}

}  // namespace sdserve::engine
