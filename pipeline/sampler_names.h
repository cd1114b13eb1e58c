// The sampler catalogue as users name things: ComfyUI's names (canonical), A1111's display names
// ("DPM++ 2M Karras"), and the sigma schedules. Torch-free, so the API layer can validate requests.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace sdserve::pipeline {

struct SamplerInfo {
  std::string name;          // ComfyUI's: "euler_ancestral"
  std::string display_name;  // A1111's: "Euler a"
  bool supports_karras;
  std::string description;
};

const std::vector<SamplerInfo>& sampler_catalog();
const std::vector<std::string>& scheduler_names();  // "normal", "karras"

struct SamplerChoice {
  std::string sampler;    // canonical name
  std::string scheduler;  // "normal" | "karras"
};

// Accepts a ComfyUI name ("dpmpp_2m") or an A1111 display name, optionally with a schedule
// suffix ("DPM++ 2M Karras"); case-insensitive. `scheduler` may be empty (then the suffix or
// "normal" decides). Throws RequestError listing the known names when unrecognised or when
// karras is asked of a sampler that has no sigma schedule.
SamplerChoice resolve_sampler(const std::string& sampler, const std::string& scheduler = "");

// "DPM++ 2M" for "dpmpp_2m"; the name itself when unknown.
std::string display_name(const std::string& sampler);
std::string known_sampler_list();  // "pndm, ddim, euler, ..." for messages

}  // namespace sdserve::pipeline
