// What a job is: the validated request, its state, and the events it emits. Torch-free.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pipeline/pipeline.h"

namespace sdserve::engine {

// kExpired: waited in the queue past timeout_s; kTimedOut: ran (from its first image's start)
// past max_run_s, stopped between UNet steps, its images discarded.
enum class JobStatus { kQueued, kRunning, kSucceeded, kFailed, kCancelled, kExpired, kTimedOut };
enum class Priority { kHigh = 0, kNormal = 1, kLow = 2 };

// 32 hex digits, 128 bits from the operating system's CSPRNG (std::random_device reads
// getrandom/urandom on Linux): job ids (without API keys, a job id is all that stands between one
// user's job and another's) and the request ids the server makes. Thread-safe.
std::string random_id();
// Seconds as a person writes them: 3600, 0.5 (printf's %g).
std::string seconds_text(double s);

std::string to_string(JobStatus s);  // "queued", "running", ...
std::string to_string(Priority p);   // "high", "normal", "low"
bool is_final(JobStatus s);

struct PreviewOptions {
  int every = 1;                      // a preview every N steps
  std::string format = "jpeg";        // "jpeg" | "png"
  int max_size = 256;                 // longest side in pixels
  std::string method = "latent2rgb";  // "latent2rgb" (cheap) | "vae" (full decode)
};

// A generation request as the engine takes it; validate() checks it.
struct JobRequest {
  // The checkpoint, by its models-folder name (engine/model_catalog.h; the server resolves what
  // clients send); "": the default model.
  std::string model;
  // LoRAs, by their models-folder names (the server resolved them: the prompt's <lora:...> tags
  // in A1111's syntax, then the request's `loras`), with the file the engine loads and its hash
  // (A1111's addnet SHA-256: the PNG's "Lora hashes" and the embedding cache's key).
  struct Lora {
    std::string name, path, sha256;
    double te_weight = 1.0, unet_weight = 1.0;
    std::shared_ptr<const pipeline::Lora> file;  // read by Engine::submit()
    bool text_encoder = false;                   // it adapts the text encoders (ditto)
  };
  std::vector<Lora> loras;
  std::string prompt;
  std::string negative_prompt;
  int width = 512;  // parse_job_request starts from the model's native size
  int height = 512;
  // SDXL's size conditioning (pipeline::ImageSpec; 0: diffusers' defaults).
  int original_width = 0, original_height = 0;
  int crop_top = 0, crop_left = 0;
  int target_width = 0, target_height = 0;
  int steps = 30;
  double guidance_scale = 7.5;
  std::string sampler = "euler";     // canonical name (pipeline::resolve_sampler)
  std::string scheduler = "normal";  // "normal" | "karras"
  std::optional<uint64_t> seed;      // absent: the engine picks one and reports it
  int num_images = 1;
  int clip_skip = 1;
  // A1111's weighting syntax and long prompts in chunks, or the text as it is (pipeline.h).
  pipeline::PromptSyntax prompt_syntax = pipeline::PromptSyntax::kA1111;
  // Image to image: the picture to start from, already width x height (the server decodes and
  // resizes it), and the part of the schedule that runs (pipeline::ImageSpec). Null: txt2img.
  std::shared_ptr<const pipeline::RgbImage> init_image;
  double strength = 0.8;
  // Inpainting: the mask at width x height (255 = repaint) and the paste back, prepared by the
  // server (pipeline::prepare_inpaint); `inpaint` is what the client asked for (blur, fill, ...).
  std::shared_ptr<const pipeline::GrayImage> mask;
  std::shared_ptr<const pipeline::InpaintOverlay> overlay;
  pipeline::InpaintOptions inpaint;
  bool resize_mask = false;  // the mask was another size than the picture, and resized to it
  // The hires fix (pipeline::HiresSpec): a second pass at a larger size in the same job; width x
  // height is the first pass's. Absent: one pass.
  std::optional<pipeline::HiresSpec> hires;
  std::optional<PreviewOptions> preview;
  Priority priority = Priority::kNormal;
  std::optional<double> timeout_s;  // absent: the configured default
  // Running time allowed (from the job's start), at most the service's max_run_s; absent: that.
  std::optional<double> max_run_s;
  bool cancel_on_disconnect = false;
  std::string request_id;  // the HTTP request that submitted it (X-Request-Id), for logs
};

// LoRAs one request may use, tags and `loras` together.
constexpr size_t kMaxLoras = 16;

// What the limits of some fields depend on: the model and the service's configuration.
struct RequestBounds {
  int text_layers = 12;  // clip_skip may be 1..text_layers
  double max_timeout_s = 3600;
  double max_run_s = 3600;  // the largest max_run_s a request may ask for (the service's)
  int native_size = 512;    // width and height default to it (the model's)
};

// The sentence users read when `field` is rejected ("steps must be an integer between 1 and
// 150"): the pipeline's rules for the image fields, the engine's for preview.*, priority, seed,
// timeout_s and cancel_on_disconnect. `steps` bounds preview.every.
std::string rule(const std::string& field, const RequestBounds& bounds, int steps = 30);

// The one check of a request's values (the server's JSON layer checks only types, with the
// same rules): pipeline::validate() for the image, then previews and the timeout. Throws
// pipeline::RequestError naming the field.
void validate(const JobRequest& request, const RequestBounds& bounds);

// Sampler steps done, from model evaluations done (heun takes two per step but the last): what
// users count in. Reaches `steps` exactly when the evaluations are all done.
int steps_done(int evaluations, int evaluations_total, int steps);

// Wall-clock time, for the times users see (queued_at...); durations use steady_clock.
using WallClock = std::chrono::system_clock;

// The request's LoRAs as the pipeline takes them (those the engine has read).
std::vector<pipeline::LoraUse> lora_uses(const JobRequest& request);

// The pipeline's settings for image k of a request (seed + k; a request without a seed yet
// uses 0).
pipeline::ImageSpec image_spec(const JobRequest& request, int k = 0);
// The sizes the request's UNet calls run at (the first pass's, then the hires fix's second when
// it differs) and the size its images end at (and are decoded at).
std::vector<std::pair<int, int>> pass_sizes(const JobRequest& request);
std::pair<int, int> final_size(const JobRequest& request);

// When a job was queued, started and finished.
struct JobTimes {
  WallClock::time_point queued_at;
  std::optional<WallClock::time_point> started_at, finished_at;
};

// A consistent copy of a job's state at one moment.
struct JobSnapshot {
  std::string id;
  JobStatus status = JobStatus::kQueued;
  int queue_position = -1;    // 0-based among queued jobs; -1 when not queued
  int steps = 0;              // sampler steps per image, as requested
  int evaluations = 0;        // model evaluations done per image (mean over the job's images)
  int evaluations_total = 0;  // per image (heun: 2 per step but the last); 0 until it runs
  uint64_t seed = 0;          // of image 0; image k used seed + k
  int images_ready = 0;
  JobTimes times;
  std::string error;             // when failed
  bool results_evicted = false;  // images evicted from the result store (answer 410)
  JobRequest request;
};

enum class EventType {
  kQueued,
  kStarted,
  kProgress,
  kPreview,
  kSucceeded,
  kFailed,
  kCancelled,
  kExpired,
  kTimedOut
};
std::string to_string(EventType t);  // "queued", "started", "progress", ...
bool is_final(EventType t);          // succeeded, failed, cancelled, expired, timed_out

// One event of a job, as data: the server renders it (JSON for WebSockets, in the same shape as
// the job's REST view). Which fields mean something depends on the type.
struct JobEvent {
  std::string job_id;
  EventType type = EventType::kQueued;
  bool droppable = false;   // previews and progress may be dropped for a slow reader; the rest not
  int queue_position = -1;  // queued
  // started, progress, preview: sampler steps per image; model evaluations done and per image
  int steps = 0, evaluations = 0, evaluations_total = 0;
  double it_per_s = 0;                                 // progress
  int image = 0;                                       // preview: image k of the job
  std::string format;                                  // preview: "jpeg" | "png"
  int width = 0, height = 0;                           // preview
  std::shared_ptr<const std::vector<uint8_t>> binary;  // preview bytes
  uint64_t seed = 0;                                   // succeeded: image k used seed + k
  int num_images = 0;                                  // succeeded
  std::string error;  // failed, expired, timed_out; cancelled: the reason, when there is one
  JobTimes times;     // state events (queued, started and the final ones)
};

}  // namespace sdserve::engine
