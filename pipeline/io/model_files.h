// Turns the user's --model path into configs and per-component weight sources, for both layouts
// SD 1.x, SD 2.x and SDXL models come in:
//  - a diffusers folder: model_index.json; unet/, vae/, text_encoder/ (config.json + weights);
//    tokenizer/ (vocab.json, merges.txt); scheduler/scheduler_config.json; SDXL adds
//    text_encoder_2/ and tokenizer_2/;
//  - an original-layout (A1111 / civitai) single .safetensors file, whose configs are inferred
//    from tensor shapes and whose tensors are renamed to the diffusers names.
// Everything else (other families, pickle checkpoints, broken files) is refused with a
// ModelError that names the file and says what to do.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "pipeline/io/tensor_io.h"

namespace sdserve::pipeline {

struct ModelFiles {
  std::string path;    // as given
  std::string layout;  // "diffusers" | "single-file"
  std::string family;  // "sd1" | "sd2" | "sdxl"
  // diffusers / transformers config.json contents (inferred for a single file).
  nlohmann::json unet_config, vae_config, text_encoder_config, scheduler_config;
  std::string vocab_path, merges_path;
  std::string pad_token;  // the tokenizer's padding token; empty: <|endoftext|>
  // Tensors under the names the modules register: diffusers names for the UNet and VAE,
  // transformers' CLIPTextModel names without the "text_model." prefix for the text encoder.
  // Stored dtypes are kept (fp32/fp16/bf16); load_weights converts.
  WeightSource unet, vae, text_encoder;
  // SDXL only (text_encoder_2_config is null otherwise): the second text encoder
  // (CLIPTextModelWithProjection) and its tokenizer.
  nlohmann::json text_encoder_2_config;
  WeightSource text_encoder_2;
  std::string vocab_path_2, merges_path_2, pad_token_2;
  bool force_zeros_for_empty_prompt = false;  // model_index.json; SDXL's default is true
};

// `default_tokenizer_dir` holds vocab.json and merges.txt for single files, which carry no
// tokenizer (every SD family uses CLIP's BPE vocabulary). `single_file_config`, when given, is
// a diffusers folder whose configs, tokenizers and scheduler a single file uses instead of
// inferred ones (LoadOptions::single_file_config). Throws ModelError.
ModelFiles open_model_files(const std::string& path, const std::string& default_tokenizer_dir,
                            const std::string& single_file_config = "");

// Whether a file is one of PyTorch's pickle formats (by extension: .ckpt, .pt, .pth, .bin, .pkl;
// or by its first bytes: a zip archive or a pickle stream), which sdserve never loads.
bool is_pickle_file(const std::string& path);

}  // namespace sdserve::pipeline
