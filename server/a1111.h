// AUTOMATIC1111's web API (/sdapi/v1/...) on the same engine as /v1, so that A1111 client
// scripts work unchanged. A txt2img body is translated into a /v1 job body and validated by the
// same code (errors name the A1111 field); answers are rendered as A1111 renders them. Fields
// that would change the image and that sdserve does not implement are refused by name, never
// ignored. No networking here: HttpSession calls these.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "server/api_json.h"

namespace sdserve::pipeline {
struct ModelInfo;
}

namespace sdserve::server::a1111 {

// POST /sdapi/v1/txt2img, translated.
struct Txt2Img {
  Json native;  // a /v1/jobs body
  Json echo;    // A1111's "parameters": the request with its defaults filled in
  int batch_size = 1, n_iter = 1;
  bool send_images = true;
  std::string sampler_name;  // as the caller named it ("Euler a"), for info
  std::string scheduler;     // A1111's label ("Automatic", "Karras")
};

// Throws ApiError 400 naming the A1111 field: wrong types, unknown fields, and features that
// would change the image and that sdserve lacks (hires fix, scripts, face restoration, ...).
Txt2Img translate_txt2img(const std::string& body, const pipeline::ModelInfo* model);

// An ApiError about a /v1 field ("guidance_scale") renamed for the A1111 caller ("cfg_scale").
ApiError renamed(const ApiError& e);

// The txt2img answer: {images: [base64 PNG], parameters, info} with info a JSON string.
// `pngs` are the job's images in order; empty for an interrupted job.
// `sha256`: the checkpoint's (Engine::model_sha256; "" while unknown).
Json txt2img_answer(const Txt2Img& t, const engine::JobSnapshot& job,
                    const std::vector<std::shared_ptr<const std::vector<uint8_t>>>& pngs,
                    const pipeline::ModelInfo* model, const std::string& sha256);

Json samplers();
Json schedulers();
Json sd_models(const pipeline::ModelInfo* model, const std::string& sha256);
Json options(const pipeline::ModelInfo* model, const std::string& sha256);

// A PNG's text chunk (tEXt, or uncompressed iTXt) as UTF-8; "" when absent.
std::string png_text(const std::vector<uint8_t>& png, const std::string& key);

// POST /sdapi/v1/png-info: {"image": "data:image/png;base64,..."} -> {info, items, parameters}
// (A1111's answer: the "parameters" text, every text chunk, and the infotext's fields).
Json png_info(const std::string& body);

// Progress of each caller's A1111 jobs, for GET /sdapi/v1/progress and POST .../interrupt. A
// caller is an API key, or a client address where no keys are configured: A1111 has one user,
// sdserve many, and each sees its own jobs. Thread-safe: events arrive on engine threads.
class Tracker {
 public:
  void started(const std::string& caller, const std::string& job_id);
  void event(const engine::JobEvent& e);
  // {progress, eta_relative, state, current_image, textinfo} for the caller's latest job.
  Json progress(const std::string& caller, const engine::Engine* engine) const;
  // The caller's jobs not yet final (for interrupt).
  std::vector<std::string> active_jobs(const std::string& caller,
                                       const engine::Engine* engine) const;

 private:
  struct JobRecord {
    std::string caller;
    int evaluations = 0, evaluations_total = 0, steps = 0;
    std::chrono::steady_clock::time_point started{};
    bool running = false;
    std::shared_ptr<const std::vector<uint8_t>> preview;  // latest step preview (PNG)
  };
  static constexpr size_t kJobsPerCaller = 16;
  static constexpr size_t kCallers = 256;

  mutable std::mutex mutex_;
  std::map<std::string, JobRecord> jobs_;                 // guarded by mutex_
  std::map<std::string, std::deque<std::string>> owned_;  // caller -> job ids, oldest first
  std::deque<std::string> callers_;                       // least recently submitting first
};

}  // namespace sdserve::server::a1111
