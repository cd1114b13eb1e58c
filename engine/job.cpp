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
  }
  return "unknown";
}

bool is_final(EventType t) {
  return t == EventType::kSucceeded || t == EventType::kFailed || t == EventType::kCancelled ||
         t == EventType::kExpired;
}

bool is_final(JobStatus s) {
  return s != JobStatus::kQueued && s != JobStatus::kRunning;
}

}  // namespace sdserve::engine
