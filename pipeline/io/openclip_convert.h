// OpenCLIP's text transformer as transformers' CLIPTextModel(WithProjection): the second text
// encoder of an original-layout SDXL file (conditioner.embedders.1.model.*) and SD 2.x's
// (cond_stage_model.model.*). Renames every tensor, splits the fused attention projection
// (attn.in_proj_weight / bias: q, k, v stacked) into q/k/v views, and reads text_projection
// transposed (OpenCLIP multiplies x @ P; a Linear stores P^T). Nothing is copied.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "pipeline/io/safetensors.h"
#include "pipeline/io/tensor_io.h"

namespace sdserve::pipeline {

struct OpenClipLayout {
  std::string prefix;  // up to and including "model."
  // SD 2.x conditions on the penultimate layer, so diffusers' text_encoder keeps all layers
  // but the last (published SD 2.x folders ship 23 of OpenCLIP-H's 24); SDXL keeps them all.
  bool drop_last_layer = false;
  bool with_projection = false;  // SDXL: text_projection gives the pooled embedding
  // False when a diffusers folder supplies the config: a width without 64-dim heads is then
  // not refused (the head count written is a placeholder the folder's config replaces).
  bool infer_heads = true;
};

// The CLIPTextModel(WithProjection) config.json the tensors imply: widths, depth, vocabulary
// and positions from shapes, gelu (OpenCLIP's), heads of 64 dims (every released OpenCLIP text
// tower: ViT-H 1024 -> 16, ViT-bigG 1280 -> 20).
nlohmann::json infer_openclip_config(const SafetensorsFile& file, const OpenClipLayout& layout);

// The weights under the module's names (transformers' CLIPTextModel without "text_model.").
WeightSource openclip_weights(const std::shared_ptr<SafetensorsFile>& file,
                              const OpenClipLayout& layout, const nlohmann::json& config,
                              const std::string& component);

}  // namespace sdserve::pipeline
