#include "sdload/workload.h"

#include <fstream>

namespace sdload {
namespace {

using json = nlohmann::json;

// A few prompts that recur (the server's prompt-embedding cache should help them) ...
const char* const kRepeated[] = {
    "a lighthouse at dusk, oil painting",
    "a cat sleeping on a windowsill, soft morning light",
    "portrait of an old sailor, dramatic lighting, highly detailed",
    "a bowl of ramen, studio photograph",
    "snowy mountains under a violet sky, matte painting",
    "a red bicycle leaning on a brick wall in the rain",
};
// ... and the parts of prompts that never recur.
const char* const kSubjects[] = {"a fox",   "an astronaut", "a teapot",    "a castle",
                                 "a robot", "a sailboat",   "a dragon",    "a library",
                                 "a tram",  "an orchard",   "a waterfall", "a violinist"};
const char* const kPlaces[] = {"in a misty forest", "on the moon",     "in a busy market",
                               "under the sea",     "in a snow globe", "at golden hour",
                               "in a neon city",    "on a quiet beach"};
const char* const kStyles[] = {"watercolor",
                               "35mm photo",
                               "pixel art",
                               "ukiyo-e",
                               "charcoal sketch",
                               "3d render",
                               "impressionist painting"};

struct SamplerChoice {
  const char* sampler;
  const char* scheduler;
};
const SamplerChoice kSamplers[] = {
    {"euler", "normal"}, {"euler_ancestral", "normal"}, {"dpmpp_2m", "karras"}, {"ddim", "normal"}};
const int kSteps[] = {20, 25, 30, 40};
const int kSizes[][2] = {{512, 512}, {512, 512}, {512, 768}, {768, 512}, {640, 640}};

template <typename T, size_t N>
const T& pick(std::mt19937_64& rng, const T (&items)[N]) {
  return items[std::uniform_int_distribution<size_t>(0, N - 1)(rng)];
}

// The fields the server defaults when a request leaves them out (README "API").
int int_field(const json& body, const char* name, int fallback) {
  const auto it = body.find(name);
  return it != body.end() && it->is_number_integer() ? it->get<int>() : fallback;
}

std::vector<json> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UsageError("--prompts: cannot read '" + path + "'");
  std::vector<json> lines;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw UsageError(path + ":" + std::to_string(number) + ": not JSON: " + e.what());
    }
    if (!j.is_object())
      throw UsageError(path + ":" + std::to_string(number) + ": expected a JSON object");
    lines.push_back(std::move(j));
  }
  if (lines.empty()) throw UsageError("--prompts: '" + path + "' has no jobs");
  return lines;
}

}  // namespace

Workload::Workload(const Options& options) : options_(options), rng_(options.seed) {
  if (!options_.prompts_file.empty()) lines_ = read_jsonl(options_.prompts_file);
}

json Workload::fixed_job() const {
  return {{"prompt", kRepeated[0]}, {"width", 512},          {"height", 512},        {"steps", 30},
          {"sampler", "euler"},     {"scheduler", "normal"}, {"guidance_scale", 7.5}};
}

json Workload::builtin_job() {
  json body = fixed_job();
  // Half the jobs repeat a prompt, half are new: both paths of the embedding cache.
  if (std::bernoulli_distribution(0.5)(rng_)) {
    body["prompt"] = pick(rng_, kRepeated);
  } else {
    body["prompt"] = std::string(pick(rng_, kSubjects)) + " " + pick(rng_, kPlaces) + ", " +
                     pick(rng_, kStyles) + ", variation " + std::to_string(count_);
  }
  if (std::bernoulli_distribution(0.3)(rng_)) body["negative_prompt"] = "blurry, low quality";
  const SamplerChoice& s = pick(rng_, kSamplers);
  body["sampler"] = s.sampler;
  body["scheduler"] = s.scheduler;
  body["steps"] = pick(rng_, kSteps);
  const auto& size = pick(rng_, kSizes);
  body["width"] = size[0];
  body["height"] = size[1];
  return body;
}

void Workload::apply_overrides(json& body) {
  if (options_.width) body["width"] = options_.width;
  if (options_.height) body["height"] = options_.height;
  if (options_.steps_min)
    body["steps"] =
        std::uniform_int_distribution<int>(options_.steps_min, options_.steps_max)(rng_);
  if (!options_.sampler.empty()) {
    body["sampler"] = options_.sampler;
    // The mix's schedule may not suit this sampler (ddim has no karras; "DPM++ 2M Karras" names
    // its own): leave it to the server unless --scheduler says.
    body.erase("scheduler");
  }
  if (!options_.scheduler.empty()) body["scheduler"] = options_.scheduler;
}

JobSpec Workload::next() {
  json body;
  if (!lines_.empty()) {
    // Defaults < the line < the command line's fixed values.
    body = fixed_job();
    const size_t k = std::uniform_int_distribution<size_t>(0, lines_.size() - 1)(rng_);
    // A line that names its sampler gets the server's schedule for it, not the default's.
    if (lines_[k].contains("sampler")) body.erase("scheduler");
    body.update(lines_[k]);
  } else {
    body = options_.mix == "fixed" ? fixed_job() : builtin_job();
  }
  apply_overrides(body);
  // A seed from our generator, not the server's: the same traffic gives the same images.
  if (!body.contains("seed")) body["seed"] = rng_() >> 16;
  ++count_;
  JobSpec spec;
  spec.width = int_field(body, "width", 512);
  spec.height = int_field(body, "height", 512);
  spec.images = int_field(body, "num_images", 1);
  spec.body = std::move(body);
  return spec;
}

double Workload::mean_images() const {
  if (lines_.empty()) return 1.0;
  double sum = 0;
  for (const auto& line : lines_) sum += std::max(1, int_field(line, "num_images", 1));
  return sum / static_cast<double>(lines_.size());
}

std::string Workload::describe() const {
  if (!lines_.empty())
    return std::to_string(lines_.size()) + " request(s) from " + options_.prompts_file;
  return options_.mix == "fixed" ? "fixed job" : "built-in mix";
}

Arrivals::Arrivals(double jobs_per_s, uint64_t seed)
    : rng_(seed ^ 0x9e3779b97f4a7c15ULL), gap_(jobs_per_s) {}

}  // namespace sdload
