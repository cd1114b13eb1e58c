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
// SDXL's two text encoders: CLIP-L in transformers' names, OpenCLIP-G in OpenCLIP's.
inline constexpr const char* kSdxlClipPrefix = "conditioner.embedders.0.transformer.text_model.";
inline constexpr const char* kSdxlOpenClipPrefix = "conditioner.embedders.1.model.";

// What refusals end with: the families sdserve loads, and the ones it does not yet.
inline constexpr const char* kSupportedFamilies =
    "sdserve loads Stable Diffusion 1.x, 2.x and XL text-to-image models (a diffusers folder "
    "or an original-layout .safetensors file); not yet SD 3, Flux, the SDXL refiner, "
    "inpainting UNets (9 input channels) or other UNet variants";

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
// `sd1_heads`: 8 heads per block (SD 1.x); otherwise heads of 64 dims (SD 2.x, SDXL), and a
// level whose width is no multiple of 64 is refused. text_time (SDXL) is left to the caller.
// `infer_heads` false: a diffusers folder supplies the config, so a width without 64-dim heads
// is not refused.
nlohmann::json infer_unet_config(const SafetensorsFile& file, bool sd1_heads,
                                 bool infer_heads = true);

// AutoencoderKL config: block_out_channels, layers_per_block, in/out/latent channels and the
// quant convs come from shapes; scaling_factor 0.18215 and 32 norm groups are SD 1.x's.
nlohmann::json infer_vae_config(const SafetensorsFile& file);

// CLIPTextModel config: width, depth, MLP width, vocabulary and positions come from shapes.
// Heads: width / 64 when the width is a multiple of 64 (every released CLIP, e.g. SD 1.x's
// CLIP ViT-L/14: 768 -> 12 heads); otherwise width / 8 (test-size models such as the 32-wide,
// 4-head fixture), since the weights do not record the head count.
// `prefix`: up to and including "text_model." (or text_encoder_prefix()'s old form).
nlohmann::json infer_text_encoder_config(const SafetensorsFile& file, const std::string& prefix);

// The PNDM scheduler config SD 1.5 ships.
nlohmann::json sd1_scheduler_config();

}  // namespace sdserve::pipeline
