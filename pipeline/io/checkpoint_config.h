// Infers diffusers / transformers config.json contents from the tensor shapes of an
// original-layout (A1111 / civitai) SD 1.x checkpoint, which ships no configs of its own.
//
// What the shapes cannot tell (attention heads, norm groups, the noise schedule) comes from the
// SD 1.x defaults; see each function for its rules.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "pipeline/io/safetensors.h"

namespace sdserve::pipeline {

// Prefixes of the three components inside an original-layout checkpoint.
inline constexpr const char* kLdmUnetPrefix = "model.diffusion_model.";
inline constexpr const char* kLdmVaePrefix = "first_stage_model.";
// The text encoder's prefix: transformers' CLIPTextModel names follow it. Old checkpoints (saved
// with transformers < 4.21) lack the "text_model." level; text_encoder_prefix() finds which.
inline constexpr const char* kLdmClipPrefix = "cond_stage_model.transformer.text_model.";
inline constexpr const char* kLdmClipOldPrefix = "cond_stage_model.transformer.";

// Refusals shared by the folder and single-file loaders. `family` is a display name such as
// "Stable Diffusion XL"; `evidence` says what gave it away.
[[noreturn]] void refuse_family(const std::string& path, const std::string& family,
                                const std::string& evidence);
[[noreturn]] void refuse_unrecognised(const std::string& path, const std::string& why);

// The tensor `name`, or a ModelError naming it, the file and the component it belongs to.
const TensorView& require_tensor(const SafetensorsFile& file, const std::string& name,
                                 const std::string& component);

// The text encoder prefix the file uses (one of the two above).
std::string text_encoder_prefix(const SafetensorsFile& file);

// UNet2DConditionModel config. block_out_channels, layers_per_block, block types (attention or
// not), in/out channels, cross_attention_dim, transformer depth and use_linear_projection come
// from shapes; attention_head_dim is 8 (SD 1.x: 8 heads in every block, diffusers' convention).
nlohmann::json infer_unet_config(const SafetensorsFile& file);

// AutoencoderKL config: block_out_channels, layers_per_block, in/out/latent channels and the
// quant convs come from shapes; scaling_factor 0.18215 and 32 norm groups are SD 1.x's.
nlohmann::json infer_vae_config(const SafetensorsFile& file);

// CLIPTextModel config: width, depth, MLP width, vocabulary and positions come from shapes.
// Heads: width / 64 when the width is a multiple of 64 (every released CLIP, e.g. SD 1.x's
// CLIP ViT-L/14: 768 -> 12 heads); otherwise width / 8 (test-size models such as the 32-wide,
// 4-head fixture), since the weights do not record the head count.
nlohmann::json infer_text_encoder_config(const SafetensorsFile& file);

// The PNDM scheduler config SD 1.5 ships.
nlohmann::json sd1_scheduler_config();

}  // namespace sdserve::pipeline
