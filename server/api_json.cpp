#include "server/api_json.h"

#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>
#include <ctime>
#include <optional>

#include "config/safe_json.h"
#include "pipeline/errors.h"
#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"
#include "pipeline/validate.h"
#include "server/init_image.h"

namespace sdserve::server {
namespace {

using nlohmann::json;

[[noreturn]] void invalid(const std::string& field, const std::string& message) {
  throw ApiError(400, "validation_error", message, field);
}

// Quotes the rejected value briefly; the value may be huge, deep or not valid UTF-8.
std::string got(const json& v) {
  return " (got " + safe_json::describe(v) + ")";
}

// A client's field name in a message: bounded, printable.
std::string quoted_name(const std::string& name) {
  return safe_json::describe(json(name), 40);
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string one_of(const std::vector<std::string>& values) {
  std::string out;
  for (const auto& v : values) out += (out.empty() ? "" : ", ") + v;
  return out;
}

// The JSON layer checks types only; the values are checked by engine::validate(). A type error
// quotes the field's rule from there, so a client reads one sentence per field.
class FieldReader {
 public:
  explicit FieldReader(const engine::RequestBounds& bounds) : bounds_(bounds) {}
  int steps = 30;  // bounds preview.every in messages

  [[noreturn]] void reject(const std::string& field, const json& v) const {
    invalid(field, engine::rule(field, bounds_, steps) + got(v));
  }
  int integer(const json& v, const std::string& field) const {
    if (!v.is_number_integer()) reject(field, v);
    if (v.is_number_unsigned() ? v.get<uint64_t>() > uint64_t{INT_MAX}
                               : v.get<int64_t>() < INT_MIN || v.get<int64_t>() > INT_MAX)
      reject(field, v);  // outside every range
    return static_cast<int>(v.get<int64_t>());
  }
  double number(const json& v, const std::string& field) const {
    if (!v.is_number() || !std::isfinite(v.get<double>())) reject(field, v);
    return v.get<double>();
  }
  std::string string(const json& v, const std::string& field) const {
    if (!v.is_string()) reject(field, v);
    return v.get<std::string>();
  }
  bool boolean(const json& v, const std::string& field) const {
    if (!v.is_boolean()) reject(field, v);
    return v.get<bool>();
  }

 private:
  engine::RequestBounds bounds_;
};

engine::PreviewOptions parse_preview(const json& v, const FieldReader& read) {
  if (!v.is_object()) read.reject("preview", v);
  engine::PreviewOptions p;
  for (const auto& [name, value] : v.items()) {
    const std::string field = "preview." + name;
    if (name == "every") {
      p.every = read.integer(value, field);
    } else if (name == "format") {
      p.format = lower(read.string(value, field));
    } else if (name == "max_size") {
      p.max_size = read.integer(value, field);
    } else if (name == "method") {
      p.method = lower(read.string(value, field));
    } else {
      invalid(field.size() <= 72 ? field : std::string("preview"),
              "unknown field " + quoted_name(field) +
                  "; preview takes every, format, max_size and method");
    }
  }
  return p;
}

// sampler / scheduler: ComfyUI or A1111 names; A1111's may carry the schedule ("... Karras").
void parse_sampler(const json& doc, const FieldReader& read, engine::JobRequest& r) {
  std::string sampler = "euler", scheduler;
  if (doc.contains("scheduler")) scheduler = read.string(doc["scheduler"], "scheduler");
  if (doc.contains("sampler")) sampler = read.string(doc["sampler"], "sampler");
  if (sampler.size() > 64 || scheduler.size() > 64)  // no name is this long; keep echoes short
    invalid(sampler.size() > 64 ? "sampler" : "scheduler",
            "sampler " + quoted_name(sampler) + " / scheduler " + quoted_name(scheduler) +
                " is unknown (see GET /v1/samplers)");
  try {
    const auto choice = pipeline::resolve_sampler(sampler, scheduler);
    r.sampler = choice.sampler;
    r.scheduler = choice.scheduler;
  } catch (const pipeline::RequestError& e) {
    invalid(e.field(), e.what());
  }
}

// hires: the hires fix's second pass (pipeline::HiresSpec; docs/API.md). Its sampler and
// scheduler resolve as the top-level ones: absent, the first pass's; a scheduler alone applies
// to the first pass's sampler.
pipeline::HiresSpec parse_hires(const json& v, const FieldReader& read,
                                const engine::JobRequest& r) {
  if (!v.is_object()) read.reject("hires", v);
  pipeline::HiresSpec h;
  std::optional<std::string> sampler, scheduler;
  for (const auto& [name, value] : v.items()) {
    const std::string field = "hires." + name;
    if (name == "scale") {
      h.scale = read.number(value, field);
    } else if (name == "width") {
      h.width = read.integer(value, field);
    } else if (name == "height") {
      h.height = read.integer(value, field);
    } else if (name == "upscaler") {
      h.upscaler = read.string(value, field);
      // A1111's names, any case: "latent (bicubic)" is "Latent (bicubic)".
      for (const auto& known : pipeline::hires_upscalers())
        if (lower(known) == lower(h.upscaler)) h.upscaler = known;
    } else if (name == "steps") {
      h.steps = read.integer(value, field);
    } else if (name == "strength") {
      h.strength = read.number(value, field);
    } else if (name == "sampler") {
      sampler = read.string(value, field);
    } else if (name == "scheduler") {
      scheduler = read.string(value, field);
    } else {
      invalid(field.size() <= 72 ? field : std::string("hires"),
              "unknown field " + quoted_name(field) +
                  "; hires takes scale, width, height, upscaler, steps, strength, sampler and "
                  "scheduler");
    }
  }
  if (sampler || scheduler) {
    const std::string name = sampler.value_or(r.sampler);
    if (name.size() > 64 || scheduler.value_or("").size() > 64)
      invalid(sampler ? "hires.sampler" : "hires.scheduler",
              "hires.sampler " + quoted_name(name) + " / hires.scheduler " +
                  quoted_name(scheduler.value_or("")) + " is unknown (see GET /v1/samplers)");
    try {
      const auto choice = pipeline::resolve_sampler(name, scheduler.value_or(""));
      h.sampler = choice.sampler;
      h.scheduler = choice.scheduler;
    } catch (const pipeline::RequestError& e) {
      const std::string field = e.field() == "scheduler" ? "hires.scheduler" : "hires.sampler";
      invalid(field, field + ": " + e.what());
    }
  }
  return h;
}

std::optional<uint64_t> parse_seed(const json& s, const FieldReader& read) {
  if (s.is_null()) return std::nullopt;
  if (!s.is_number_integer()) read.reject("seed", s);
  if (s.is_number_unsigned()) return s.get<uint64_t>();
  if (s.get<int64_t>() == -1) return std::nullopt;
  if (s.get<int64_t>() < 0) read.reject("seed", s);
  return static_cast<uint64_t>(s.get<int64_t>());
}

engine::Priority parse_priority(const json& v, const FieldReader& read) {
  const std::string p = lower(read.string(v, "priority"));
  if (p == "high") return engine::Priority::kHigh;
  if (p == "normal") return engine::Priority::kNormal;
  if (p == "low") return engine::Priority::kLow;
  read.reject("priority", v);
}

}  // namespace

std::string error_body(const std::string& type, const std::string& message,
                       const std::string& field) {
  Json err = {{"type", type}, {"message", message}};
  err["field"] = field.empty() ? Json(nullptr) : Json(field);
  return safe_json::dump(Json{{"error", err}});
}

const std::vector<std::string>& request_fields() {
  static const std::vector<std::string> fields = {"prompt",
                                                  "negative_prompt",
                                                  "width",
                                                  "height",
                                                  "steps",
                                                  "guidance_scale",
                                                  "sampler",
                                                  "scheduler",
                                                  "seed",
                                                  "num_images",
                                                  "clip_skip",
                                                  "prompt_syntax",
                                                  "preview",
                                                  "priority",
                                                  "timeout_s",
                                                  "cancel_on_disconnect",
                                                  "original_size",
                                                  "crops_coords_top_left",
                                                  "target_size",
                                                  "max_run_s",
                                                  "init_image",
                                                  "strength",
                                                  "mask",
                                                  "mask_blur",
                                                  "mask_blur_x",
                                                  "mask_blur_y",
                                                  "inpainting_fill",
                                                  "inpaint_full_res",
                                                  "inpaint_full_res_padding",
                                                  "inpainting_mask_invert",
                                                  "inpaint_paste_back",
                                                  "resize_mask",
                                                  "resize_mode",
                                                  "hires",
                                                  "model",
                                                  "vae",
                                                  "loras"};
  return fields;
}

namespace {

// SDXL's size conditioning: {"width": W, "height": H} or {"top": T, "left": L}; an absent or
// null object keeps diffusers' defaults.
void parse_pair(const json& doc, const char* name, const char* first, const char* second,
                const FieldReader& read, int* a, int* b) {
  if (!doc.contains(name) || doc[name].is_null()) return;
  const json& v = doc[name];
  if (!v.is_object()) invalid(name, engine::rule(name, engine::RequestBounds{}));
  for (const auto& [key, value] : v.items()) {
    const std::string field = std::string(name) + "." + key;
    if (key == first) {
      *a = read.integer(value, field);
    } else if (key == second) {
      *b = read.integer(value, field);
    } else {
      invalid(field.size() <= 72 ? field : std::string(name),
              "unknown field " + quoted_name(field) + "; " + name + " takes " + first + " and " +
                  second);
    }
  }
}

// A boolean that A1111 clients also send as 0 or 1.
bool flag(const json& v, const std::string& field, const FieldReader& read) {
  if (v.is_number_integer() && (v.get<int64_t>() == 0 || v.get<int64_t>() == 1))
    return v.get<int64_t>() == 1;
  return read.boolean(v, field);
}

int ranged(const json& v, const std::string& field, int lo, int hi, const FieldReader& read) {
  const int value = read.integer(v, field);
  if (value < lo || value > hi) read.reject(field, v);
  return value;
}

// The inpainting fields (pipeline::InpaintOptions); their defaults are diffusers'.
pipeline::InpaintOptions parse_inpaint(const json& doc, const FieldReader& read) {
  pipeline::InpaintOptions o;
  const auto has = [&](const char* name) { return doc.contains(name) && !doc[name].is_null(); };
  constexpr int kBlur = pipeline::Limits::kMaxMaskBlur;
  if (has("mask_blur"))
    o.mask_blur_x = o.mask_blur_y = ranged(doc["mask_blur"], "mask_blur", 0, kBlur, read);
  if (has("mask_blur_x")) o.mask_blur_x = ranged(doc["mask_blur_x"], "mask_blur_x", 0, kBlur, read);
  if (has("mask_blur_y")) o.mask_blur_y = ranged(doc["mask_blur_y"], "mask_blur_y", 0, kBlur, read);
  if (has("inpainting_fill"))
    o.fill = static_cast<pipeline::MaskedContent>(
        ranged(doc["inpainting_fill"], "inpainting_fill", 0, 3, read));
  if (has("inpaint_full_res"))
    o.only_masked = flag(doc["inpaint_full_res"], "inpaint_full_res", read);
  if (has("inpaint_full_res_padding"))
    o.padding = ranged(doc["inpaint_full_res_padding"], "inpaint_full_res_padding", 0,
                       pipeline::Limits::kMaxSide, read);
  if (has("inpainting_mask_invert"))
    o.invert = flag(doc["inpainting_mask_invert"], "inpainting_mask_invert", read);
  if (has("resize_mode")) {
    const int mode = read.integer(doc["resize_mode"], "resize_mode");
    if (mode == 3)
      invalid("resize_mode",
              "resize_mode 3 (just resize, latent upscale) is not supported; 0 "
              "(just resize), 1 (crop and resize) and 2 (resize and fill) are");
    if (mode < 0 || mode > 2) read.reject("resize_mode", doc["resize_mode"]);
    o.resize_mode = static_cast<pipeline::ResizeMode>(mode);
  }
  if (has("inpaint_paste_back"))
    o.paste_back = flag(doc["inpaint_paste_back"], "inpaint_paste_back", read);
  return o;
}

}  // namespace

BodyJson parse_body(std::string_view body) {
  try {
    return safe_json::parse<BodyJson>(body, safe_json::Limits{safe_json::kMaxDepth, kMaxBodyKeys});
  } catch (const safe_json::Error& e) {
    // A number out of range: valid JSON for a value sdserve cannot hold; name the field.
    if (!e.field().empty())
      throw ApiError(400, "validation_error",
                     quoted_name(e.field()) + " is a number out of range (" + e.what() + ")",
                     e.field().size() <= 72 ? e.field() : e.field().substr(0, 72));
    throw ApiError(400, "invalid_json", std::string("the body is not valid JSON: ") + e.what());
  }
}

engine::JobRequest parse_job_request(const std::string& body, const engine::RequestBounds& bounds) {
  return job_request(parse_body(body), bounds);
}

engine::JobRequest job_request(const BodyJson& doc, const engine::RequestBounds& bounds) {
  if (!doc.is_object())
    throw ApiError(400, "invalid_json",
                   "the body must be a JSON object, e.g. {\"prompt\": \"a cat\"}");
  for (const auto& [name, value] : doc.items()) {
    const auto& known = request_fields();
    if (std::find(known.begin(), known.end(), name) == known.end())
      invalid(name.size() <= 64 ? name : name.substr(0, 64),
              "unknown field " + quoted_name(name) + "; known fields: " + one_of(known));
  }

  FieldReader read(bounds);
  engine::JobRequest r;
  r.width = r.height = bounds.native_size;
  // The server resolved the name (Context::resolve_model) before: here only its type.
  if (doc.contains("model") && !doc["model"].is_null())
    r.model = read.string(doc["model"], "model");
  if (doc.contains("vae") && !doc["vae"].is_null()) {
    const std::string vae = read.string(doc["vae"], "vae");
    if (vae != "auto" && vae != "Automatic" && vae != "None")
      invalid("vae",
              "vae: choosing a VAE per request is not supported yet; use \"auto\" (the "
              "checkpoint's own VAE)");
  }
  if (doc.contains("loras") && !doc["loras"].is_null()) {
    const auto& list = doc["loras"];
    if (!list.is_array() || list.size() > engine::kMaxLoras) read.reject("loras", list);
    for (const auto& item : list) {
      if (!item.is_object() || !item.contains("name")) read.reject("loras", item);
      engine::JobRequest::Lora l;
      for (const auto& [key, value] : item.items()) {
        if (key == "name") {
          l.name = read.string(value, "loras");
        } else if (key == "weight") {
          l.te_weight = l.unet_weight = read.number(value, "loras");
        } else if (key != "te_weight" && key != "unet_weight") {
          invalid("loras", "unknown field " + quoted_name(key.substr(0, 64)) +
                               " in loras; each takes name, weight, te_weight and unet_weight");
        }
      }
      // te_weight / unet_weight override weight, whatever their order in the object.
      if (item.contains("te_weight")) l.te_weight = read.number(item["te_weight"], "loras");
      if (item.contains("unet_weight")) l.unet_weight = read.number(item["unet_weight"], "loras");
      r.loras.push_back(std::move(l));
    }
  }
  if (!doc.contains("prompt")) invalid("prompt", "prompt is required (a string)");
  r.prompt = read.string(doc["prompt"], "prompt");
  if (doc.contains("negative_prompt"))
    r.negative_prompt = read.string(doc["negative_prompt"], "negative_prompt");
  std::optional<pipeline::RgbImage> init;
  if (doc.contains("init_image") && !doc["init_image"].is_null()) {
    init = decode_request_image(read.string(doc["init_image"], "init_image"), "init_image");
    // Without a size the request takes the picture's own (rounded down to a multiple of 8).
    r.width = default_side(init->width);
    r.height = default_side(init->height);
  }
  if (doc.contains("width")) r.width = read.integer(doc["width"], "width");
  if (doc.contains("height")) r.height = read.integer(doc["height"], "height");
  std::optional<pipeline::GrayImage> mask;
  if (doc.contains("mask") && !doc["mask"].is_null()) {
    if (!init) invalid("mask", "mask needs an init_image (the picture to repaint)");
    mask = pipeline::to_gray(decode_request_image(read.string(doc["mask"], "mask"), "mask"));
    const bool resize =
        doc.contains("resize_mask") && flag(doc["resize_mask"], "resize_mask", read);
    r.resize_mask = resize;
    if (!resize && (mask->width != init->width || mask->height != init->height))
      invalid("mask", "mask is " + std::to_string(mask->width) + "x" +
                          std::to_string(mask->height) + " but init_image is " +
                          std::to_string(init->width) + "x" + std::to_string(init->height) +
                          "; send a mask of the picture's size (or resize_mask: true)");
    r.strength = 1.0;  // diffusers' inpainting default: the hole starts from pure noise
  }
  r.inpaint = parse_inpaint(doc, read);
  if (doc.contains("strength")) {
    if (!init) invalid("strength", "strength needs an init_image (image to image)");
    r.strength = read.number(doc["strength"], "strength");
  }
  parse_pair(doc, "original_size", "width", "height", read, &r.original_width, &r.original_height);
  parse_pair(doc, "crops_coords_top_left", "top", "left", read, &r.crop_top, &r.crop_left);
  parse_pair(doc, "target_size", "width", "height", read, &r.target_width, &r.target_height);
  if (doc.contains("steps")) r.steps = read.steps = read.integer(doc["steps"], "steps");
  if (doc.contains("guidance_scale"))
    r.guidance_scale = read.number(doc["guidance_scale"], "guidance_scale");
  parse_sampler(doc, read, r);
  if (doc.contains("hires") && !doc["hires"].is_null())
    r.hires = parse_hires(doc["hires"], read, r);
  if (doc.contains("seed")) r.seed = parse_seed(doc["seed"], read);
  r.seed = r.seed.value_or(pipeline::random_seed());  // chosen now, so it can be reported at once
  if (doc.contains("num_images")) r.num_images = read.integer(doc["num_images"], "num_images");
  if (doc.contains("clip_skip")) r.clip_skip = read.integer(doc["clip_skip"], "clip_skip");
  if (doc.contains("prompt_syntax")) {
    try {
      r.prompt_syntax =
          pipeline::parse_prompt_syntax(read.string(doc["prompt_syntax"], "prompt_syntax"));
    } catch (const pipeline::RequestError& e) {
      invalid(e.field(), e.what());
    }
  }
  if (doc.contains("preview") && !doc["preview"].is_null())
    r.preview = parse_preview(doc["preview"], read);
  if (doc.contains("priority")) r.priority = parse_priority(doc["priority"], read);
  if (doc.contains("timeout_s")) r.timeout_s = read.number(doc["timeout_s"], "timeout_s");
  if (doc.contains("max_run_s")) r.max_run_s = read.number(doc["max_run_s"], "max_run_s");
  if (doc.contains("cancel_on_disconnect"))
    r.cancel_on_disconnect = read.boolean(doc["cancel_on_disconnect"], "cancel_on_disconnect");
  // Resized only once the size is known to be valid: a bad width is reported as such.
  if (init && mask && pipeline::valid_side(r.width) && pipeline::valid_side(r.height)) {
    auto prepared =
        pipeline::prepare_inpaint(*init, std::move(*mask), r.width, r.height, r.inpaint);
    r.init_image = std::move(prepared.image);
    r.mask = std::move(prepared.mask);
    r.overlay = std::move(prepared.overlay);
  } else if (init && pipeline::valid_side(r.width) && pipeline::valid_side(r.height)) {
    r.init_image = fit_init_image(std::move(*init), r.width, r.height, r.inpaint.resize_mode);
  }
  try {
    engine::validate(r, bounds);
  } catch (const pipeline::RequestError& e) {
    invalid(e.field(), e.what());
  }
  return r;
}

std::string job_path(const std::string& id) {
  return "/v1/jobs/" + id;
}

std::string iso8601(engine::WallClock::time_point t) {
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
  const std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[40];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[48];
  std::snprintf(out, sizeof out, "%s.%03dZ", buf, static_cast<int>(ms % 1000));
  return out;
}

Json request_json(const engine::JobRequest& r) {
  // model null: the default model.
  Json loras = Json::array();
  for (const auto& l : r.loras)
    loras.push_back({{"name", l.name}, {"te_weight", l.te_weight}, {"unet_weight", l.unet_weight}});
  Json j = {{"model", r.model.empty() ? Json() : Json(r.model)},
            {"loras", loras},
            {"vae", "auto"},  // the checkpoint's own: the only choice yet
            {"prompt", r.prompt},
            {"negative_prompt", r.negative_prompt},
            {"width", r.width},
            {"height", r.height},
            {"steps", r.steps},
            {"guidance_scale", r.guidance_scale},
            {"sampler", r.sampler},
            {"scheduler", r.scheduler},
            {"num_images", r.num_images},
            {"clip_skip", r.clip_skip},
            {"prompt_syntax", pipeline::prompt_syntax_name(r.prompt_syntax)},
            {"original_size", {{"width", r.original_width}, {"height", r.original_height}}},
            {"crops_coords_top_left", {{"top", r.crop_top}, {"left", r.crop_left}}},
            {"target_size", {{"width", r.target_width}, {"height", r.target_height}}},
            {"init_image",
             r.init_image ? Json{{"width", r.init_image->width}, {"height", r.init_image->height}}
                          : Json()},
            {"strength", r.init_image ? Json(r.strength) : Json()},
            {"mask", r.mask ? Json{{"width", r.mask->width}, {"height", r.mask->height}} : Json()},
            {"priority", engine::to_string(r.priority)},
            {"cancel_on_disconnect", r.cancel_on_disconnect}};
  const auto& o = r.inpaint;
  for (const auto& [name, value] : {std::pair<const char*, Json>{"mask_blur_x", o.mask_blur_x},
                                    {"mask_blur_y", o.mask_blur_y},
                                    {"inpainting_fill", static_cast<int>(o.fill)},
                                    {"inpaint_full_res", o.only_masked},
                                    {"inpaint_full_res_padding", o.padding},
                                    {"inpainting_mask_invert", o.invert},
                                    {"inpaint_paste_back", o.paste_back}})
    j[name] = r.mask ? value : Json();
  j["resize_mode"] = r.init_image ? Json(static_cast<int>(o.resize_mode)) : Json();
  j["mask_blur"] = r.mask && o.mask_blur_x == o.mask_blur_y ? Json(o.mask_blur_x) : Json();
  j["resize_mask"] = r.mask ? Json(r.resize_mask) : Json();
  j["seed"] = r.seed ? Json(*r.seed) : Json(nullptr);
  j["timeout_s"] = r.timeout_s ? Json(*r.timeout_s) : Json(nullptr);
  j["max_run_s"] = r.max_run_s ? Json(*r.max_run_s) : Json(nullptr);
  if (r.hires) {
    // The second pass's settings as they run: its sampler, and the image's final size.
    const auto second = pipeline::second_pass_spec(engine::image_spec(r));
    j["hires"] = {{"scale", r.hires->scale},
                  {"width", r.hires->width},
                  {"height", r.hires->height},
                  {"upscaler", r.hires->upscaler},
                  {"steps", r.hires->steps},
                  {"strength", r.hires->strength},
                  {"sampler", second.sampler},
                  {"scheduler", second.scheduler},
                  {"final_size", {{"width", second.width}, {"height", second.height}}}};
  } else {
    j["hires"] = nullptr;
  }
  if (r.preview) {
    j["preview"] = {{"every", r.preview->every},
                    {"format", r.preview->format},
                    {"max_size", r.preview->max_size},
                    {"method", r.preview->method}};
  } else {
    j["preview"] = nullptr;
  }
  return j;
}

Json timings_json(const engine::JobTimes& t) {
  auto when = [](const std::optional<engine::WallClock::time_point>& at) {
    return at ? Json(iso8601(*at)) : Json(nullptr);
  };
  auto seconds = [](engine::WallClock::time_point a, engine::WallClock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  Json j = {{"queued", iso8601(t.queued_at)},
            {"started", when(t.started_at)},
            {"finished", when(t.finished_at)}};
  j["queue_s"] = t.started_at ? Json(seconds(t.queued_at, *t.started_at)) : Json(nullptr);
  j["run_s"] =
      t.started_at && t.finished_at ? Json(seconds(*t.started_at, *t.finished_at)) : Json(nullptr);
  return j;
}

namespace {

// "step"/"steps" count sampler steps, as users do; "evaluations"/"evaluations_total" the model
// calls behind them (heun: two per step but the last). The same keys as the job's REST view.
void add_progress(Json& j, int evaluations, int evaluations_total, int steps) {
  j["step"] = engine::steps_done(evaluations, evaluations_total, steps);
  j["steps"] = steps;
  j["evaluations"] = evaluations;
  j["evaluations_total"] = evaluations_total;
}

}  // namespace

Json event_json(const engine::JobEvent& e) {
  using engine::EventType;
  Json j = {{"type", engine::to_string(e.type)}, {"job_id", e.job_id}};
  switch (e.type) {
    case EventType::kQueued:
      j["position"] = e.queue_position;
      break;
    case EventType::kStarted:
      add_progress(j, e.evaluations, e.evaluations_total, e.steps);
      break;
    case EventType::kProgress:
      add_progress(j, e.evaluations, e.evaluations_total, e.steps);
      j["it_per_s"] = e.it_per_s;
      break;
    case EventType::kPreview:
      j["image"] = e.image;
      add_progress(j, e.evaluations, e.evaluations_total, e.steps);
      j["format"] = e.format;
      j["width"] = e.width;
      j["height"] = e.height;
      break;
    case EventType::kSucceeded: {
      Json urls = Json::array();
      for (int k = 0; k < e.num_images; ++k)
        urls.push_back(job_path(e.job_id) + "/images/" + std::to_string(k));
      j["images"] = urls;
      j["seed"] = e.seed;
      j["timings"] = timings_json(e.times);
      break;
    }
    case EventType::kFailed:
    case EventType::kExpired:
    case EventType::kTimedOut:
      j["error"] = e.error;
      j["timings"] = timings_json(e.times);
      break;
    case EventType::kCancelled:
      if (!e.error.empty()) j["reason"] = e.error;
      j["timings"] = timings_json(e.times);
      break;
  }
  return j;
}

Json job_json(const engine::JobSnapshot& job) {
  const std::string self = job_path(job.id);
  Json j = {{"id", job.id},
            {"status", engine::to_string(job.status)},
            {"step", engine::steps_done(job.evaluations, job.evaluations_total, job.steps)},
            {"steps", job.steps},
            {"evaluations", job.evaluations},
            {"evaluations_total", job.evaluations_total},
            {"seed", job.seed},
            {"num_images", job.request.num_images},
            {"images_ready", job.images_ready},
            {"results_evicted", job.results_evicted},
            {"timings", timings_json(job.times)},
            {"links", {{"self", self}, {"events", self + "/events"}}}};
  j["queue_position"] = job.queue_position >= 0 ? Json(job.queue_position) : Json(nullptr);
  j["progress"] = job.status == engine::JobStatus::kSucceeded ? 1.0
                  : job.evaluations_total > 0
                      ? std::min(1.0, static_cast<double>(job.evaluations) / job.evaluations_total)
                      : 0.0;
  Json images = Json::array();
  if (job.status == engine::JobStatus::kSucceeded && !job.results_evicted)
    for (int k = 0; k < job.request.num_images; ++k)
      images.push_back(self + "/images/" + std::to_string(k));
  j["images"] = images;
  j["error"] = job.error.empty() ? Json(nullptr) : Json(job.error);
  j["request"] = request_json(job.request);
  j["request_id"] = job.request.request_id.empty() ? Json(nullptr) : Json(job.request.request_id);
  return j;
}

Json model_json(const pipeline::ModelInfo& m) {
  // Not the path: it tells clients about the host's file system and nothing they can use.
  return {{"name", m.name},
          {"layout", m.layout},
          {"family", m.family},
          {"device", m.device},
          {"precision", m.precision},
          {"native_size", m.native_size},
          {"text_layers", m.text_layers},
          {"latent_channels", m.latent_channels},
          {"inpainting", m.inpainting},
          {"load_seconds", m.load_seconds}};
}

Json samplers_json() {
  Json samplers = Json::array();
  for (const auto& s : pipeline::sampler_catalog())
    samplers.push_back({{"name", s.name},
                        {"display_name", s.display_name},
                        {"supports_karras", s.supports_karras},
                        {"description", s.description}});
  return {{"samplers", samplers}, {"schedulers", pipeline::scheduler_names()}};
}

std::string base64(const std::vector<uint8_t>& in) {
  static const char* tbl = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = (in[i] << 16) | (in[i + 1] << 8) | in[i + 2];
    out += tbl[v >> 18];
    out += tbl[(v >> 12) & 63];
    out += tbl[(v >> 6) & 63];
    out += tbl[v & 63];
  }
  if (i < in.size()) {
    const uint32_t v = (in[i] << 16) | (i + 1 < in.size() ? in[i + 1] << 8 : 0);
    out += tbl[v >> 18];
    out += tbl[(v >> 12) & 63];
    out += i + 1 < in.size() ? tbl[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

}  // namespace sdserve::server
