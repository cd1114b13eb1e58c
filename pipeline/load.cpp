// Loading a model: the device and precision, the files, the modules and their weights, and the
// load log line that says where the time went.
#include "pipeline/pipeline.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "pipeline/errors.h"
#include "pipeline/io/model_files.h"
#include "pipeline/log.h"
#include "pipeline/model_impl.h"
#include "pipeline/runtime/device.h"
#include "pipeline/samplers/schedule.h"

#ifdef SDSERVE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sdserve::pipeline {
namespace {

// "1.23 s"
std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f s", s);
  return buf;
}

torch::Device pick_device(const std::string& name) {
  if (name == "auto")
    return torch::cuda::is_available() ? torch::Device("cuda:0") : torch::Device(torch::kCPU);
  torch::Device device(torch::kCPU);
  try {
    device = torch::Device(name);
  } catch (const c10::Error&) {
    throw ModelError("device '" + name + "' is not a device; use auto, cpu, cuda or cuda:N");
  }
  if (device.is_cuda()) {
    if (!torch::cuda::is_available())
      throw ModelError("device '" + name + "' was asked for but no CUDA GPU is available");
    const int index = device.has_index() ? device.index() : 0;
    if (index >= static_cast<int>(torch::cuda::device_count()))
      throw ModelError("device '" + name + "' does not exist; this machine has " +
                       std::to_string(torch::cuda::device_count()) + " CUDA device(s)");
    device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  return device;
}

torch::Dtype torch_dtype(Precision p) {
  switch (p) {
    case Precision::kFloat16:
      return torch::kFloat16;
    case Precision::kBFloat16:
      return torch::kBFloat16;
    case Precision::kFloat32:
      break;
  }
  return torch::kFloat32;
}

// A tokenizer whose ids reach past the text encoder's token embedding (a short-vocabulary
// encoder with CLIP's full tokenizer, say) is refused at load, not at the first prompt.
void check_vocabulary(const ClipTokenizer& tokenizer, const ClipTextConfig& config,
                      const std::string& vocab_path, const std::string& model_path) {
  if (tokenizer.max_id() < config.vocab_size) return;
  throw ModelError("'" + model_path + "': the tokenizer " + vocab_path + " has ids up to " +
                   std::to_string(tokenizer.max_id()) + " but the text encoder embeds only " +
                   std::to_string(config.vocab_size) +
                   " tokens; use the tokenizer that belongs to this text encoder");
}

// What the files say of a model (ModelInfo's fields that need no weights).
void describe(const ModelFiles& files, const std::string& path, Precision precision,
              ModelInfo* info) {
  info->path = path;
  info->name = std::filesystem::path(path).filename().replace_extension().string();
  if (info->name.empty())
    info->name = std::filesystem::path(path).parent_path().filename().string();
  info->layout = files.layout;
  info->family = files.family;
  info->precision = precision_name(precision);
  const auto vae_config = VaeConfig::from_json(files.vae_config);
  const auto unet_config = UNetConfig::from_json(files.unet_config);
  // sample_size is in latents; the VAE halves the size once per block after the first.
  const int vae_scale = 1 << (static_cast<int>(vae_config.block_out_channels.size()) - 1);
  info->native_size = files.unet_config.value("sample_size", 64) * vae_scale;
  info->text_layers = files.text_encoder_config.value("num_hidden_layers", 12);
  if (!files.text_encoder_2_config.is_null())
    info->text_layers =
        std::min(info->text_layers, files.text_encoder_2_config.value("num_hidden_layers", 12));
  info->latent_channels = static_cast<int>(vae_config.latent_channels);
  info->inpainting = unet_config.in_channels == 2 * vae_config.latent_channels + 1;
  info->size_conditioning = unet_config.text_time;
  info->negatives_differ = unet_config.text_time;
}

Precision pick_precision(const std::string& name, bool cuda) {
  return name == "auto" ? (cuda ? Precision::kFloat16 : Precision::kFloat32)
                        : parse_precision(name);
}

}  // namespace

std::string precision_name(Precision p) {
  switch (p) {
    case Precision::kFloat16:
      return "fp16";
    case Precision::kBFloat16:
      return "bf16";
    case Precision::kFloat32:
      break;
  }
  return "fp32";
}

Precision parse_precision(const std::string& name) {
  if (name == "fp32" || name == "float32") return Precision::kFloat32;
  if (name == "fp16" || name == "float16" || name == "half") return Precision::kFloat16;
  if (name == "bf16" || name == "bfloat16") return Precision::kBFloat16;
  throw ModelError("precision '" + name + "' is unknown; use auto, fp32, fp16 or bf16");
}

std::shared_ptr<Model> Model::load(const std::string& path, const LoadOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  auto impl = std::make_unique<Impl>();
  impl->device = pick_device(options.device);
  const Precision precision = pick_precision(options.precision, impl->device.is_cuda());
  // The CPU kernels lack fp16 for much of the UNet: every job would fail. Refuse at start-up.
  if (!impl->device.is_cuda() && precision == Precision::kFloat16)
    throw ModelError("precision fp16 needs a CUDA device, and the model would run on " +
                     impl->device.str() + "; use fp32 (or auto) on the CPU");
  impl->dtype = torch_dtype(precision);
  impl->lora_mode = parse_lora_mode(options.lora_mode);
  if (impl->device.is_cuda()) configure_cuda_for_inference(precision != Precision::kFloat32);
#ifdef SDSERVE_WITH_CUDA
  if (impl->device.is_cuda()) {
    c10::cuda::CUDAGuard guard(impl->device);
    cudaStream_t stream = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    impl->decode_stream.reset(stream,
                              [](void* s) { cudaStreamDestroy(static_cast<cudaStream_t>(s)); });
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    impl->text_stream.reset(stream,
                            [](void* s) { cudaStreamDestroy(static_cast<cudaStream_t>(s)); });
  }
#endif
  const std::string tokenizer_dir = options.default_tokenizer_dir.empty()
                                        ? bundled_model_path() + "/tokenizer"
                                        : options.default_tokenizer_dir;
  ModelFiles files = open_model_files(path, tokenizer_dir, options.single_file_config);
  torch::NoGradGuard no_grad;
  // Where loading time goes, for the log line (start-up is a target of its own).
  auto lap_start = std::chrono::steady_clock::now();
  const auto lap = [&lap_start]() {
    const auto now = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(now - lap_start).count();
    lap_start = now;
    return s;
  };
  const double files_s = lap();

  impl->tokenizer = std::make_unique<ClipTokenizer>(
      ClipTokenizer::load(files.vocab_path, files.merges_path, 77, files.pad_token));
  const auto text_config = ClipTextConfig::from_json(files.text_encoder_config);
  impl->text_encoder = ClipTextModel(text_config);
  load_weights(*impl->text_encoder, files.text_encoder, impl->dtype, impl->device);
  impl->text_encoder->eval();
  check_vocabulary(*impl->tokenizer, text_config, files.vocab_path, path);
  impl->info.text_fingerprint =
      text_encoder_fingerprint(impl->text_encoder, files.text_encoder_config.dump());
  int text_layers = static_cast<int>(text_config.num_hidden_layers);
  if (!files.text_encoder_2_config.is_null()) {
    impl->tokenizer_2 = std::make_unique<ClipTokenizer>(
        ClipTokenizer::load(files.vocab_path_2, files.merges_path_2, 77, files.pad_token_2));
    const auto config_2 = ClipTextConfig::from_json(files.text_encoder_2_config);
    if (config_2.projection_dim == 0)
      throw ModelError("'" + path +
                       "': the second text encoder has no text_projection (its config.json "
                       "must name CLIPTextModelWithProjection), which SDXL's pooled embedding "
                       "needs");
    check_vocabulary(*impl->tokenizer_2, config_2, files.vocab_path_2, path);
    impl->text_encoder_2 = ClipTextModel(config_2);
    load_weights(*impl->text_encoder_2, files.text_encoder_2, impl->dtype, impl->device);
    impl->text_encoder_2->eval();
    // One fingerprint for the pair: an embedding depends on both encoders.
    impl->info.text_fingerprint += text_encoder_fingerprint(
        impl->text_encoder_2,
        files.text_encoder_2_config.dump() + (files.force_zeros_for_empty_prompt ? "\nzeros" : ""));
    text_layers = std::min(text_layers, static_cast<int>(config_2.num_hidden_layers));
    impl->force_zeros_for_empty_prompt = files.force_zeros_for_empty_prompt;
  }
  const double text_s = lap();

  const auto unet_config = UNetConfig::from_json(files.unet_config);
  impl->unet = UNet(unet_config);
  const double unet_build_s = lap();
  load_weights(*impl->unet, files.unet, impl->dtype, impl->device);
  impl->unet->eval();
  UNetRunnerOptions runner;
  runner.cuda_graphs = options.cuda_graphs;
  runner.channels_last = options.channels_last;
  runner.buckets.assign(options.batch_buckets.begin(), options.batch_buckets.end());
  runner.max_graph_context = impl->tokenizer->max_length();
  impl->unet_runner = std::make_unique<UNetRunner>(impl->unet, impl->device, impl->dtype, runner);
  const double unet_weights_s = lap();

  const auto vae_config = VaeConfig::from_json(files.vae_config);
  impl->vae = Vae(vae_config);
  // fp16 decodes twice as fast as float32 (docs/PERFORMANCE.md). diffusers decodes in float32
  // when the config says force_upcast, because some VAEs (SDXL's) overflow in fp16: here an
  // overflow is detected instead, and a float32 copy takes over.
  const bool explicit_precision = options.vae_precision != "auto";
  const torch::Dtype vae_dtype =
      explicit_precision ? torch_dtype(parse_precision(options.vae_precision)) : impl->dtype;
  load_weights(*impl->vae, files.vae, vae_dtype, impl->device);
  impl->vae->eval();
  if (!explicit_precision && vae_dtype == torch::kFloat16 && vae_config.force_upcast) {
    impl->vae_overflow_check = true;
    impl->vae_config = vae_config;
    impl->vae_weights = files.vae;
  }
  impl->vae_channels_last = impl->device.is_cuda() && options.channels_last;
  // Channels-last on CUDA, as the UNet: the NCHW VAE spent ~16% of its decode converting
  // layouts (docs/PERFORMANCE.md).
  if (impl->vae_channels_last) to_channels_last(*impl->vae);
  impl->vae_scaling_factor = vae_config.scaling_factor;
  const double vae_s = lap();

  // The modules LoRAs may adapt, as the runner left them (fused, channels-last).
  impl->lora_targets.add(lora_names::Component::kUnet, *impl->unet);
  impl->lora_targets.add(lora_names::Component::kTextEncoder, *impl->text_encoder);
  if (impl->text_encoder_2)
    impl->lora_targets.add(lora_names::Component::kTextEncoder2, *impl->text_encoder_2);
  impl->lora_cache = std::make_unique<LoraCache>(
      static_cast<size_t>(std::max(0, options.lora_cache_mb)) << 20, impl->device, impl->dtype);

  impl->scheduler = SchedulerConfig::from_json(files.scheduler_config);
  {
    const auto table = samplers::alphas_cumprod(impl->scheduler);  // the samplers' own table
    impl->alphas_cumprod.assign(table.begin(), table.end());
  }

  ModelInfo& info = impl->info;
  describe(files, path, precision, &info);
  info.device = impl->device.str();
  info.text_layers = text_layers;
  info.weight_bytes = 0;
  for (const torch::nn::Module* m : {static_cast<torch::nn::Module*>(impl->unet.get()),
                                     static_cast<torch::nn::Module*>(impl->vae.get()),
                                     static_cast<torch::nn::Module*>(impl->text_encoder.get())})
    for (const auto& t : m->parameters()) info.weight_bytes += t.numel() * t.element_size();
  if (impl->text_encoder_2)
    for (const auto& t : impl->text_encoder_2->parameters())
      info.weight_bytes += t.numel() * t.element_size();
  info.load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  log(LogLevel::kInfo, "loaded " + family_display_name(info.family) + " " + info.layout +
                           " model '" + path + "' on " + info.device + " (" + info.precision +
                           ", native " + std::to_string(info.native_size) + " px) in " +
                           seconds_text(info.load_seconds) + " (files " + seconds_text(files_s) +
                           ", text encoders " + seconds_text(text_s) + ", UNet built " +
                           seconds_text(unet_build_s) + " + weights " +
                           seconds_text(unet_weights_s) + ", VAE " + seconds_text(vae_s) + ")");
  return std::shared_ptr<Model>(new Model(std::move(impl)));
}

ModelInfo inspect_model(const std::string& path, const LoadOptions& options) {
  const auto device = pick_device(options.device);
  const Precision precision = pick_precision(options.precision, device.is_cuda());
  const std::string tokenizer_dir = options.default_tokenizer_dir.empty()
                                        ? bundled_model_path() + "/tokenizer"
                                        : options.default_tokenizer_dir;
  const ModelFiles files = open_model_files(path, tokenizer_dir, options.single_file_config);
  ModelInfo info;
  describe(files, path, precision, &info);
  info.device.clear();
  // Floating-point weights take the compute dtype's bytes (the VAE may stay wider: close enough).
  const uint64_t element = precision == Precision::kFloat32 ? 4 : 2;
  for (const WeightSource* source :
       {&files.unet, &files.vae, &files.text_encoder, &files.text_encoder_2})
    for (const auto& [name, view] : source->tensors) {
      uint64_t n = 1;
      for (int64_t d : view.shape) n *= static_cast<uint64_t>(d);
      info.weight_bytes += n * element;
    }
  return info;
}

void check_safetensors_file(const std::string& path) {
  SafetensorsFile::open(path);
}

int cuda_device_count() {
  return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
}

// $SDSERVE_MODELS_DIR, else the source tree's models/, else PREFIX/share/sdserve/models beside
// an installed PREFIX/bin/sdserve.
std::string bundled_model_path() {
  if (const char* env = std::getenv("SDSERVE_MODELS_DIR")) return std::string(env) + "/tiny-sd15";
  const std::string source_tree = std::string(SDSERVE_DEFAULT_MODELS_DIR) + "/tiny-sd15";
  std::error_code ec;
  if (std::filesystem::exists(source_tree, ec)) return source_tree;
  // Installed by `cmake --install`: PREFIX/bin/sdserve beside PREFIX/share/sdserve/models.
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const auto installed = exe.parent_path().parent_path() / "share/sdserve/models/tiny-sd15";
    if (std::filesystem::exists(installed, ec)) return installed.string();
  }
  return source_tree;  // named in the error message when it is missing
}

}  // namespace sdserve::pipeline
