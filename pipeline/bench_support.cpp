#include "pipeline/bench_support.h"

#include <ATen/detail/CUDAHooksInterface.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "pipeline/io/safetensors.h"
#include "pipeline/model_impl.h"
#include "pipeline/nn/clip.h"
#include "pipeline/nn/unet.h"
#include "pipeline/nn/vae.h"
#include "pipeline/runtime/device.h"

#ifdef SDSERVE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <cuda_profiler_api.h>
#endif

namespace sdserve::pipeline::bench_support {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// SD 1.5's published configs (runwayml/stable-diffusion-v1-5), the architecture the reference
// figures were measured on.
const json kUNet = json::parse(R"({
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]})");
const json kVae = json::parse(R"({
  "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]})");
const json kText = json::parse(R"({
  "architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
  "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
  "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408})");

void write_json(const fs::path& p, const json& j) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << j.dump(2);
}

void write_module(const fs::path& file, torch::nn::Module& module) {
  std::map<std::string, TensorData> tensors;
  for (const auto& item : module.named_parameters(true)) {
    auto t = item.value().detach().to(torch::kFloat16).contiguous();
    TensorData d{DType::kF16, t.sizes().vec(), std::vector<std::byte>(t.nbytes())};
    std::memcpy(d.bytes.data(), t.data_ptr(), t.nbytes());
    tensors.emplace(item.key(), std::move(d));
  }
  fs::create_directories(file.parent_path());
  write_safetensors(file.string(), tensors);
}

}  // namespace

void set_profiling(const Model& model, bool on) {
  model.impl().profiling = on;
}

StepProfile last_step_profile(const Model& model) {
  return model.impl().last_profile;
}

void synchronize(const Model& model) {
  pipeline::synchronize(model.impl().device);
}

DeviceMemory memory(const Model& model, bool reset_peak) {
  return device_memory(model.impl().device, reset_peak);
}

bool start_trace() {
#ifdef SDSERVE_WITH_CUDA
  return cudaProfilerStart() == cudaSuccess;
#else
  return false;
#endif
}

void stop_trace() {
#ifdef SDSERVE_WITH_CUDA
  cudaProfilerStop();
#endif
}

std::string device_name(const std::string& device) {
#ifdef SDSERVE_WITH_CUDA
  torch::Device d(device);
  if (d.is_cuda()) return at::cuda::getDeviceProperties(d.index())->name;
#endif
  return device;
}

std::string torch_version() {
  return TORCH_VERSION;
}

std::string cuda_version() {
  try {
    const auto& hooks = at::detail::getCUDAHooks();
    if (!hooks.hasCUDA()) return "none";
    const long v = hooks.versionCUDART();  // e.g. 13000
    return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
  } catch (const std::exception&) {  // a torch without its CUDA library
    return "none";
  }
}

void write_random_sd15(const std::string& dir, uint64_t seed) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  const fs::path root(dir);
  write_json(root / "model_index.json", {{"_class_name", "StableDiffusionPipeline"},
                                         {"scheduler", {"diffusers", "PNDMScheduler"}},
                                         {"text_encoder", {"transformers", "CLIPTextModel"}},
                                         {"tokenizer", {"transformers", "CLIPTokenizer"}},
                                         {"unet", {"diffusers", "UNet2DConditionModel"}},
                                         {"vae", {"diffusers", "AutoencoderKL"}}});
  write_json(root / "unet/config.json", kUNet);
  write_json(root / "vae/config.json", kVae);
  write_json(root / "text_encoder/config.json", kText);
  const fs::path bundled = bundled_model_path();
  fs::create_directories(root / "tokenizer");
  fs::create_directories(root / "scheduler");
  for (const char* f :
       {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"})
    fs::copy_file(bundled / "tokenizer" / f, root / "tokenizer" / f,
                  fs::copy_options::overwrite_existing);
  fs::copy_file(bundled / "scheduler/scheduler_config.json",
                root / "scheduler/scheduler_config.json", fs::copy_options::overwrite_existing);
  {
    ClipTextModel text(ClipTextConfig::from_json(kText));
    write_module(root / "text_encoder/model.safetensors", *text);
  }
  {
    UNet unet(UNetConfig::from_json(kUNet));
    write_module(root / "unet/diffusion_pytorch_model.safetensors", *unet);
  }
  {
    Vae vae(VaeConfig::from_json(kVae));
    write_module(root / "vae/diffusion_pytorch_model.safetensors", *vae);
  }
}

}  // namespace sdserve::pipeline::bench_support
