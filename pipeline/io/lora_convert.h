// LoRA files' tensor names -> the modules they adapt (torch-free).
//
// Two families of names reach us (docs: tests/fixtures/make/README.md, "LoRA"):
//  - kohya-ss / A1111: "lora_unet_<module>", "lora_te_<module>" (SDXL: "lora_te1_", "lora_te2_"),
//  each
//    with ".lora_down.weight", ".lora_up.weight" and ".alpha"; <module> is a module path with every
//    "." written "_" (ambiguous by itself: it is matched against the model's own module names, in
//    diffusers' layout, and for the UNet also in the sgm / LDM layout kohya uses for SDXL:
//    input_blocks.N.M ...).
//  - diffusers / PEFT: "unet.<module>.lora_A.weight" / ".lora_B.weight",
//  "text_encoder[_2].<module>...";
//    and diffusers' older names: "<module>.lora.down.weight", attention processors'
//    "<attn>.processor.to_q_lora.down.weight", text encoders' "self_attn.to_q_lora.down.weight" and
//    "<module>.lora_linear_layer.down.weight". <module> is a dotted path as our modules are named.
// Formats that are not LoRA / LoCon (LyCORIS LoHa, LoKr, DoRA, (IA)^3, GLoRA, full diffs, Tucker
// cores) are recognised by their tensor names so that they are refused by name.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace sdserve::pipeline::lora_names {

enum class Component { kUnet, kTextEncoder, kTextEncoder2 };
// "unet", "text_encoder", "text_encoder_2" (diffusers' prefixes).
const char* component_name(Component component);

enum class Part { kDown, kUp, kAlpha };

struct ParsedKey {
  bool kohya = false;  // kohya's underscored module name; else a dotted module path
  Component component = Component::kUnet;
  // kohya: the name after the prefix ("down_blocks_0_attentions_0_proj_in"); diffusers: the module
  // path under our names ("down_blocks.0.attentions.0.proj_in", text encoders without
  // "text_model.": "encoder.layers.0.self_attn.q_proj").
  std::string module;
  // diffusers only: the module path as the file's component names it (text encoders with
  // "text_model."), which PEFT's metadata patterns (rank_pattern, alpha_pattern) match.
  std::string peft_module;
  Part part = Part::kDown;
};

// The name of the unsupported adapter format a tensor name belongs to ("LyCORIS LoHa (hada_w1_a,
// ...)"), or "" when it belongs to none.
std::string unsupported_format(const std::string& key);

// A LoRA tensor name, or nullopt for a name that is neither (the caller reports it).
std::optional<ParsedKey> parse_key(const std::string& key);

// kohya's name for each adaptable module of a component: kohya's underscored spelling (without the
// "lora_unet_" / "lora_te*_" prefix) -> our module name. `modules`: the component's module names.
// The UNet's get both layouts (diffusers' names, which kohya uses for SD 1.x, and sgm's, which it
// uses for SDXL); the text encoders' get "text_model_" in front, as transformers names them.
std::map<std::string, std::string> kohya_module_names(Component component,
                                                      const std::vector<std::string>& modules);

// The UNet module name in the sgm / LDM layout (input_blocks.1.0.in_layers.2 for
// down_blocks.0.resnets.0.conv1), or "" where there is none. `modules`: all the UNet's module names
// (block sizes come from them).
std::string sgm_unet_name(const std::string& module, const std::vector<std::string>& modules);

}  // namespace sdserve::pipeline::lora_names
