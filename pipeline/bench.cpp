#include "pipeline/bench.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <sstream>

#include "pipeline/clip.h"
#include "pipeline/device.h"
#include "pipeline/errors.h"
#include "pipeline/safetensors.h"
#include "pipeline/unet.h"
#include "pipeline/vae.h"

#ifdef SDSERVE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace sdserve::pipeline {
namespace {

using nlohmann::json;
using SteadyClock = std::chrono::steady_clock;
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

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename F>
double time_ms(const Model& m, F&& f) {
  m.synchronize();
  const auto t0 = SteadyClock::now();
  f();
  m.synchronize();
  return std::chrono::duration<double, std::milli>(SteadyClock::now() - t0).count();
}

std::string device_name(const std::string& device) {
#ifdef SDSERVE_WITH_CUDA
  torch::Device d(device);
  if (d.is_cuda()) return at::cuda::getDeviceProperties(d.index())->name;
#endif
  return device;
}

}  // namespace

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

BenchReport run_bench(const BenchOptions& o,
                      const std::function<void(const std::string&)>& progress) {
  auto say = [&](const std::string& s) {
    if (progress) progress(s);
  };
  BenchReport r;
  std::string model_path = o.model;
  if (model_path.empty()) {
    model_path = o.work_dir + "/sd15-random";
    if (!fs::exists(fs::path(model_path) / "unet/diffusion_pytorch_model.safetensors")) {
      say("writing SD 1.5 with seeded random weights to " + model_path);
      const auto t0 = SteadyClock::now();
      write_random_sd15(model_path, 0);
      r.write_model_s = std::chrono::duration<double>(SteadyClock::now() - t0).count();
    }
  }
  say("loading " + model_path);
  const auto t_load = SteadyClock::now();
  auto model = Model::load(model_path, o.load);
  r.load_s = std::chrono::duration<double>(SteadyClock::now() - t_load).count();
  const auto& info = model->info();
  r.device = info.device;
  r.device_name = device_name(info.device);
  r.precision = info.precision;
  r.torch_version = TORCH_VERSION;
  r.model = o.model.empty() ? "SD 1.5 architecture, seeded random fp16 weights" : o.model;
  r.width = o.width;
  r.height = o.height;
  r.steps = o.steps;
  r.guidance_scale = o.guidance_scale;
  r.sampler = o.sampler;

  GenerateRequest req;
  req.prompt = "a photograph of an astronaut riding a horse, highly detailed";
  req.negative_prompt = "blurry, low quality";
  req.image.width = o.width;
  req.image.height = o.height;
  req.image.steps = o.steps;
  req.image.guidance_scale = o.guidance_scale;
  req.image.sampler = o.sampler;
  req.image.seed = 1;

  // First image: what a user waits for after starting the process (includes cuDNN autotuning
  // and CUDA graph capture for batch 1).
  say("first image");
  model->generate(req);
  model->synchronize();
  r.startup_to_first_image_s =
      std::chrono::duration<double>(SteadyClock::now() - o.process_start).count();

  // Batch-1 phases.
  say("batch-1 phases");
  std::vector<double> tok, enc, unet, samp, vae, png, e2e;
  for (int rep = 0; rep < std::max(1, o.repeats); ++rep) {
    tok.push_back(time_ms(*model, [&] { model->tokenize(req.prompt); }));
    EmbeddingPtr cond, uncond;
    enc.push_back(time_ms(*model, [&] {
      cond = model->encode_text(req.prompt);
      uncond = model->encode_text(req.negative_prompt);
    }));
    auto t = model->begin(req.image, cond, uncond);
    model->set_profiling(true);
    for (int i = 0; i < t->evals_total(); ++i) {
      model->step({t.get()});
      const auto p = model->last_step_profile();
      unet.push_back(p.unet_ms);
      samp.push_back(p.sampler_ms + p.prepare_ms);
    }
    model->set_profiling(false);
    std::vector<RgbImage> images;
    vae.push_back(time_ms(*model, [&] { images = model->decode({t.get()}); }));
    png.push_back(time_ms(*model, [&] { encode_png(images[0], {{"parameters", "x"}}); }));
    e2e.push_back(time_ms(*model, [&] { model->generate(req); }));
  }
  r.tokenize_ms = median(tok);
  r.text_encode_ms = median(enc);
  r.unet_step_ms = median(unet);
  r.sampler_step_ms = median(samp);
  r.vae_decode_ms = median(vae);
  r.png_encode_ms = median(png);
  r.batch1_seconds_per_image = median(e2e) / 1000.0;

  // One request of b images through the step API (no num_images cap): encode both prompts,
  // denoise, decode. Returns {total ms, median UNet-step ms (profiled runs only), decode ms}.
  auto run_request = [&](int b, bool profile) {
    std::vector<double> unet_ms;
    double decode_ms = 0;
    const double total = time_ms(*model, [&] {
      auto emb = model->encode_texts({req.prompt, req.negative_prompt});
      std::vector<std::unique_ptr<Trajectory>> owned;
      std::vector<Trajectory*> batch;
      for (int k = 0; k < b; ++k) {
        ImageSpec spec = req.image;
        spec.seed = req.image.seed + k;
        owned.push_back(model->begin(spec, emb[0], emb[1]));
        batch.push_back(owned.back().get());
      }
      model->set_profiling(profile);
      while (!batch[0]->done()) {
        model->step(batch);
        if (profile) unet_ms.push_back(model->last_step_profile().unet_ms);
      }
      model->set_profiling(false);
      decode_ms = time_ms(*model, [&] { model->decode(batch); });
    });
    return std::make_tuple(total, median(unet_ms), decode_ms);
  };

  for (int b : o.batches) {
    say("batch " + std::to_string(b));
    BenchBatch bb;
    bb.batch = b;
    try {
      run_request(b, false);  // warm-up: graph capture, autotuning for this batch
      model->memory(/*reset_peak=*/true);
      std::vector<double> runs, decodes;
      for (int rep = 0; rep < std::max(1, o.repeats); ++rep) {
        const auto [total, unused, decode] = run_request(b, false);
        (void)unused;
        runs.push_back(total);
        decodes.push_back(decode);
      }
      const auto mem = model->memory();
      bb.peak_allocated = mem.peak_allocated;
      bb.peak_reserved = mem.peak_reserved;
      bb.seconds = median(runs) / 1000.0;
      bb.images_per_s = b / bb.seconds;
      bb.vae_decode_ms = median(decodes);
      bb.it_per_s = o.steps / (bb.seconds - bb.vae_decode_ms / 1000.0);
      bb.unet_step_ms = std::get<1>(run_request(b, true));
    } catch (const std::exception& e) {
      say("batch " + std::to_string(b) + " failed: " + e.what());
      break;
    }
    r.batches.push_back(bb);
  }
  r.batch1_it_per_s = r.batches.empty() ? 0 : r.batches.front().it_per_s;

  if (o.profile_batch > 0) {
    say("profiler range: one step at batch " + std::to_string(o.profile_batch));
    auto emb = model->encode_texts({req.prompt, req.negative_prompt});
    for (int b : {o.profile_batch}) {
      std::vector<std::unique_ptr<Trajectory>> owned;
      std::vector<Trajectory*> batch;
      for (int k = 0; k < b; ++k) {
        owned.push_back(model->begin(req.image, emb[0], emb[1]));
        batch.push_back(owned.back().get());
      }
      model->step(batch);  // warm
      model->synchronize();
      if (!start_trace()) break;
      model->step(batch);
      model->decode(batch);
      model->synchronize();
      stop_trace();
    }
  }
  return r;
}

std::string BenchReport::to_json() const {
  json j = {{"device", device},
            {"device_name", device_name},
            {"precision", precision},
            {"torch", torch_version},
            {"model", model},
            {"width", width},
            {"height", height},
            {"steps", steps},
            {"guidance_scale", guidance_scale},
            {"sampler", sampler},
            {"write_model_s", write_model_s},
            {"load_s", load_s},
            {"startup_to_first_image_s", startup_to_first_image_s},
            {"batch1",
             {{"seconds_per_image", batch1_seconds_per_image},
              {"it_per_s", batch1_it_per_s},
              {"phases_ms",
               {{"tokenize", tokenize_ms},
                {"text_encode", text_encode_ms},
                {"unet_step", unet_step_ms},
                {"sampler_step", sampler_step_ms},
                {"vae_decode", vae_decode_ms},
                {"png_encode", png_encode_ms}}}}}};
  json bs = json::array();
  for (const auto& b : batches)
    bs.push_back({{"batch", b.batch},
                  {"seconds", b.seconds},
                  {"images_per_s", b.images_per_s},
                  {"it_per_s", b.it_per_s},
                  {"unet_step_ms", b.unet_step_ms},
                  {"vae_decode_ms", b.vae_decode_ms},
                  {"peak_allocated_gib", b.peak_allocated / double(1ull << 30)},
                  {"peak_reserved_gib", b.peak_reserved / double(1ull << 30)}});
  j["batches"] = bs;
  return j.dump(2);
}

std::string BenchReport::to_table() const {
  std::ostringstream o;
  o << std::fixed << std::setprecision(3);
  o << "device " << device << " (" << device_name << "), " << precision << ", torch "
    << torch_version << "\n"
    << "model: " << model << "; " << width << "x" << height << ", " << steps << " steps, CFG "
    << guidance_scale << ", " << sampler << "\n"
    << "load " << load_s << " s; process start -> first image " << startup_to_first_image_s
    << " s\n\n"
    << "batch 1 phases (ms): tokenize " << tokenize_ms << ", text encode (cond+uncond) "
    << text_encode_ms << ", UNet step " << unet_step_ms << ", sampler step " << sampler_step_ms
    << ", VAE decode " << vae_decode_ms << ", PNG encode " << png_encode_ms << "\n"
    << "batch 1 end to end: " << batch1_seconds_per_image << " s/image, " << std::setprecision(1)
    << batch1_it_per_s << " it/s\n\n";
  o << "| batch | s/request | images/s | it/s | UNet step ms | VAE decode ms | peak alloc GiB |\n"
    << "|---|---|---|---|---|---|---|\n";
  for (const auto& b : batches)
    o << "| " << b.batch << " | " << std::setprecision(3) << b.seconds << " | "
      << std::setprecision(2) << b.images_per_s << " | " << std::setprecision(1) << b.it_per_s
      << " | " << std::setprecision(2) << b.unet_step_ms << " | " << b.vae_decode_ms << " | "
      << b.peak_allocated / double(1ull << 30) << " |\n";
  return o.str();
}

}  // namespace sdserve::pipeline
