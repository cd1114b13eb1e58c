#include "server/a1111.h"

#include <algorithm>
#include <ctime>
#include <set>
#include <string_view>
#include <unordered_map>

#include "pipeline/errors.h"
#include "pipeline/image.h"
#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"
#include "server/init_image.h"

namespace sdserve::server::a1111 {
namespace {

// Defaults of A1111's API (StableDiffusionProcessingTxt2Img), except the size: the model's own.
constexpr int kDefaultSteps = 50;
constexpr double kDefaultCfg = 7.0;
const char* const kDefaultSampler = "Euler";

[[noreturn]] void refuse(const std::string& field, const std::string& message) {
  throw ApiError(400, "validation_error", message, field);
}

// Accepted and ignored: they decide where A1111 saves files or how it reports, not the image.
const std::set<std::string>& ignored_fields() {
  static const std::set<std::string> fields = {"save_images",
                                               "do_not_save_samples",
                                               "do_not_save_grid",
                                               "comments",
                                               "force_task_id",
                                               "infotext",
                                               "user",
                                               "script_args",
                                               "override_settings_restore_afterwards",
                                               "firstpass_image",
                                               "disable_extra_networks",
                                               "subseed",
                                               "refiner_switch_at"};
  return fields;
}

// The hires fix's own fields: ignored unless enable_hr (as A1111 does), else hires_fields().
bool is_hires_field(const std::string& name) {
  static const std::set<std::string> fields = {"hr_scale",
                                               "hr_upscaler",
                                               "hr_second_pass_steps",
                                               "hr_resize_x",
                                               "hr_resize_y",
                                               "hr_checkpoint_name",
                                               "hr_sampler_name",
                                               "hr_scheduler",
                                               "hr_prompt",
                                               "hr_negative_prompt",
                                               "hr_cfg",
                                               "hr_distilled_cfg",
                                               "denoising_strength",
                                               "firstphase_width",
                                               "firstphase_height",
                                               "hr_additional_modules"};
  return fields.count(name) > 0;
}

bool is_false(const Json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>());
}
bool is_number_equal(const Json& v, double want) {
  return v.is_number() && v.get<double>() == want;
}
bool is_empty(const Json& v) {
  return v.is_null() || (v.is_string() && v.get<std::string>().empty()) ||
         ((v.is_array() || v.is_object()) && v.empty());
}

// Fields A1111 has that would change the image: accepted only at the value that means "off"
// (or sdserve's own behaviour), refused by name otherwise.
void check_image_changing(const std::string& name, const Json& v, const std::string& sampler) {
  auto off = [&](bool ok, const std::string& why) {
    if (!ok) refuse(name, why);
  };
  if (name == "styles") {
    off(is_empty(v), "styles are not supported: put the style's text into prompt");
  } else if (name == "subseed_strength") {
    off(v.is_null() || is_number_equal(v, 0),
        "variation seeds (subseed_strength > 0) are not supported");
  } else if (name == "seed_resize_from_h" || name == "seed_resize_from_w") {
    off(v.is_null() || (v.is_number() && v.get<double>() <= 0),
        name + " (resizing a seed's noise) is not supported; use -1");
  } else if (name == "restore_faces") {
    off(is_false(v), "face restoration (restore_faces) is not supported");
  } else if (name == "tiling") {
    off(is_false(v), "tiling is not supported");
  } else if (name == "refiner_checkpoint") {
    off(is_empty(v), "a refiner (refiner_checkpoint) is not supported");
  } else if (name == "script_name") {
    off(is_empty(v), "scripts (script_name) are not supported");
  } else if (name == "alwayson_scripts") {
    if (!is_empty(v)) {
      const std::string first = v.is_object() ? v.begin().key() : std::string("?");
      refuse(name, "extension scripts (alwayson_scripts: '" + first + "') are not supported");
    }
  } else if (name == "eta") {
    // sdserve's DDIM runs with eta 0 and its ancestral samplers with eta 1, as A1111's defaults.
    const double ours = sampler == "ddim" ? 0.0 : 1.0;
    off(v.is_null() || is_number_equal(v, ours), "eta other than " +
                                                     std::string(ours == 0 ? "0" : "1") +
                                                     " is not supported for this sampler");
  } else if (name == "s_churn" || name == "s_tmin" || name == "s_min_uncond") {
    off(v.is_null() || is_number_equal(v, 0), name + " other than 0 is not supported");
  } else if (name == "s_tmax") {
    off(v.is_null() || is_number_equal(v, 0), name + " is not supported (leave it unset)");
  } else if (name == "s_noise") {
    off(v.is_null() || is_number_equal(v, 1), "s_noise other than 1 is not supported");
  } else if (name == "distilled_cfg_scale") {
    off(v.is_null(), "distilled_cfg_scale (Flux) is not supported");
  } else {
    refuse(name, "unknown field '" + name +
                     "': not an A1111 txt2img field sdserve takes (a typo would silently "
                     "change the image, so it is refused)");
  }
}

std::string model_title(const pipeline::ModelInfo* model) {
  return model ? model->name : std::string("sdserve");
}

// A1111's checkpoint title: "name [hash10]" once the hash is known.
std::string model_title(const pipeline::ModelInfo* model, const std::string& sha256) {
  return model_title(model) + (sha256.empty() ? "" : " [" + sha256.substr(0, 10) + "]");
}

Json hash_or_null(const std::string& sha256, size_t digits) {
  return sha256.empty() ? Json(nullptr) : Json(sha256.substr(0, digits));
}

// override_settings: the few settings that decide the image here, checked; harmless ones
// ignored; the rest refused by name.
void apply_overrides(const Json& o, Json& native) {
  if (o.is_null()) return;
  if (!o.is_object()) refuse("override_settings", "override_settings must be a JSON object");
  static const std::set<std::string> harmless = {"show_progress_every_n_steps",
                                                 "live_previews_enable",
                                                 "enable_pnginfo",
                                                 "samples_save",
                                                 "grid_save",
                                                 "save_to_dirs",
                                                 "randn_source",
                                                 "sd_vae_overrides_per_model_preferences"};
  for (auto it = o.begin(); it != o.end(); ++it) {
    const std::string& key = it.key();
    const std::string field = "override_settings." + key;
    const Json& v = it.value();
    if (key == "CLIP_stop_at_last_layers") {
      native["clip_skip"] = v;
    } else if (key == "sd_model_checkpoint") {
      // The session resolved it (checkpoint_of) and translates for that model.
      if (!v.is_string()) refuse(field, field + " must be a string");
    } else if (key == "sd_vae") {
      if (!(v.is_null() || (v.is_string() && (v == "Automatic" || v == "None"))))
        refuse(field, "a separate VAE is not supported; use 'Automatic'");
    } else if (key == "samples_format") {
      if (!(v.is_string() && v == "png")) refuse(field, "images are PNG; use 'png'");
    } else if (key == "emphasis") {
      // A1111's emphasis modes: "Original" (its default) is what sdserve does; "None" (the text
      // as it is) matches prompt_syntax "none" up to 75 tokens only, so it is refused too.
      if (!(v.is_null() || (v.is_string() && v == "Original")))
        refuse(field,
               "only emphasis 'Original' (A1111's default) is supported here; /v1/generate "
               "takes prompt_syntax \"none\" for the text as it is");
    } else if (key == "eta_noise_seed_delta") {
      if (!(v.is_null() || is_number_equal(v, 0)))
        refuse(field, "eta_noise_seed_delta other than 0 is not supported");
    } else if (harmless.count(key) == 0 && key.rfind("outdir", 0) != 0) {
      refuse(field, "the setting '" + key + "' is not supported by sdserve's A1111 API");
    }
  }
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// A1111's scheduler label -> ours. "Automatic" is each sampler's own default (A1111 gives
// DPM++ 2M the Karras schedule). `field`: the request field it came from, for errors.
std::string scheduler_for(const Json& v, const std::string& sampler_name, std::string* label,
                          const std::string& field = "scheduler") {
  if (!v.is_null() && !v.is_string()) refuse(field, field + " must be a string");
  const std::string s = v.is_string() ? lower(v.get<std::string>()) : "automatic";
  if (s == "karras") {
    *label = "Karras";
    return "karras";
  }
  if (s == "automatic" || s.empty()) {
    *label = "Automatic";
    const auto name = lower(sampler_name);
    const bool karras_default = name == "dpm++ 2m" || name == "dpmpp_2m";
    return karras_default ? "karras" : "";
  }
  refuse(field,
         field + " '" + v.get<std::string>() + "' is not supported; use 'Automatic' or 'Karras'");
}

const char* scheduler_label(const std::string& ours) {
  return ours == "karras" ? "Karras" : "Automatic";
}

// The hires fix (enable_hr): A1111's fields as /v1's "hires" object (docs/API.md). Types and
// ranges are /v1's checks, whose errors renamed() gives A1111's names; what sdserve lacks is
// refused here by name. `first`: the /v1 body so far (prompts, cfg); `sampler_name` and
// `scheduler`: the first pass's as the caller named them (A1111's "Use same scheduler" is that
// label, read for the second pass's sampler: "Automatic" gives each sampler its own).
Json hires_fields(const Json& doc, const Json& first, const std::string& sampler_name,
                  const Json& scheduler) {
  const auto get = [&](const char* name) { return doc.contains(name) ? doc[name] : Json(); };
  const auto is_same = [](const Json& v, const char* same) {
    return is_empty(v) || (v.is_string() && v.get<std::string>() == same);
  };
  Json h = Json::object();
  // A1111's API defaults: hr_scale 2, the "Latent" upscaler (its latent_upscale_default_mode),
  // denoising_strength 0.75, hr_second_pass_steps 0 (the first pass's steps).
  h["scale"] = get("hr_scale").is_null() ? Json(2.0) : get("hr_scale");
  if (!get("hr_resize_x").is_null()) h["width"] = get("hr_resize_x");
  if (!get("hr_resize_y").is_null()) h["height"] = get("hr_resize_y");
  if (!get("hr_upscaler").is_null()) h["upscaler"] = get("hr_upscaler");
  if (!get("hr_second_pass_steps").is_null()) h["steps"] = get("hr_second_pass_steps");
  h["strength"] = get("denoising_strength").is_null() ? Json(0.75) : get("denoising_strength");
  const Json hr_sampler = get("hr_sampler_name"), hr_scheduler = get("hr_scheduler");
  const bool same_sampler = is_same(hr_sampler, "Use same sampler");
  const bool same_scheduler = is_same(hr_scheduler, "Use same scheduler");
  if (!same_sampler || !same_scheduler) {
    if (!same_sampler && !hr_sampler.is_string())
      refuse("hr_sampler_name", "hr_sampler_name must be a string, e.g. 'Euler a'");
    const std::string name = same_sampler ? sampler_name : hr_sampler.get<std::string>();
    std::string label;
    const std::string field = same_scheduler ? "scheduler" : "hr_scheduler";
    const std::string schedule =
        scheduler_for(same_scheduler ? scheduler : hr_scheduler, name, &label, field);
    try {
      const auto choice = pipeline::resolve_sampler(name, schedule);
      h["sampler"] = choice.sampler;
      h["scheduler"] = choice.scheduler;
    } catch (const pipeline::RequestError& e) {
      const std::string named = e.field() == "scheduler" ? field : "hr_sampler_name";
      refuse(named, named + ": " + e.what());
    }
  }
  // A second pass with its own prompt, checkpoint or guidance would need more than one
  // embedding or model per image: accepted only where it is the first pass's.
  for (const auto& [name, same] :
       {std::pair{"hr_prompt", "prompt"}, {"hr_negative_prompt", "negative_prompt"}}) {
    const Json v = get(name);
    if (!is_empty(v) && v != first.value(same, Json("")))
      refuse(name, std::string(name) + " other than " + same +
                       " is not supported (a second pass with its own prompt); leave it empty");
  }
  if (!is_same(get("hr_checkpoint_name"), "Use same checkpoint"))
    refuse("hr_checkpoint_name",
           "hr_checkpoint_name (another model for the second pass) is not supported; leave it "
           "empty or 'Use same checkpoint'");
  const Json cfg = get("hr_cfg");
  if (!cfg.is_null() && cfg != first["guidance_scale"])
    refuse("hr_cfg", "hr_cfg other than cfg_scale is not supported; leave it unset");
  if (!get("hr_distilled_cfg").is_null())
    refuse("hr_distilled_cfg", "hr_distilled_cfg (Flux) is not supported");
  const Json modules = get("hr_additional_modules");
  if (!(is_empty(modules) || modules == Json::array({"Use same choices"})))
    refuse("hr_additional_modules",
           "hr_additional_modules is not supported; leave it empty or ['Use same choices']");
  for (const char* name : {"firstphase_width", "firstphase_height"})
    if (!(get(name).is_null() || is_number_equal(get(name), 0)))
      refuse(name, std::string(name) +
                       " (the old hires sizing) is not supported: send the first pass's size as "
                       "width and height, and hr_scale or hr_resize_x / hr_resize_y");
  return h;
}

}  // namespace

std::string job_timestamp() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[16];
  std::strftime(buf, sizeof(buf), "%Y%m%d%H%M%S", &tm);
  return buf;
}

Txt2Img translate_txt2img(const BodyJson& body, const pipeline::ModelInfo* model) {
  if (!body.is_object())
    throw ApiError(400, "invalid_json", "the body must be a JSON object (a txt2img request)");
  // As the ordered JSON this file renders; parse_body() bounded each object's members, so its
  // linear lookups stay cheap.
  const Json doc(body);
  Txt2Img t;
  Json n = Json::object();
  n["prompt"] = doc.value("prompt", Json("")).is_null() ? Json("") : doc.value("prompt", Json(""));
  if (doc.contains("negative_prompt") && !doc["negative_prompt"].is_null())
    n["negative_prompt"] = doc["negative_prompt"];
  const int native = model ? model->native_size : 512;
  n["width"] = doc.contains("width") && !doc["width"].is_null() ? doc["width"] : Json(native);
  n["height"] = doc.contains("height") && !doc["height"].is_null() ? doc["height"] : Json(native);
  n["steps"] =
      doc.contains("steps") && !doc["steps"].is_null() ? doc["steps"] : Json(kDefaultSteps);
  n["guidance_scale"] = doc.contains("cfg_scale") && !doc["cfg_scale"].is_null()
                            ? doc["cfg_scale"]
                            : Json(kDefaultCfg);
  // Seed -1 (or none) is random: /v1 picks one and reports it.
  if (doc.contains("seed") && !doc["seed"].is_null() &&
      !(doc["seed"].is_number() && doc["seed"].get<double>() == -1))
    n["seed"] = doc["seed"];

  Json sampler =
      doc.contains("sampler_name") && !doc["sampler_name"].is_null()     ? doc["sampler_name"]
      : doc.contains("sampler_index") && !doc["sampler_index"].is_null() ? doc["sampler_index"]
                                                                         : Json(kDefaultSampler);
  if (!sampler.is_string()) refuse("sampler_name", "sampler_name must be a string, e.g. 'Euler a'");
  t.sampler_name = sampler.get<std::string>();
  const std::string scheduler =
      scheduler_for(doc.value("scheduler", Json(nullptr)), t.sampler_name, &t.scheduler);
  // "DPM++ 2M Karras" (A1111 before 1.9) carries its schedule in the name.
  try {
    const auto choice = pipeline::resolve_sampler(t.sampler_name, scheduler);
    n["sampler"] = choice.sampler;
    n["scheduler"] = choice.scheduler;
    t.scheduler = scheduler_label(choice.scheduler);
  } catch (const pipeline::RequestError& e) {
    refuse(e.field() == "scheduler" ? "scheduler" : "sampler_name", e.what());
  }

  auto count = [&](const char* name) {
    if (!doc.contains(name) || doc[name].is_null()) return 1;
    const Json& v = doc[name];
    if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > 64)
      refuse(name, std::string(name) + " must be an integer from 1 to 64");
    return static_cast<int>(v.get<int64_t>());
  };
  t.batch_size = count("batch_size");
  t.n_iter = count("n_iter");
  n["num_images"] = t.batch_size * t.n_iter;
  if (doc.contains("send_images") && !doc["send_images"].is_null()) {
    if (!doc["send_images"].is_boolean())
      refuse("send_images", "send_images must be true or false");
    t.send_images = doc["send_images"].get<bool>();
  }
  apply_overrides(doc.value("override_settings", Json(nullptr)), n);
  // Step previews for GET /sdapi/v1/progress's current_image (A1111 shows one every few steps).
  n["preview"] = {
      {"every", n["steps"].is_number_integer() && n["steps"].get<int64_t>() > 10 ? 5 : 1},
      {"format", "png"},
      {"max_size", 256}};

  const Json enable_hr = doc.value("enable_hr", Json(nullptr));
  if (!enable_hr.is_null() && !enable_hr.is_boolean())
    refuse("enable_hr", "enable_hr must be true or false");
  t.hires = enable_hr.is_boolean() && enable_hr.get<bool>();
  if (t.hires)
    n["hires"] = hires_fields(doc, n, t.sampler_name, doc.value("scheduler", Json(nullptr)));
  static const std::set<std::string> mapped = {
      "prompt",      "negative_prompt",   "width",         "height",    "steps",      "cfg_scale",
      "seed",        "sampler_name",      "sampler_index", "scheduler", "batch_size", "n_iter",
      "send_images", "override_settings", "enable_hr"};
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    const std::string& name = it.key();
    if (mapped.count(name) || ignored_fields().count(name) || is_hires_field(name)) continue;
    check_image_changing(name, it.value(), n.value("sampler", std::string()));
  }

  t.native = BodyJson(n);
  t.echo = doc;
  const Json filled = {{"prompt", n["prompt"]},
                       {"negative_prompt", n.value("negative_prompt", Json(""))},
                       {"seed", doc.value("seed", Json(-1))},
                       {"sampler_name", t.sampler_name},
                       {"scheduler", t.scheduler},
                       {"batch_size", t.batch_size},
                       {"n_iter", t.n_iter},
                       {"steps", n["steps"]},
                       {"cfg_scale", n["guidance_scale"]},
                       {"width", n["width"]},
                       {"height", n["height"]},
                       {"send_images", t.send_images}};
  for (auto it = filled.begin(); it != filled.end(); ++it) t.echo[it.key()] = it.value();
  if (t.hires) {
    const Json& h = n["hires"];
    t.denoising_strength = h["strength"].is_number() ? h["strength"].get<double>() : 0.75;
    t.echo["enable_hr"] = true;
    t.echo["hr_scale"] = h["scale"];
    t.echo["hr_upscaler"] = h.value("upscaler", Json("Latent"));
    t.echo["denoising_strength"] = h["strength"];
  }
  return t;
}

Txt2Img translate_img2img(const BodyJson& body, const pipeline::ModelInfo* model) {
  if (!body.is_object())
    throw ApiError(400, "invalid_json", "the body must be a JSON object (an img2img request)");
  Json rest(body);  // what txt2img also has, once the img2img fields are taken out
  const auto take = [&](const char* name) {
    Json v = rest.contains(name) ? rest[name] : Json();
    rest.erase(name);
    return v;
  };
  const Json init_images = take("init_images");
  if (!init_images.is_array() || init_images.empty() || !init_images[0].is_string())
    refuse("init_images", "init_images is required: a list with one base64 PNG, JPEG or WebP");
  if (init_images.size() > 1)
    refuse("init_images", "init_images holds " + std::to_string(init_images.size()) +
                              " images; one per request is supported (send one request per image)");
  const Json strength = take("denoising_strength");
  const Json resize_mode = take("resize_mode");  // /v1 checks it (3, latent upscale, is refused)
  const Json mask = take("mask");
  if (!mask.is_null() && !mask.is_string())
    refuse("mask", "mask must be a base64 PNG, JPEG or WebP (white = repaint), or null");
  const bool inpaint = !is_empty(mask);
  const Json latent_mask = take("latent_mask");
  if (!is_empty(latent_mask)) refuse("latent_mask", "latent_mask is not supported");
  const Json noise = take("initial_noise_multiplier");
  if (!(noise.is_null() || is_number_equal(noise, 1)))
    refuse("initial_noise_multiplier", "initial_noise_multiplier other than 1 is not supported");
  const Json include = take("include_init_images");
  if (!include.is_null() && !include.is_boolean())
    refuse("include_init_images", "include_init_images must be true or false");
  // A1111's inpainting fields, with its API's defaults; without a mask they change nothing.
  Json inpainting = {{"mask_blur_x", 4},
                     {"mask_blur_y", 4},
                     {"inpainting_fill", 0},
                     {"inpaint_full_res", true},
                     {"inpaint_full_res_padding", 0},
                     {"inpainting_mask_invert", 0}};
  for (const char* name : {"mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
                           "inpaint_full_res_padding", "inpainting_mask_invert"}) {
    const Json v = take(name);
    if (!v.is_null()) inpainting[name] = v;
  }
  const Json blur = take("mask_blur");  // A1111: when set, both axes
  if (!blur.is_null()) inpainting["mask_blur_x"] = inpainting["mask_blur_y"] = blur;
  const Json round = take("mask_round");
  if (inpaint && !(round.is_null() || round == Json(true)))
    refuse("mask_round",
           "mask_round false (a soft latent mask) is not supported; the latent "
           "mask is binarised, as diffusers and A1111's default do");
  take("image_cfg_scale");  // instruct-pix2pix's only
  Txt2Img t = translate_txt2img(BodyJson(rest), model);
  Json native(t.native);
  native["init_image"] = init_images[0];
  if (!resize_mode.is_null()) native["resize_mode"] = resize_mode;
  if (inpaint) {
    native["mask"] = mask;
    native["resize_mask"] = true;         // A1111 fits a mask of another size to the picture
    native["inpaint_paste_back"] = true;  // and pastes the result over it through the mask
    for (auto it = inpainting.begin(); it != inpainting.end(); ++it) native[it.key()] = it.value();
  }
  // A1111's default; a wrong type or range is /v1's 400, renamed for the caller.
  native["strength"] = strength.is_null() ? Json(0.75) : strength;
  t.native = BodyJson(native);
  t.img2img = true;
  t.denoising_strength = strength.is_number() ? strength.get<double>() : 0.75;
  // As A1111: the answer's parameters echo the images only when include_init_images is true.
  const bool echo_images = include.is_boolean() && include.get<bool>();
  t.echo["init_images"] = echo_images ? init_images : Json();
  t.echo["mask"] = echo_images ? mask : Json();
  t.echo["denoising_strength"] = t.denoising_strength;
  t.echo["resize_mode"] = resize_mode.is_null() ? Json(0) : resize_mode;
  for (auto it = inpainting.begin(); it != inpainting.end(); ++it) t.echo[it.key()] = it.value();
  t.echo["mask_blur"] = inpainting["mask_blur_x"];
  return t;
}

ApiError renamed(const ApiError& e) {
  static const std::map<std::string, std::string> names = {
      {"guidance_scale", "cfg_scale"},
      {"strength", "denoising_strength"},
      {"init_image", "init_images"},
      {"sampler", "sampler_name"},
      {"num_images", "batch_size"},
      {"clip_skip", "override_settings.CLIP_stop_at_last_layers"},
      {"model", "override_settings.sd_model_checkpoint"}};
  // The hires fix's messages may name several of its fields: each is renamed.
  static const std::vector<std::pair<std::string, std::string>> hires = {
      {"hires.scale", "hr_scale"},
      {"hires.width", "hr_resize_x"},
      {"hires.height", "hr_resize_y"},
      {"hires.upscaler", "hr_upscaler"},
      {"hires.steps", "hr_second_pass_steps"},
      {"hires.strength", "denoising_strength"},
      {"hires.sampler", "hr_sampler_name"},
      {"hires.scheduler", "hr_scheduler"}};
  if (e.field == "hires" || e.field.rfind("hires.", 0) == 0) {
    std::string message = e.what(), field = e.field == "hires" ? "enable_hr" : e.field;
    for (const auto& [from, to] : hires) {
      for (size_t at = message.find(from); at != std::string::npos;
           at = message.find(from, at + to.size()))
        message.replace(at, from.size(), to);
      if (field == from) field = to;
    }
    ApiError out(e.status, e.type, message, field);
    out.retry_after_s = e.retry_after_s;
    return out;
  }
  const auto it = names.find(e.field);
  if (it == names.end()) return e;
  std::string message = e.what();
  // The message names the /v1 field; say the A1111 one (num_images is batch_size x n_iter).
  const auto at = message.find(it->first);
  if (at != std::string::npos)
    message.replace(at, it->first.size(),
                    it->first == "num_images" ? "batch_size x n_iter" : it->second);
  ApiError out(e.status, e.type, message, it->second);
  out.retry_after_s = e.retry_after_s;
  return out;
}

Json txt2img_answer(const Txt2Img& t, const engine::JobSnapshot& job,
                    const std::vector<std::shared_ptr<const std::vector<uint8_t>>>& pngs,
                    const pipeline::ModelInfo* model, const std::string& sha256) {
  const auto& r = job.request;
  const int n = static_cast<int>(pngs.size());
  Json images = Json::array();
  Json infotexts = Json::array();
  Json seeds = Json::array();
  for (int k = 0; k < r.num_images; ++k) seeds.push_back(job.seed + k);
  for (const auto& png : pngs) {
    if (t.send_images) images.push_back(base64(*png));
    infotexts.push_back(pipeline::read_png_text(*png, "parameters"));
  }
  Json parameters = t.echo;
  parameters["seed"] = job.seed;
  Json info = {{"prompt", r.prompt},
               {"all_prompts", Json::array()},
               {"negative_prompt", r.negative_prompt},
               {"all_negative_prompts", Json::array()},
               {"seed", job.seed},
               {"all_seeds", seeds},
               {"subseed", job.seed},
               {"all_subseeds", seeds},
               {"subseed_strength", 0},
               {"width", r.width},
               {"height", r.height},
               {"sampler_name", t.sampler_name},
               {"cfg_scale", r.guidance_scale},
               {"steps", r.steps},
               {"batch_size", t.batch_size},
               {"restore_faces", false},
               {"face_restoration_model", nullptr},
               {"sd_model_name", model_title(model)},
               {"sd_model_hash", hash_or_null(sha256, 10)},
               {"sd_vae_name", nullptr},
               {"sd_vae_hash", nullptr},
               {"seed_resize_from_w", -1},
               {"seed_resize_from_h", -1},
               {"denoising_strength", t.img2img || t.hires ? Json(t.denoising_strength) : Json()},
               {"extra_generation_params", {{"Schedule type", scheduler_label(r.scheduler)}}},
               {"index_of_first_image", 0},
               {"infotexts", infotexts},
               {"styles", Json::array()},
               {"job_timestamp", job_timestamp()},
               {"clip_skip", r.clip_skip},
               {"is_using_inpainting_conditioning", false},
               {"version", "sdserve"},
               {"job_id", job.id},
               {"interrupted", job.status == engine::JobStatus::kCancelled}};
  for (int k = 0; k < std::max(n, r.num_images); ++k) {
    info["all_prompts"].push_back(r.prompt);
    info["all_negative_prompts"].push_back(r.negative_prompt);
  }
  return {{"images", images}, {"parameters", parameters}, {"info", info.dump()}};
}

Json samplers() {
  Json out = Json::array();
  for (const auto& s : pipeline::sampler_catalog()) {
    Json options = Json::object();
    if (s.name == "dpmpp_2m") options["scheduler"] = "karras";
    out.push_back({{"name", s.display_name}, {"aliases", {s.name}}, {"options", options}});
  }
  return out;
}

Json schedulers() {
  return Json::array({{{"name", "automatic"},
                       {"label", "Automatic"},
                       {"aliases", nullptr},
                       {"default_rho", -1},
                       {"need_inner_model", false}},
                      {{"name", "karras"},
                       {"label", "Karras"},
                       {"aliases", nullptr},
                       {"default_rho", 7.0},
                       {"need_inner_model", false}}});
}

Checkpoint checkpoint(const pipeline::ModelInfo& model, const std::string& sha256) {
  return {model_title(&model, sha256), model.name, model.name, sha256};
}

Json sd_models(const std::vector<Checkpoint>& checkpoints) {
  Json out = Json::array();
  for (const auto& c : checkpoints)
    out.push_back({{"title", c.title},
                   {"model_name", c.model_name},
                   {"hash", hash_or_null(c.sha256, 10)},
                   {"sha256", hash_or_null(c.sha256, 64)},
                   {"filename", c.filename},
                   {"config", nullptr}});
  return out;
}

Json options(const Checkpoint& current) {
  return {{"sd_model_checkpoint", current.title},
          {"sd_checkpoint_hash", hash_or_null(current.sha256, 64)},
          {"sd_vae", "Automatic"},
          {"CLIP_stop_at_last_layers", 1},
          {"emphasis", "Original"},
          {"samples_format", "png"},
          {"eta_noise_seed_delta", 0},
          {"live_previews_enable", true},
          {"show_progress_every_n_steps", 5},
          {"enable_pnginfo", true}};
}

namespace {

// Fields of one infotext read back: A1111 writes about 20, extensions a few dozen more.
constexpr size_t kMaxInfotextFields = 256;

// "Steps: 4, Sampler: Euler a, ..." (the infotext's last line) as {"Steps": "4", ...}: linear in
// the text (a repeated name keeps its last value, found through an index, not by scanning the
// ordered object), at most kMaxInfotextFields names; past them the fields stay in "info" only.
Json infotext_fields(const std::string& text) {
  Json fields = Json::object();
  std::unordered_map<std::string_view, size_t> index;  // name -> its position in `fields`
  std::vector<std::pair<std::string, std::string>> items;
  const auto line_start = text.rfind('\n');
  const std::string_view line =
      std::string_view(text).substr(line_start == std::string::npos ? 0 : line_start + 1);
  size_t at = 0;
  while (at < line.size()) {
    size_t end = line.find(", ", at);
    if (end == std::string::npos) end = line.size();
    const std::string_view item = line.substr(at, end - at);
    const auto colon = item.find(": ");
    at = end + 2;
    if (colon == std::string::npos) continue;
    const std::string_view name = item.substr(0, colon);
    const auto found = index.find(name);
    if (found != index.end()) {
      items[found->second].second = std::string(item.substr(colon + 2));
    } else if (items.size() < kMaxInfotextFields) {
      index.emplace(name, items.size());
      items.emplace_back(std::string(name), std::string(item.substr(colon + 2)));
    }
  }
  for (auto& [name, value] : items) fields[name] = std::move(value);
  return fields;
}

}  // namespace

Json png_info(const BodyJson& doc) {
  if (!doc.is_object() || !doc.contains("image") || !doc["image"].is_string())
    refuse("image", "image is required: a base64 PNG, optionally as a data: URL");
  std::string data = doc["image"].get<std::string>();
  const auto comma = data.find(',');
  if (data.rfind("data:", 0) == 0 && comma != std::string::npos) data = data.substr(comma + 1);
  const auto decoded = unbase64(data);
  if (!decoded) refuse("image", "image is not base64");
  const auto& png = *decoded;
  static const uint8_t kSignature[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (png.size() < 8 || !std::equal(png.begin(), png.begin() + 8, kSignature))
    refuse("image", "image is not a PNG");
  const std::string parameters = pipeline::read_png_text(png, "parameters");
  Json items = Json::object();
  if (!parameters.empty()) items["parameters"] = parameters;
  return {{"info", parameters}, {"items", items}, {"parameters", infotext_fields(parameters)}};
}

}  // namespace sdserve::server::a1111
