// Reads an original-layout (A1111 / civitai) single-file checkpoint as diffusers-layout
// components: detects the model family, infers the configs (checkpoint_config.h) and renames
// every tensor the modules need from its LDM name to its diffusers / transformers name.
// Nothing is copied: the WeightSources view the file's mapping.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "pipeline/io/safetensors.h"
#include "pipeline/io/tensor_io.h"

namespace sdserve::pipeline {

struct ConvertedCheckpoint {
  std::string family;  // "sd1" | "sd2" | "sdxl"
  nlohmann::json unet_config, vae_config, text_encoder_config, scheduler_config;
  WeightSource unet, vae, text_encoder;
  // SDXL: the OpenCLIP-G encoder (text_encoder_2_config null otherwise).
  nlohmann::json text_encoder_2_config;
  WeightSource text_encoder_2;
};

// Families by their text encoders: cond_stage_model.transformer.* (CLIP-L: SD 1.x),
// cond_stage_model.model.* (OpenCLIP-H: SD 2.x), conditioner.embedders.0/1 (CLIP-L and
// OpenCLIP-G: SDXL). Throws ModelError: for another family (SD 3, Flux, the SDXL refiner,
// inpainting) naming it, for anything else unrecognised (a LoRA, a lone VAE...), and for a
// missing tensor naming it.
// `configs_given`: a diffusers folder will replace the inferred configs (head counts are then
// not inferred, so not refused).
ConvertedCheckpoint convert_single_file(const std::shared_ptr<SafetensorsFile>& file,
                                        bool configs_given = false);

// Display names of the families sdserve refuses; the loaders' messages use them.
inline constexpr const char* kFamilySdxlRefiner = "the Stable Diffusion XL refiner";
inline constexpr const char* kFamilySd3 = "Stable Diffusion 3";
inline constexpr const char* kFamilyFlux = "Flux";
inline constexpr const char* kFamilyPix2Pix = "an InstructPix2Pix model";

// The (diffusers name, original-layout name below the component's prefix) pairs the converter
// reads for a UNet / VAE of this config: tests build original-layout files from folders with it.
std::vector<std::pair<std::string, std::string>> ldm_unet_names(const nlohmann::json& config);
std::vector<std::pair<std::string, std::string>> ldm_vae_names(const nlohmann::json& config);

// Refuses a UNet whose input channels belong to another kind of model (9: inpainting; shared by
// both layouts; `source` names the file the number came from).
void check_unet_inputs(const std::string& source, int64_t in_channels);

}  // namespace sdserve::pipeline
