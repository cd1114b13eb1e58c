// What a job is: the validated request, its state, and the events it emits. Torch-free.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/pipeline.h"

namespace sdserve::engine {

enum class JobStatus { kQueued, kRunning, kSucceeded, kFailed, kCancelled, kExpired };
enum class Priority { kHigh = 0, kNormal = 1, kLow = 2 };

std::string to_string(JobStatus s);  // "queued", "running", ...
std::string to_string(Priority p);   // "high", "normal", "low"
bool is_final(JobStatus s);

struct PreviewOptions {
  int every = 1;                      // a preview every N steps
  std::string format = "jpeg";        // "jpeg" | "png"
  int max_size = 256;                 // longest side in pixels
  std::string method = "latent2rgb";  // "latent2rgb" (cheap) | "vae" (full decode)
};

// A request after validation (the server validates fields and names them in its errors).
struct JobRequest {
  std::string prompt;
  std::string negative_prompt;
  int width = 512;
  int height = 512;
  int steps = 30;
  double guidance_scale = 7.5;
  std::string sampler = "euler";     // canonical name (pipeline::resolve_sampler)
  std::string scheduler = "normal";  // "normal" | "karras"
  std::optional<uint64_t> seed;      // absent: the engine picks one and reports it
  int num_images = 1;
  int clip_skip = 1;
  std::optional<PreviewOptions> preview;
  Priority priority = Priority::kNormal;
  std::optional<double> timeout_s;  // absent: the configured default
  bool cancel_on_disconnect = false;
};

using Clock = std::chrono::system_clock;

// The pipeline's settings for image k of a request (seed + k; a request without a seed yet
// uses 0).
pipeline::ImageSpec image_spec(const JobRequest& request, int k = 0);

// A consistent copy of a job's state at one moment.
struct JobSnapshot {
  std::string id;
  JobStatus status = JobStatus::kQueued;
  int queue_position = -1;  // 0-based among queued jobs; -1 when not queued
  int step = 0;             // model evaluations done (summed over the job's images / images)
  int steps = 0;            // model evaluations per image
  uint64_t seed = 0;        // of image 0; image k used seed + k
  int images_ready = 0;
  std::optional<Clock::time_point> queued_at, started_at, finished_at;
  std::string error;             // when failed
  bool results_expired = false;  // images evicted from the result store (answer 410)
  JobRequest request;
};

// One event of a job, as the WebSocket sends it: a JSON text frame, optionally followed by one
// binary frame (previews).
struct JobEvent {
  std::string job_id;
  std::string type;  // queued, started, progress, preview, succeeded, failed, cancelled, expired
  std::string json;  // the complete text frame, {"type": ..., "job_id": ..., ...}
  std::shared_ptr<const std::vector<uint8_t>> binary;  // preview bytes, or null
  bool droppable = false;  // previews and progress may be dropped for a slow reader; the rest not
};

}  // namespace sdserve::engine
