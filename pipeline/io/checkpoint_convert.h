// Reads an original-layout (A1111 / civitai) single-file checkpoint as diffusers-layout
// components: detects the model family, infers the configs (checkpoint_config.h) and renames
// every tensor the modules need from its LDM name to its diffusers / transformers name.
// Nothing is copied: the WeightSources view the file's mapping.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "pipeline/io/safetensors.h"
#include "pipeline/io/tensor_io.h"

namespace sdserve::pipeline {

struct ConvertedCheckpoint {
  std::string family;  // "sd1"
  nlohmann::json unet_config, vae_config, text_encoder_config;
  WeightSource unet, vae, text_encoder;
};

// Throws ModelError: for another family (SDXL, SD 2.x, SD 3, Flux, SD 1.x inpainting) naming
// it, for anything else unrecognised (a LoRA, a lone VAE...), and for a missing tensor naming it.
ConvertedCheckpoint convert_single_file(const std::shared_ptr<SafetensorsFile>& file);

// Display names of the families sdserve refuses; the loaders' messages use them.
inline constexpr const char* kFamilySdxl = "Stable Diffusion XL";
inline constexpr const char* kFamilySd2 = "Stable Diffusion 2.x";
inline constexpr const char* kFamilySd3 = "Stable Diffusion 3";
inline constexpr const char* kFamilyFlux = "Flux";
inline constexpr const char* kFamilySd1Inpaint = "Stable Diffusion 1.x inpainting";

// Refuses a UNet whose input channels or cross-attention width belong to another family
// (shared by both layouts; `source` names the file the numbers came from).
void check_sd1_unet(const std::string& source, int64_t in_channels, int64_t cross_attention_dim);

}  // namespace sdserve::pipeline
