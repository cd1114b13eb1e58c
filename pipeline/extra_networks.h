// AUTOMATIC1111's "extra networks" in a prompt, torch-free: `<lora:NAME:WEIGHT>`,
// `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>` (or `te=`/`unet=`), and other kinds (`<hypernet:...>`). As
// A1111's modules/extra_networks.py reads them: a tag is `<` word `:` anything but `>` `>`, its
// arguments split at `:`, an argument `key=value` named, the rest positional; every tag is
// removed from the text before the prompt's weights are parsed.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace sdserve::pipeline {

struct ExtraNetwork {
  std::string kind;  // "lora", "hypernet", ...
  std::vector<std::string> positional;
  std::map<std::string, std::string> named;
};

// Tags in a prompt beyond this are refused (RequestError), a bound against hostile prompts.
constexpr size_t kMaxExtraNetworks = 32;

// The prompt with its tags removed (the text the encoder reads); the tags into `found` when
// given. Throws RequestError(field) past kMaxExtraNetworks tags.
std::string strip_extra_networks(std::string_view prompt,
                                 std::vector<ExtraNetwork>* found = nullptr,
                                 const std::string& field = "prompt");

// A LoRA a prompt asks for.
struct LoraTag {
  std::string name;
  double te_weight = 1.0;    // the text encoders'
  double unet_weight = 1.0;  // the UNet's; A1111: the text encoders' unless given
};

// The prompt's `<lora:...>` tags (`<lyco:...>`, the LyCORIS extension's name, too), as A1111's
// Lora extension reads them. Throws RequestError(field) for a tag of another kind (sdserve has no
// hypernetworks), a LoRA tag without a name, a weight that is not a number or beyond +-100, and
// arguments A1111's LoRA takes that sdserve does not (`dyn`).
std::vector<LoraTag> lora_tags(std::string_view prompt, const std::string& field = "prompt");

}  // namespace sdserve::pipeline
