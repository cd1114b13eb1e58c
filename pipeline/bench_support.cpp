#include "pipeline/bench_support.h"

#include <ATen/detail/CUDAHooksInterface.h>

#include <algorithm>
#include <cmath>
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

// SDXL base 1.0's published configs (stabilityai/stable-diffusion-xl-base-1.0).
const json kSdxlUNet = json::parse(R"({
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
  "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4,
  "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
  "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]})");
const json kSdxlText2 = json::parse(R"({
  "architectures": ["CLIPTextModelWithProjection"], "bos_token_id": 0, "eos_token_id": 2,
  "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 20,
  "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280, "vocab_size": 49408})");
const json kSdxlScheduler = json::parse(R"({
  "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon",
  "steps_offset": 1, "timestep_spacing": "leading"})");

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

void put_f16(std::map<std::string, TensorData>& tensors, const std::string& name,
             const torch::Tensor& value) {
  auto t = value.to(torch::kFloat16).contiguous();
  TensorData d{DType::kF16, t.sizes().vec(), std::vector<std::byte>(t.nbytes())};
  std::memcpy(d.bytes.data(), t.data_ptr(), t.nbytes());
  tensors[name] = std::move(d);
}

}  // namespace

std::vector<std::string> write_random_loras(const Model& model, const std::string& dir, int count,
                                            int rank, uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto& impl = model.impl();
  fs::create_directories(dir);
  auto generator = at::detail::createCPUGenerator(seed);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  // (kohya prefix, module): the UNet's transformer modules and the text encoders' projections.
  std::vector<std::pair<std::string, torch::Tensor>> targets;
  for (const auto& item : impl.unet->named_modules("", false)) {
    if (item.key().find(".attentions.") == std::string::npos) continue;
    torch::Tensor w;
    if (const auto* l = item.value()->as<torch::nn::LinearImpl>()) w = l->weight;
    if (const auto* c = item.value()->as<torch::nn::Conv2dImpl>()) w = c->weight;
    if (w.defined()) targets.emplace_back("lora_unet_" + item.key(), w);
  }
  const bool two = static_cast<bool>(impl.text_encoder_2);
  for (const auto& [prefix, encoder] :
       {std::pair{two ? "lora_te1_text_model_" : "lora_te_text_model_", impl.text_encoder},
        std::pair{"lora_te2_text_model_", impl.text_encoder_2}}) {
    if (!encoder) continue;
    for (const auto& item : encoder->named_modules("", false))
      if (const auto* l = item.value()->as<torch::nn::LinearImpl>())
        if (item.key().find("encoder.layers.") == 0)
          targets.emplace_back(prefix + item.key(), l->weight);
  }
  std::vector<std::string> paths;
  for (int k = 0; k < count; ++k) {
    std::map<std::string, TensorData> tensors;
    for (auto [name, w] : targets) {
      std::replace(name.begin(), name.end(), '.', '_');
      const int64_t fan_in = w[0].numel();
      auto down_shape = w.sizes().vec();
      down_shape[0] = rank;
      std::vector<int64_t> up_shape = {w.size(0), rank};
      if (w.dim() == 4) up_shape.insert(up_shape.end(), {1, 1});
      put_f16(tensors, name + ".lora_down.weight",
              torch::randn(down_shape, generator, opts) / std::sqrt(static_cast<double>(fan_in)));
      put_f16(tensors, name + ".lora_up.weight", torch::randn(up_shape, generator, opts) * 0.01);
      put_f16(tensors, name + ".alpha", torch::tensor(static_cast<float>(rank)));
    }
    const auto path = (fs::path(dir) / ("random-lora-" + std::to_string(k) + "-r" +
                                        std::to_string(rank) + ".safetensors"))
                          .string();
    write_safetensors(path, tensors);
    paths.push_back(path);
  }
  return paths;
}

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

void write_random_sdxl(const std::string& dir, uint64_t seed) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  const fs::path root(dir);
  write_json(root / "model_index.json",
             {{"_class_name", "StableDiffusionXLPipeline"},
              {"force_zeros_for_empty_prompt", true},
              {"scheduler", {"diffusers", "EulerDiscreteScheduler"}},
              {"text_encoder", {"transformers", "CLIPTextModel"}},
              {"text_encoder_2", {"transformers", "CLIPTextModelWithProjection"}},
              {"tokenizer", {"transformers", "CLIPTokenizer"}},
              {"tokenizer_2", {"transformers", "CLIPTokenizer"}},
              {"unet", {"diffusers", "UNet2DConditionModel"}},
              {"vae", {"diffusers", "AutoencoderKL"}}});
  json vae = kVae;
  vae["scaling_factor"] = 0.13025;
  vae["force_upcast"] = true;
  vae["sample_size"] = 1024;
  write_json(root / "unet/config.json", kSdxlUNet);
  write_json(root / "vae/config.json", vae);
  write_json(root / "text_encoder/config.json", kText);
  write_json(root / "text_encoder_2/config.json", kSdxlText2);
  write_json(root / "scheduler/scheduler_config.json", kSdxlScheduler);
  const fs::path bundled = bundled_model_path();
  for (const char* tokenizer : {"tokenizer", "tokenizer_2"}) {
    fs::create_directories(root / tokenizer);
    for (const char* f : {"vocab.json", "merges.txt"})
      fs::copy_file(bundled / "tokenizer" / f, root / tokenizer / f,
                    fs::copy_options::overwrite_existing);
  }
  write_json(root / "tokenizer_2/tokenizer_config.json", {{"pad_token", "!"}});
  {
    ClipTextModel text(ClipTextConfig::from_json(kText));
    write_module(root / "text_encoder/model.safetensors", *text);
  }
  {
    ClipTextModel text(ClipTextConfig::from_json(kSdxlText2));
    write_module(root / "text_encoder_2/model.safetensors", *text);
  }
  {
    UNet unet(UNetConfig::from_json(kSdxlUNet));
    write_module(root / "unet/diffusion_pytorch_model.safetensors", *unet);
  }
  {
    Vae v(VaeConfig::from_json(vae));
    write_module(root / "vae/diffusion_pytorch_model.safetensors", *v);
  }
}

}  // namespace sdserve::pipeline::bench_support
