#include "server/api_json.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <ctime>
#include <mutex>
#include <random>
#include <sstream>

#include "config/safe_json.h"
#include "pipeline/errors.h"
#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"

namespace sdserve::server {
namespace {

using nlohmann::json;

constexpr int kMaxSteps = 150;
constexpr int kMaxImages = 16;
constexpr int kMinSide = 64, kMaxSide = 2048;

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

int get_int(const json& v, const std::string& field, int lo, int hi) {
  const std::string rule =
      field + " must be an integer between " + std::to_string(lo) + " and " + std::to_string(hi);
  if (!v.is_number_integer()) invalid(field, rule + got(v));
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi))
    invalid(field, rule + got(v));
  const int64_t i = v.get<int64_t>();
  if (i < lo || i > hi) invalid(field, rule + got(v));
  return static_cast<int>(i);
}

double get_number(const json& v, const std::string& field, double lo, double hi,
                  bool lo_exclusive = false) {
  std::ostringstream rule;
  rule << field << " must be a number " << (lo_exclusive ? "greater than " : "between ") << lo
       << (lo_exclusive ? " and at most " : " and ") << hi;
  if (!v.is_number()) invalid(field, rule.str() + got(v));
  const double d = v.get<double>();
  if (!std::isfinite(d) || (lo_exclusive ? d <= lo : d < lo) || d > hi)
    invalid(field, rule.str() + got(v));
  return d;
}

std::string get_string(const json& v, const std::string& field) {
  if (!v.is_string()) invalid(field, field + " must be a string" + got(v));
  return v.get<std::string>();
}

std::string get_choice(const json& v, const std::string& field,
                       const std::vector<std::string>& choices) {
  const std::string rule = field + " must be one of " + one_of(choices);
  if (!v.is_string()) invalid(field, rule + got(v));
  const std::string s = lower(v.get<std::string>());
  if (std::find(choices.begin(), choices.end(), s) == choices.end()) invalid(field, rule + got(v));
  return s;
}

int get_side(const json& v, const std::string& field) {
  const std::string rule = field + " must be a multiple of 8 between " + std::to_string(kMinSide) +
                           " and " + std::to_string(kMaxSide);
  if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > kMaxSide))
    invalid(field, rule + got(v));
  const int64_t side = v.get<int64_t>();
  if (side < kMinSide || side > kMaxSide || side % 8 != 0) invalid(field, rule + got(v));
  return static_cast<int>(side);
}

uint64_t random_seed() {
  // 32 bits, like A1111, so that a reported seed can be typed into other tools.
  static std::mt19937_64 rng{std::random_device{}()};
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  return rng() & 0xffffffffull;
}

engine::PreviewOptions parse_preview(const json& v, int steps) {
  if (!v.is_object())
    invalid("preview",
            "preview must be an object such as {\"every\": 5, \"format\": \"jpeg\", "
            "\"max_size\": 256, \"method\": \"latent2rgb\"}, or absent" +
                got(v));
  engine::PreviewOptions p;
  for (const auto& [name, value] : v.items()) {
    const std::string field = "preview." + name;
    if (name == "every") {
      p.every = get_int(value, field, 1, std::max(1, steps));
    } else if (name == "format") {
      p.format = get_choice(value, field, {"jpeg", "png"});
    } else if (name == "max_size") {
      p.max_size = get_int(value, field, 16, kMaxSide);
    } else if (name == "method") {
      p.method = get_choice(value, field, {"latent2rgb", "vae"});
    } else {
      invalid(field.size() <= 72 ? field : std::string("preview"),
              "unknown field " + quoted_name(field) +
                  "; preview takes every, format, max_size and method");
    }
  }
  return p;
}

}  // namespace

std::string error_body(const std::string& type, const std::string& message,
                       const std::string& field) {
  Json err = {{"type", type}, {"message", message}};
  err["field"] = field.empty() ? Json(nullptr) : Json(field);
  return safe_json::dump(Json{{"error", err}});
}

const std::vector<std::string>& request_fields() {
  static const std::vector<std::string> fields = {
      "prompt",         "negative_prompt", "width",     "height",    "steps",
      "guidance_scale", "sampler",         "scheduler", "seed",      "num_images",
      "clip_skip",      "preview",         "priority",  "timeout_s", "cancel_on_disconnect"};
  return fields;
}

engine::JobRequest parse_job_request(const std::string& body, const RequestLimits& limits) {
  json doc;
  try {
    doc = safe_json::parse(body);
  } catch (const safe_json::Error& e) {
    throw ApiError(400, "invalid_json", std::string("the body is not valid JSON: ") + e.what());
  }
  if (!doc.is_object())
    throw ApiError(400, "invalid_json",
                   "the body must be a JSON object, e.g. {\"prompt\": \"a cat\"}");

  for (const auto& [name, value] : doc.items()) {
    const auto& known = request_fields();
    if (std::find(known.begin(), known.end(), name) == known.end())
      invalid(name.size() <= 64 ? name : name.substr(0, 64),
              "unknown field " + quoted_name(name) + "; known fields: " + one_of(known));
  }

  engine::JobRequest r;
  if (!doc.contains("prompt")) invalid("prompt", "prompt is required (a string)");
  r.prompt = get_string(doc["prompt"], "prompt");
  if (doc.contains("negative_prompt"))
    r.negative_prompt = get_string(doc["negative_prompt"], "negative_prompt");
  if (doc.contains("width")) r.width = get_side(doc["width"], "width");
  if (doc.contains("height")) r.height = get_side(doc["height"], "height");
  if (doc.contains("steps")) r.steps = get_int(doc["steps"], "steps", 1, kMaxSteps);
  if (doc.contains("guidance_scale"))
    r.guidance_scale = get_number(doc["guidance_scale"], "guidance_scale", 0, 30);

  // sampler / scheduler: ComfyUI or A1111 names; A1111's may carry the schedule ("... Karras").
  std::string sampler = "euler", scheduler;
  if (doc.contains("scheduler"))
    scheduler = get_choice(doc["scheduler"], "scheduler", pipeline::scheduler_names());
  if (doc.contains("sampler")) sampler = get_string(doc["sampler"], "sampler");
  if (sampler.size() > 64)  // no name is this long; keep the echo in the message short
    invalid("sampler", "sampler " + quoted_name(sampler) + " is unknown (see GET /v1/samplers)");
  try {
    pipeline::resolve_sampler(sampler, "");
  } catch (const pipeline::RequestError& e) {
    invalid("sampler", e.what());
  }
  try {
    const auto choice = pipeline::resolve_sampler(sampler, scheduler);
    r.sampler = choice.sampler;
    r.scheduler = choice.scheduler;
  } catch (const pipeline::RequestError& e) {
    invalid("scheduler", e.what());
  }

  if (doc.contains("seed") && !doc["seed"].is_null()) {
    const json& s = doc["seed"];
    const std::string rule =
        "seed must be an integer between 0 and 18446744073709551615, or -1 for a random one";
    if (!s.is_number_integer()) invalid("seed", rule + got(s));
    if (s.is_number_unsigned()) {
      r.seed = s.get<uint64_t>();
    } else if (s.get<int64_t>() == -1) {
      r.seed.reset();
    } else if (s.get<int64_t>() >= 0) {
      r.seed = static_cast<uint64_t>(s.get<int64_t>());
    } else {
      invalid("seed", rule + got(s));
    }
  }
  if (!r.seed) r.seed = random_seed();

  if (doc.contains("num_images"))
    r.num_images = get_int(doc["num_images"], "num_images", 1, kMaxImages);
  if (doc.contains("clip_skip"))
    r.clip_skip = get_int(doc["clip_skip"], "clip_skip", 1, std::max(1, limits.text_layers));
  if (doc.contains("preview") && !doc["preview"].is_null())
    r.preview = parse_preview(doc["preview"], r.steps);
  if (doc.contains("priority")) {
    const std::string p = get_choice(doc["priority"], "priority", {"high", "normal", "low"});
    r.priority = p == "high"  ? engine::Priority::kHigh
                 : p == "low" ? engine::Priority::kLow
                              : engine::Priority::kNormal;
  }
  if (doc.contains("timeout_s"))
    r.timeout_s = get_number(doc["timeout_s"], "timeout_s", 0, limits.max_timeout_s, true);
  if (doc.contains("cancel_on_disconnect")) {
    const json& c = doc["cancel_on_disconnect"];
    if (!c.is_boolean())
      invalid("cancel_on_disconnect", "cancel_on_disconnect must be true or false" + got(c));
    r.cancel_on_disconnect = c.get<bool>();
  }
  return r;
}

std::string field_of_message(const std::string& message) {
  // Messages start with the field's name ("width must be ...", "preview.every ...") or quote
  // it ("sampler 'x' is unknown").
  std::string first;
  for (char c : message) {
    if (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.')
      first += c;
    else
      break;
  }
  const auto& fields = request_fields();
  if (std::find(fields.begin(), fields.end(), first) != fields.end()) return first;
  if (first.rfind("preview.", 0) == 0) return first;
  for (const auto& f : fields)
    if (message.find(f) != std::string::npos) return f;
  return "";
}

std::string job_path(const std::string& id) {
  return "/v1/jobs/" + id;
}

std::string iso8601(engine::Clock::time_point t) {
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
  Json j = {{"prompt", r.prompt},
            {"negative_prompt", r.negative_prompt},
            {"width", r.width},
            {"height", r.height},
            {"steps", r.steps},
            {"guidance_scale", r.guidance_scale},
            {"sampler", r.sampler},
            {"scheduler", r.scheduler},
            {"num_images", r.num_images},
            {"clip_skip", r.clip_skip},
            {"priority", engine::to_string(r.priority)},
            {"cancel_on_disconnect", r.cancel_on_disconnect}};
  j["seed"] = r.seed ? Json(*r.seed) : Json(nullptr);
  j["timeout_s"] = r.timeout_s ? Json(*r.timeout_s) : Json(nullptr);
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
  auto when = [](const std::optional<engine::Clock::time_point>& at) {
    return at ? Json(iso8601(*at)) : Json(nullptr);
  };
  auto seconds = [](engine::Clock::time_point a, engine::Clock::time_point b) {
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

Json event_json(const engine::JobEvent& e) {
  using engine::EventType;
  Json j = {{"type", engine::to_string(e.type)}, {"job_id", e.job_id}};
  switch (e.type) {
    case EventType::kQueued:
      j["position"] = e.queue_position;
      break;
    case EventType::kStarted:
      j["step"] = e.step;
      j["steps"] = e.steps;
      break;
    case EventType::kProgress:
      j["step"] = e.step;
      j["steps"] = e.steps;
      j["it_per_s"] = e.it_per_s;
      break;
    case EventType::kPreview:
      j["image"] = e.image;
      j["step"] = e.step;
      j["steps"] = e.steps;
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
            {"step", job.step},
            // The engine counts model evaluations once the job runs (heun: 2 per step).
            {"steps", job.steps > 0 ? job.steps : job.request.steps},
            {"seed", job.seed},
            {"num_images", job.request.num_images},
            {"images_ready", job.images_ready},
            {"results_expired", job.results_expired},
            {"timings", timings_json(job.times)},
            {"links", {{"self", self}, {"events", self + "/events"}}}};
  j["queue_position"] = job.queue_position >= 0 ? Json(job.queue_position) : Json(nullptr);
  j["progress"] = job.status == engine::JobStatus::kSucceeded ? 1.0
                  : job.steps > 0 ? std::min(1.0, static_cast<double>(job.step) / job.steps)
                                  : 0.0;
  Json images = Json::array();
  if (job.status == engine::JobStatus::kSucceeded && !job.results_expired)
    for (int k = 0; k < job.request.num_images; ++k)
      images.push_back(self + "/images/" + std::to_string(k));
  j["images"] = images;
  j["error"] = job.error.empty() ? Json(nullptr) : Json(job.error);
  j["request"] = request_json(job.request);
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

}  // namespace sdserve::server
