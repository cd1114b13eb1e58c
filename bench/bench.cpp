#include "bench/bench.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <sstream>

#include "pipeline/bench_support.h"
#include "pipeline/image.h"

namespace sdserve::bench {
namespace {

namespace bs = pipeline::bench_support;
using nlohmann::json;
using pipeline::EmbeddingPtr;
using pipeline::GenerateRequest;
using pipeline::ImageSpec;
using pipeline::Model;
using pipeline::RgbImage;
using pipeline::Trajectory;
using SteadyClock = std::chrono::steady_clock;
namespace fs = std::filesystem;

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename F>
double time_ms(const Model& m, F&& f) {
  bs::synchronize(m);
  const auto t0 = SteadyClock::now();
  f();
  bs::synchronize(m);
  return std::chrono::duration<double, std::milli>(SteadyClock::now() - t0).count();
}

}  // namespace

BenchReport run_bench(const BenchOptions& o,
                      const std::function<void(const std::string&)>& progress) {
  auto say = [&](const std::string& s) {
    if (progress) progress(s);
  };
  BenchReport r;
  std::string model_path = o.model;
  if (model_path.empty()) {
    model_path = o.work_dir + (o.sdxl ? "/sdxl-random" : "/sd15-random");
    if (!fs::exists(fs::path(model_path) / "unet/diffusion_pytorch_model.safetensors")) {
      say(std::string("writing ") + (o.sdxl ? "SDXL" : "SD 1.5") +
          " with seeded random weights to " + model_path);
      const auto t0 = SteadyClock::now();
      if (o.sdxl)
        bs::write_random_sdxl(model_path, 0);
      else
        bs::write_random_sd15(model_path, 0);
      r.write_model_s = std::chrono::duration<double>(SteadyClock::now() - t0).count();
    }
  }
  say("loading " + model_path);
  const auto t_load = SteadyClock::now();
  auto model = Model::load(model_path, o.load);
  r.load_s = std::chrono::duration<double>(SteadyClock::now() - t_load).count();
  const auto& info = model->info();
  r.device = info.device;
  r.device_name = bs::device_name(info.device);
  r.precision = info.precision;
  r.torch_version = bs::torch_version();
  r.model = !o.model.empty() ? o.model
            : o.sdxl         ? "SDXL base architecture, seeded random fp16 weights"
                             : "SD 1.5 architecture, seeded random fp16 weights";
  r.width = o.width;
  r.height = o.height;
  r.steps = o.steps;
  r.guidance_scale = o.guidance_scale;
  r.sampler = o.sampler;
  r.strength = o.strength;
  r.mixed = o.mixed && o.strength > 0;
  std::vector<std::shared_ptr<const pipeline::Lora>> loras;
  if (o.loras > 0) {
    say("writing " + std::to_string(o.loras) + " random LoRAs of rank " +
        std::to_string(o.lora_rank));
    for (const auto& path :
         bs::write_random_loras(*model, o.work_dir + "/loras", o.loras, o.lora_rank, 0))
      loras.push_back(pipeline::Lora::load(path));
    r.loras = o.loras;
    r.lora_rank = o.lora_rank;
    r.lora_mode = o.load.lora_mode;
  }
  // Image k's LoRAs (none without --loras).
  const auto loras_of = [&loras](int k) {
    return loras.empty() ? std::vector<pipeline::LoraUse>()
                         : std::vector<pipeline::LoraUse>{{loras[k % loras.size()], 1.0, 1.0}};
  };

  GenerateRequest req;
  req.prompt = "a photograph of an astronaut riding a horse, highly detailed";
  req.negative_prompt = "blurry, low quality";
  req.image.width = o.width;
  req.image.height = o.height;
  req.image.steps = o.steps;
  req.image.guidance_scale = o.guidance_scale;
  req.image.sampler = o.sampler;
  req.image.seed = 1;
  if (o.strength > 0) {
    // A smooth gradient: the VAE has real work, and the picture costs nothing to make.
    RgbImage init;
    init.width = o.width;
    init.height = o.height;
    init.pixels.resize(static_cast<size_t>(o.width) * o.height * 3);
    for (int y = 0; y < o.height; ++y)
      for (int x = 0; x < o.width; ++x) {
        uint8_t* p = &init.pixels[(static_cast<size_t>(y) * o.width + x) * 3];
        p[0] = static_cast<uint8_t>(255 * x / o.width);
        p[1] = static_cast<uint8_t>(255 * y / o.height);
        p[2] = 128;
      }
    req.image.init_image = std::make_shared<const RgbImage>(std::move(init));
    req.image.strength = o.strength;
  }
  req.image.loras = loras_of(0);
  const int steps_run = pipeline::steps_that_run(req.image);

  // First image: what a user waits for after starting the process (includes cuDNN autotuning
  // and CUDA graph capture for batch 1).
  say("first image");
  model->generate(req);
  bs::synchronize(*model);
  r.startup_to_first_image_s =
      std::chrono::duration<double>(SteadyClock::now() - o.process_start).count();

  // Batch-1 phases.
  say("batch-1 phases");
  std::vector<double> tok, enc, unet, samp, vae, png, e2e;
  for (int rep = 0; rep < std::max(1, o.repeats); ++rep) {
    tok.push_back(time_ms(*model, [&] { model->tokenize(req.prompt); }));
    EmbeddingPtr cond, uncond;
    enc.push_back(time_ms(*model, [&] {
      cond = model->encode_text(req.prompt, 1, pipeline::TextRole::kPrompt,
                                pipeline::PromptSyntax::kA1111, req.image.loras);
      uncond = model->encode_text(req.negative_prompt, 1, pipeline::TextRole::kNegative,
                                  pipeline::PromptSyntax::kA1111, req.image.loras);
    }));
    auto t = model->begin(req.image, cond, uncond);
    bs::set_profiling(*model, true);
    for (int i = 0; i < t->evals_total(); ++i) {
      model->step({t.get()});
      const auto p = bs::last_step_profile(*model);
      unet.push_back(p.unet_ms);
      samp.push_back(p.sampler_ms + p.prepare_ms);
    }
    bs::set_profiling(*model, false);
    std::vector<RgbImage> images;
    vae.push_back(time_ms(*model, [&] { images = model->decode({t.get()}); }));
    png.push_back(time_ms(*model, [&] { pipeline::encode_png(images[0], {{"parameters", "x"}}); }));
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
      // One text-encoder call per LoRA set (the engine groups prompts by set the same way).
      std::vector<std::vector<EmbeddingPtr>> emb;
      for (int k = 0; k < std::min<int>(b, std::max<int>(1, static_cast<int>(loras.size()))); ++k)
        emb.push_back(model->encode_texts({req.prompt, req.negative_prompt}, 1,
                                          pipeline::TextRole::kPrompt,
                                          pipeline::PromptSyntax::kA1111, loras_of(k)));
      std::vector<std::unique_ptr<Trajectory>> owned;
      std::vector<Trajectory*> batch;
      for (int k = 0; k < b; ++k) {
        ImageSpec spec = req.image;
        spec.seed = req.image.seed + k;
        spec.loras = loras_of(k);
        const auto& e = emb[static_cast<size_t>(k) % emb.size()];
        if (r.mixed && k % 2 == 0) spec.init_image = nullptr;  // text to image
        owned.push_back(model->begin(spec, e[0], e[1]));
        batch.push_back(owned.back().get());
      }
      bs::set_profiling(*model, profile);
      // Mixed batches: the img2img rows finish first, the rest go on in a smaller batch.
      for (auto running = batch; !running.empty();) {
        model->step(running);
        if (profile) unet_ms.push_back(bs::last_step_profile(*model).unet_ms);
        running.erase(
            std::remove_if(running.begin(), running.end(), [](Trajectory* t) { return t->done(); }),
            running.end());
      }
      bs::set_profiling(*model, false);
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
      bs::memory(*model, /*reset_peak=*/true);
      std::vector<double> runs, decodes;
      for (int rep = 0; rep < std::max(1, o.repeats); ++rep) {
        const auto [total, unused, decode] = run_request(b, false);
        (void)unused;
        runs.push_back(total);
        decodes.push_back(decode);
      }
      const auto mem = bs::memory(*model);
      bb.peak_allocated = mem.peak_allocated;
      bb.peak_reserved = mem.peak_reserved;
      bb.seconds = median(runs) / 1000.0;
      bb.images_per_s = b / bb.seconds;
      bb.vae_decode_ms = median(decodes);
      bb.it_per_s = steps_run / (bb.seconds - bb.vae_decode_ms / 1000.0);
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
      bs::synchronize(*model);
      if (!bs::start_trace()) break;
      model->step(batch);
      model->decode(batch);
      bs::synchronize(*model);
      bs::stop_trace();
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
            {"strength", strength},
            {"mixed", mixed},
            {"loras", loras},
            {"lora_rank", lora_rank},
            {"lora_mode", lora_mode},
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
    << guidance_scale << ", " << sampler
    << (strength > 0 ? std::string(mixed ? ", half of each batch " : ", ") + "img2img strength " +
                           std::to_string(strength)
                     : std::string())
    << (loras > 0 ? ", " + std::to_string(loras) + " LoRAs of rank " + std::to_string(lora_rank) +
                        " over each batch's images (" + lora_mode + ")"
                  : std::string())
    << "\n"
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

}  // namespace sdserve::bench
