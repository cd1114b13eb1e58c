#include "engine/job.h"

namespace sdserve::engine {

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

pipeline::ImageSpec image_spec(const JobRequest& request, int k) {
  pipeline::ImageSpec spec;
  spec.width = request.width;
  spec.height = request.height;
  spec.steps = request.steps;
  spec.guidance_scale = request.guidance_scale;
  spec.sampler = request.sampler;
  spec.scheduler = request.scheduler;
  spec.seed = request.seed.value_or(0) + static_cast<uint64_t>(k);
  return spec;
}

bool is_final(JobStatus s) {
  return s != JobStatus::kQueued && s != JobStatus::kRunning;
}

}  // namespace sdserve::engine
