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

// Now as A1111's job_timestamp ("20261129081500", UTC).
std::string job_timestamp();

// POST /sdapi/v1/txt2img, translated.
struct Txt2Img {
  BodyJson native;  // a /v1/jobs body
  Json echo;        // A1111's "parameters": the request with its defaults filled in
  int batch_size = 1, n_iter = 1;
  bool send_images = true;
  std::string sampler_name;       // as the caller named it ("Euler a"), for info
  std::string scheduler;          // A1111's label ("Automatic", "Karras")
  bool img2img = false;           // POST /sdapi/v1/img2img
  bool hires = false;             // txt2img with enable_hr: /v1's "hires"
  double denoising_strength = 0;  // img2img's, or the hires fix's
};

// Throws ApiError 400 naming the A1111 field: wrong types, unknown fields, and features that
// would change the image and that sdserve lacks (scripts, face restoration, pixel upscalers for
// the hires fix, ...). enable_hr with a latent hr_upscaler becomes /v1's "hires".
// `body`: the request's, from parse_body().
Txt2Img translate_txt2img(const BodyJson& body, const pipeline::ModelInfo* model);

// POST /sdapi/v1/img2img, translated: the txt2img fields as above, plus init_images (one),
// denoising_strength (0.75) as /v1's init_image and strength, resize_mode 0 (just resize, the
// default). Inpainting (mask) and the other resize modes are refused by name until they exist.
Txt2Img translate_img2img(const BodyJson& body, const pipeline::ModelInfo* model);

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
// A checkpoint as A1111 lists it: title "file.safetensors [hash10]", model_name, filename.
struct Checkpoint {
  std::string title, model_name, filename, sha256;
};
Checkpoint checkpoint(const pipeline::ModelInfo& model, const std::string& sha256);
Json sd_models(const std::vector<Checkpoint>& checkpoints);
// GET /sdapi/v1/options, `current` being the caller's checkpoint.
Json options(const Checkpoint& current);

// POST /sdapi/v1/png-info: {"image": "data:image/png;base64,..."} -> {info, items, parameters}
// (A1111's answer: the "parameters" text, every text chunk, and the infotext's fields).
Json png_info(const BodyJson& body);

}  // namespace sdserve::server::a1111
