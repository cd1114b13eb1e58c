#include "pipeline/sampler_names.h"

#include <algorithm>
#include <cctype>

#include "pipeline/errors.h"

namespace sdserve::pipeline {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

}  // namespace

const std::vector<SamplerInfo>& sampler_catalog() {
  static const std::vector<SamplerInfo> catalog = {
      {"euler", "Euler", true, "Euler (k-diffusion), deterministic"},
      {"euler_ancestral", "Euler a", true, "Euler ancestral: adds fresh noise every step"},
      {"heun", "Heun", true, "Heun's 2nd order: two model evaluations per step"},
      {"dpmpp_2m", "DPM++ 2M", true, "DPM-Solver++ 2M multistep"},
      {"lms", "LMS", true, "Linear multistep (order 4)"},
      {"ddim", "DDIM", false, "DDIM, eta 0"},
      {"pndm", "PLMS", false, "PNDM / PLMS (SD 1.5's default scheduler)"},
      {"uni_pc", "UniPC", true, "UniPC multistep (bh2)"},
  };
  return catalog;
}

const std::vector<std::string>& scheduler_names() {
  static const std::vector<std::string> names = {"normal", "karras"};
  return names;
}

std::string known_sampler_list() {
  std::string out;
  for (const auto& s : sampler_catalog()) out += (out.empty() ? "" : ", ") + s.name;
  return out;
}

std::string display_name(const std::string& sampler) {
  for (const auto& s : sampler_catalog())
    if (s.name == sampler) return s.display_name;
  return sampler;
}

SamplerChoice resolve_sampler(const std::string& sampler_in, const std::string& scheduler_in) {
  std::string name = lower(trim(sampler_in));
  std::string schedule = lower(trim(scheduler_in));
  // A1111 folds the schedule into the display name: "DPM++ 2M Karras".
  const std::string suffix = " karras";
  if (name.size() > suffix.size() &&
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
    name = trim(name.substr(0, name.size() - suffix.size()));
    if (!schedule.empty() && schedule != "karras")
      throw RequestError("scheduler", "sampler '" + sampler_in +
                                          "' names the karras schedule but scheduler is '" +
                                          scheduler_in + "'");
    schedule = "karras";
  }
  if (schedule.empty()) schedule = "normal";
  if (std::find(scheduler_names().begin(), scheduler_names().end(), schedule) ==
      scheduler_names().end())
    throw RequestError("scheduler",
                       "scheduler '" + scheduler_in + "' is unknown; known: normal, karras");
  for (const auto& s : sampler_catalog()) {
    if (name == s.name || name == lower(s.display_name)) {
      if (schedule == "karras" && !s.supports_karras)
        throw RequestError(
            "scheduler",
            "sampler '" + s.name +
                "' has no sigma schedule, so 'karras' does not apply; use scheduler "
                "'normal' or one of: euler, euler_ancestral, heun, dpmpp_2m, lms, uni_pc");
      return {s.name, schedule};
    }
  }
  throw RequestError("sampler", "sampler '" + sampler_in +
                                    "' is unknown; known: " + known_sampler_list() +
                                    " (A1111 names such as 'DPM++ 2M Karras' work too)");
}

}  // namespace sdserve::pipeline
