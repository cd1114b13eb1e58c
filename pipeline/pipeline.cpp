// Running a loaded model: prompts to text-encoder input, denoising steps over a batch of
// trajectories, decoding and previews. Loading is in load.cpp.
#include "pipeline/pipeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>

#include "pipeline/errors.h"
#include "pipeline/hires.h"
#include "pipeline/log.h"
#include "pipeline/model_impl.h"
#include "pipeline/runtime/device.h"
#include "pipeline/sampler_names.h"

#ifdef SDSERVE_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include "pipeline/validate.h"

namespace sdserve::pipeline {
namespace {

// ComfyUI's latent2rgb factors (comfy/latent_formats.py): rows are latent channels, columns R,
// G, B. SD 1.x and 2.x share a VAE; SDXL's latent space differs and has a bias too.
constexpr float kLatentRgb[4][3] = {{0.3512f, 0.2297f, 0.3227f},
                                    {0.3250f, 0.4974f, 0.2350f},
                                    {-0.2829f, 0.1762f, 0.2721f},
                                    {-0.2120f, -0.2616f, -0.7177f}};
constexpr float kLatentRgbSdxl[4][3] = {{0.3651f, 0.4232f, 0.4341f},
                                        {-0.2533f, -0.0042f, 0.1068f},
                                        {0.1076f, 0.1111f, -0.0362f},
                                        {-0.3165f, -0.2492f, -0.2188f}};
constexpr float kLatentRgbBiasSdxl[3] = {0.1084f, -0.0175f, -0.0011f};

// (B, 3, H, W) float in [0, 1] -> 8-bit RGB images, rounding as diffusers' numpy_to_pil does.
std::vector<RgbImage> to_rgb8(const torch::Tensor& images) {
  auto bytes = (images * 255.0)
                   .round()
                   .clamp(0, 255)
                   .to(torch::kUInt8)
                   .permute({0, 2, 3, 1})
                   .contiguous()
                   .cpu();
  std::vector<RgbImage> out;
  for (int64_t b = 0; b < bytes.size(0); ++b) {
    RgbImage img;
    img.height = static_cast<int>(bytes.size(1));
    img.width = static_cast<int>(bytes.size(2));
    const auto* p = bytes[b].data_ptr<uint8_t>();
    img.pixels.assign(p, p + static_cast<size_t>(img.width) * img.height * 3);
    out.push_back(std::move(img));
  }
  return out;
}

// The first evaluation of an image-to-image spec: diffusers' get_timesteps skips the first
// steps - int(steps x strength) steps, order() evaluations each.
int first_eval(const ImageSpec& spec, const Sampler& sampler) {
  return (spec.steps - steps_that_run(spec)) * sampler.order();
}

// A picture as diffusers' VaeImageProcessor feeds the VAE: (1, 3, H, W) float32 in [-1, 1] on
// the CPU (x / 255, then 2x - 1).
torch::Tensor unit_range(const RgbImage& image) {
  const auto pixels = torch::from_blob(const_cast<uint8_t*>(image.pixels.data()),
                                       {1, image.height, image.width, 3}, torch::kUInt8)
                          .permute({0, 3, 1, 2})
                          .to(torch::kFloat32)
                          .div(255.0);
  // Contiguous: torch 1.13's CPU VAE encoder gets a constant channels-last picture (an inpainting
  // model's all-masked picture) wrong (tests/fixtures/make/make_inpaint_refs.py).
  return (2.0 * pixels - 1.0).contiguous();
}

// A sample of the VAE's latent distribution for `x` (the generator's next draw, on the CPU),
// scaled: diffusers' _encode_vae_image with retrieve_latents' "sample".
torch::Tensor encode_sample(Model::Impl& impl, const torch::Tensor& x, at::Generator& generator) {
  const auto vae_dtype = impl.vae->parameters().front().scalar_type();
  const auto moments = impl.vae->encode_moments(x.to(impl.device, vae_dtype)).to(torch::kFloat32);
  const int64_t c = moments.size(1) / 2;
  const auto mean = moments.narrow(1, 0, c);
  const auto std = torch::exp(0.5 * moments.narrow(1, c, c).clamp(-30.0, 20.0));
  const auto draw =
      torch::randn(mean.sizes(), generator, torch::TensorOptions().dtype(torch::kFloat32));
  return impl.vae_scaling_factor * (mean + std * draw.to(impl.device));
}

// Image to image, as diffusers' prepare_latents: the init image VAE-encoded, a sample of its
// latent distribution (the generator's first draw), scaled, then noised with the second draw to
// the first evaluation that runs. Both draws are the image's own, as every other draw.
void start_from_image(Model::Impl& impl, Trajectory::State& state) {
  const ImageSpec& spec = state.spec;
  const auto latents = encode_sample(impl, unit_range(*spec.init_image), state.generator);
  const auto noise =
      torch::randn(latents.sizes(), state.generator, torch::TensorOptions().dtype(torch::kFloat32))
          .to(impl.device);
  const int first = first_eval(spec, *state.sampler);
  state.latent = state.sampler->add_noise(latents, noise, first);
  state.sampler->start_at(first);
  state.evals_done = state.first_eval = first;
}

// Inpainting, as diffusers' StableDiffusion[XL]InpaintPipeline, draw for draw: the init latents
// (unless an inpainting UNet starts from pure noise), the noise, then the masked picture's
// latents, which diffusers encodes (and so draws for) even where a 4-channel UNet never reads
// them. A1111's latent fills come after, so they leave diffusers' draws alone.
void start_inpainting(Model::Impl& impl, Trajectory::State& state) {
  const ImageSpec& spec = state.spec;
  const bool unet9 = impl.info.inpainting;
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  const int64_t h = spec.height / 8, w = spec.width / 8, c = impl.info.latent_channels;
  const bool pure_noise = !spec.init_image || spec.strength == 1.0;  // is_strength_max
  torch::Tensor pixels, image_latents;
  if (spec.init_image) pixels = unit_range(*spec.init_image);
  if (spec.init_image && (!unet9 || !pure_noise))
    image_latents = encode_sample(impl, pixels, state.generator);
  const auto noise = torch::randn({1, c, h, w}, state.generator, f32).to(impl.device);
  // 1 = repaint: binarised at 0.5 as diffusers' mask processor, then nearest to latent size.
  torch::Tensor mask = torch::ones({1, 1, spec.height, spec.width}, f32);
  if (spec.mask)
    mask = torch::from_blob(const_cast<uint8_t*>(spec.mask->pixels.data()),
                            {1, 1, spec.height, spec.width}, torch::kUInt8)
               .ge(128)
               .to(torch::kFloat32);
  const auto latent_mask =
      torch::nn::functional::interpolate(
          mask, torch::nn::functional::InterpolateFuncOptions().size(std::vector<int64_t>{h, w}))
          .to(impl.device);
  if (unet9) {
    const auto masked = pixels.defined() ? pixels * mask.lt(0.5)
                                         : torch::zeros({1, 3, spec.height, spec.width}, f32);
    state.inpaint_condition =
        torch::cat({latent_mask, encode_sample(impl, masked, state.generator)}, 1);
  } else {
    torch::randn({1, c, h, w}, state.generator, f32);  // the masked picture's draw
  }
  if (image_latents.defined() && (spec.masked_content == MaskedContent::kLatentNoise ||
                                  spec.masked_content == MaskedContent::kLatentNothing)) {
    const auto fill = spec.masked_content == MaskedContent::kLatentNoise
                          ? torch::randn({1, c, h, w}, state.generator, f32).to(impl.device)
                          : torch::zeros_like(image_latents);
    image_latents = image_latents * (1 - latent_mask) + fill * latent_mask;
  }
  const int first = spec.init_image ? first_eval(spec, *state.sampler) : 0;
  state.latent = pure_noise ? noise * state.sampler->init_noise_sigma()
                            : state.sampler->add_noise(image_latents, noise, first);
  if (!unet9) {
    state.blend_latents = image_latents;
    state.blend_noise = noise;
    state.blend_mask = latent_mask;
  }
  state.sampler->start_at(first);
  state.evals_done = state.first_eval = first;
}

}  // namespace

Trajectory::Trajectory(std::unique_ptr<State> state) : state_(std::move(state)) {}
Trajectory::~Trajectory() = default;
const ImageSpec& Trajectory::spec() const {
  return state_->spec;
}
int Trajectory::evals_done() const {
  return state_->earlier_evals + state_->evals_done - state_->first_eval;
}
int Trajectory::evals_total() const {
  return state_->earlier_evals + state_->sampler->num_evals() - state_->first_eval +
         (state_->second_pass ? state_->second_pass->evals : 0);
}

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;
const ModelInfo& Model::info() const {
  return impl_->info;
}

std::vector<int32_t> Model::tokenize(const std::string& text) const {
  return impl_->tokenizer->tokenize(text);
}

TextInput Model::text_input(const std::string& prompt, PromptSyntax syntax, TextRole role) const {
  return impl_->text_input(*impl_->tokenizer, prompt, syntax, role);
}

EmbeddingPtr Model::encode_text(const std::string& prompt, int clip_skip, TextRole role,
                                PromptSyntax syntax, const std::vector<LoraUse>& loras) const {
  return encode_texts({prompt}, clip_skip, role, syntax, loras).front();
}

void Model::check_loras(const std::vector<LoraUse>& loras) const {
  for (const auto& use : loras) {
    if (!use.lora) throw RequestError("loras", "a LoRA of the list is missing (null)");
    if (!std::isfinite(use.unet_weight) || !std::isfinite(use.te_weight))
      throw RequestError(
          "loras", "LoRA '" + use.lora->info().name + "': its weights must be finite numbers");
    resolve_lora(*use.lora, impl_->lora_targets, impl_->info);
  }
}

std::vector<EmbeddingPtr> Model::encode_texts(const std::vector<std::string>& prompts,
                                              int clip_skip, TextRole role, PromptSyntax syntax,
                                              const std::vector<LoraUse>& loras) const {
  if (clip_skip < 1 || clip_skip > impl_->info.text_layers)
    throw RequestError("clip_skip", rule("clip_skip", impl_->info.text_layers) +
                                        got(static_cast<long long>(clip_skip)));
  if (prompts.empty()) return {};
  torch::NoGradGuard no_grad;
  const auto lora_set =
      make_lora_set(loras, LoraSide::kText, *impl_->lora_cache, impl_->lora_targets, impl_->info);
  const auto encode = [&] {
    return impl_->encode_batch(prompts, clip_skip, role, syntax, lora_set);
  };
  std::vector<Embedding> encoded;
#ifdef SDSERVE_WITH_CUDA
  if (impl_->device.is_cuda()) {
    // The engine encodes on a thread of its own while the worker steps the UNet: on a stream
    // of its own the encoder overlaps the UNet. The result is complete on return, and the
    // allocator learns that the stepping thread's (default) stream uses it.
    const auto index = impl_->device.index();
    const auto side = c10::cuda::getStreamFromExternal(
        static_cast<cudaStream_t>(impl_->text_stream.get()), index);
    {
      c10::cuda::CUDAStreamGuard guard(side);
      encoded = encode();
    }
    side.synchronize();
    for (const auto& e : encoded) {
      e.hidden().record_stream(c10::cuda::getDefaultCUDAStream(index));
      if (e.pooled().defined()) e.pooled().record_stream(c10::cuda::getDefaultCUDAStream(index));
    }
  }
#endif
  if (encoded.empty()) encoded = encode();
  std::vector<EmbeddingPtr> out;
  for (auto& e : encoded) out.push_back(std::make_shared<Embedding>(std::move(e)));
  return out;
}

std::unique_ptr<Trajectory> Model::begin(const ImageSpec& spec, EmbeddingPtr cond,
                                         EmbeddingPtr uncond) const {
  pipeline::validate(spec);
  check_loras(spec.loras);  // here, not in a step() that other images share
  if (!cond) throw RequestError("", "a prompt embedding is required");
  const bool cfg = spec.guidance_scale > 1.0;
  if (cfg && !uncond)
    throw RequestError("", "guidance_scale > 1 needs a negative-prompt embedding");
  // SDXL's UNet also reads the pooled embedding, which only SDXL's encoders give.
  const bool pooled = cond->pooled().defined() && (!cfg || uncond->pooled().defined());
  if (impl_->info.size_conditioning && !pooled)
    throw RequestError("",
                       "an SDXL model needs embeddings with a pooled part (from its own "
                       "encode_text)");
  torch::NoGradGuard no_grad;
  auto state = std::make_unique<Trajectory::State>();
  state->spec = spec;
  state->sampler = make_sampler(
      spec.sampler, spec.scheduler == "karras" ? SigmaSchedule::kKarras : SigmaSchedule::kNormal,
      spec.steps, impl_->scheduler);
  state->generator = at::detail::createCPUGenerator(spec.seed);
  state->cond = std::move(cond);
  if (cfg) state->uncond = std::move(uncond);
  if (spec.mask || impl_->info.inpainting) {
    start_inpainting(*impl_, *state);
    return std::make_unique<Trajectory>(std::move(state));
  }
  if (spec.init_image) {
    start_from_image(*impl_, *state);
    return std::make_unique<Trajectory>(std::move(state));
  }
  // Drawn on the CPU from the image's own generator, as the reference pipeline does.
  auto noise = torch::randn({1, impl_->info.latent_channels, spec.height / 8, spec.width / 8},
                            state->generator, torch::TensorOptions().dtype(torch::kFloat32));
  state->latent = noise.to(impl_->device) * state->sampler->init_noise_sigma();
  if (spec.hires) plan_second_pass(*impl_, *state);
  return std::make_unique<Trajectory>(std::move(state));
}

namespace {

// Calls' outputs joined back in row order: out[order[k]] = the joined parts' row k.
torch::Tensor in_row_order(const std::vector<torch::Tensor>& parts,
                           const std::vector<int64_t>& order) {
  const auto joined = torch::cat(parts);
  auto out = torch::empty_like(joined);
  out.index_copy_(0, torch::tensor(order, torch::kInt64).to(out.device()), joined);
  return out;
}

// The UNet's output for `rows` (indices into the step's rows), each row with its LoRA set
// (pipeline/lora_runtime.h says how each mode runs them). `forward` runs the UNet on some rows.
template <typename Forward>
torch::Tensor unet_with_loras(Model::Impl& impl, const std::vector<int64_t>& rows,
                              const std::vector<const LoraSet*>& row_loras,
                              const Forward& forward) {
  std::vector<const LoraSet*> sets;
  bool any = false, uniform = true;
  for (int64_t r : rows) {
    sets.push_back(row_loras[r]);
    any = any || !row_loras[r]->empty();
    uniform = uniform && row_loras[r]->key == sets.front()->key;
  }
  if (!any) {
    impl.unet_merged.restore();
    return forward(rows);
  }
  if (impl.lora_mode == LoraMode::kPerRow || (impl.lora_mode == LoraMode::kAuto && !uniform)) {
    impl.unet_merged.restore();
    const auto call = impl.unet_packed.get(sets, LoraSide::kUnet, impl.device);
    LoraCallScope scope(call.get());
    return forward(rows);
  }
  if (uniform) {
    impl.unet_merged.apply(*sets.front(), LoraSide::kUnet);
    return forward(rows);
  }
  // Merged with several sets: one call per set, in the order the sets first appear.
  std::vector<std::string> keys;
  std::map<std::string, std::vector<int64_t>> positions;
  for (size_t k = 0; k < rows.size(); ++k) {
    auto& p = positions[sets[k]->key];
    if (p.empty()) keys.push_back(sets[k]->key);
    p.push_back(static_cast<int64_t>(k));
  }
  std::vector<torch::Tensor> parts;
  std::vector<int64_t> order;
  for (const auto& key : keys) {
    const auto& p = positions[key];
    std::vector<int64_t> group;
    for (int64_t k : p) group.push_back(rows[k]);
    impl.unet_merged.apply(*sets[p.front()], LoraSide::kUnet);
    parts.push_back(forward(group));
    order.insert(order.end(), p.begin(), p.end());
  }
  return in_row_order(parts, order);
}

}  // namespace

#ifdef SDSERVE_WITH_CUDA
namespace {
at::cuda::CUDAEvent& step_event(Model::Impl& impl) {
  if (!impl.step_done) impl.step_done = std::make_shared<at::cuda::CUDAEvent>();
  return *std::static_pointer_cast<at::cuda::CUDAEvent>(impl.step_done);
}
}  // namespace
#endif

void Model::step(const std::vector<Trajectory*>& batch) const {
  if (batch.empty()) return;
  torch::NoGradGuard no_grad;
  using SteadyClock = std::chrono::steady_clock;
  const bool profile = impl_->profiling;
  auto mark = SteadyClock::now();
  auto lap = [&]() {
    if (!profile) return 0.0;
    pipeline::synchronize(impl_->device);
    const auto now = SteadyClock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - mark).count();
    mark = now;
    return ms;
  };
  if (profile) lap();
  std::vector<torch::Tensor> inputs, contexts, pooled;
  std::vector<float> timesteps, time_ids;
  const bool text_time = impl_->info.size_conditioning;
  std::vector<torch::Tensor> scaled(batch.size());
  // Each image's LoRA set (bound to this model), and each UNet row's.
  std::vector<LoraSet> image_loras(batch.size());
  std::vector<const LoraSet*> row_loras;
  for (size_t i = 0; i < batch.size(); ++i) {
    auto& s = batch[i]->state();
    if (batch[i]->done()) throw RequestError("", "step() on a finished trajectory");
    image_loras[i] = make_lora_set(s.spec.loras, LoraSide::kUnet, *impl_->lora_cache,
                                   impl_->lora_targets, impl_->info);
    scaled[i] = s.sampler->scale_model_input(s.latent, s.evals_done);
    const auto t = static_cast<float>(s.sampler->timesteps()[s.evals_done]);
    const auto ids = text_time ? impl_->time_ids(s.spec) : std::vector<float>();
    const auto input =
        s.inpaint_condition.defined() ? torch::cat({scaled[i], s.inpaint_condition}, 1) : scaled[i];
    for (const Embedding* e : {s.uncond.get(), s.cond.get()}) {
      if (!e) continue;
      inputs.push_back(input);
      contexts.push_back(e->hidden());
      timesteps.push_back(t);
      row_loras.push_back(&image_loras[i]);
      if (text_time) {
        pooled.push_back(e->pooled());
        time_ids.insert(time_ids.end(), ids.begin(), ids.end());
      }
    }
  }
  bench_support::StepProfile prof;
  prof.rows = static_cast<int>(inputs.size());
  // One UNet call per length of prompt embedding (rows of 77 tokens, the usual case, all share
  // one); rows keep their order in `out`.
  std::map<int64_t, std::vector<int64_t>> by_length;
  for (size_t r = 0; r < contexts.size(); ++r)
    by_length[contexts[r].size(1)].push_back(static_cast<int64_t>(r));
  int64_t padding = 0;  // rows the CUDA graphs added, over the step's UNet calls
  const auto unet_rows = [&](const std::vector<int64_t>& rows) {
    std::vector<torch::Tensor> x, ctx, pool;
    std::vector<float> ts, ids;
    for (int64_t r : rows) {
      x.push_back(inputs[r]);
      ctx.push_back(contexts[r]);
      ts.push_back(timesteps[r]);
      if (text_time) {
        pool.push_back(pooled[r]);
        ids.insert(ids.end(), time_ids.begin() + r * 6, time_ids.begin() + r * 6 + 6);
      }
    }
    auto xs = torch::cat(x).to(impl_->dtype);
    auto t = torch::tensor(ts, torch::kFloat32).to(impl_->device);
    torch::Tensor text_embeds, added_time_ids;
    if (text_time) {
      text_embeds = torch::cat(pool);
      // In the embeddings' dtype, as diffusers builds add_time_ids.
      added_time_ids = torch::tensor(ids, torch::kFloat32)
                           .view({xs.size(0), -1})
                           .to(impl_->device, impl_->dtype);
    }
    auto out = impl_->unet_runner->forward(xs, t, torch::cat(ctx), text_embeds, added_time_ids)
                   .to(torch::kFloat32);
    padding += impl_->unet_runner->last_padding();
    return out;
  };
  const auto unet = [&](const std::vector<int64_t>& rows) {
    return unet_with_loras(*impl_, rows, row_loras, unet_rows);
  };
  prof.prepare_ms = lap();
  torch::Tensor out;
  if (by_length.size() == 1) {
    out = unet(by_length.begin()->second);
  } else {
    std::vector<torch::Tensor> parts;
    std::vector<int64_t> order;
    for (const auto& [length, rows] : by_length) {
      parts.push_back(unet(rows));
      order.insert(order.end(), rows.begin(), rows.end());
    }
    out = in_row_order(parts, order);
  }
  impl_->last_step_rows = {static_cast<int>(inputs.size()), static_cast<int>(padding)};
#ifdef SDSERVE_WITH_CUDA
  // Launches are asynchronous: without a bound the host queues steps far ahead of the device,
  // progress events run ahead of the pixels, and a decode waits for the whole backlog. Wait for
  // the previous step once this one's UNet is queued: the device never idles while the host
  // prepares a step, and the host stays at most one step ahead.
  if (impl_->device.is_cuda()) step_event(*impl_).synchronize();
#endif
  prof.unet_ms = lap();
  int64_t row = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    auto& s = batch[i]->state();
    torch::Tensor eps;
    if (s.uncond) {
      auto u = out.narrow(0, row, 1), c = out.narrow(0, row + 1, 1);
      eps = u + s.spec.guidance_scale * (c - u);
      row += 2;
    } else {
      eps = out.narrow(0, row, 1);
      row += 1;
    }
    s.last_input = scaled[i];
    s.last_eps = eps;
    s.last_timestep = s.sampler->timesteps()[s.evals_done];
    s.latent = s.sampler->step(eps, s.evals_done, s.latent, s.generator);
    ++s.evals_done;
    if (s.blend_mask.defined()) {
      // diffusers' 4-channel inpainting: outside the mask, the init latents at the next
      // evaluation's noise level (clean after the last).
      const auto known = s.evals_done < s.sampler->num_evals()
                             ? s.sampler->add_noise(s.blend_latents, s.blend_noise, s.evals_done)
                             : s.blend_latents;
      s.latent = (1 - s.blend_mask) * known + s.blend_mask * s.latent;
    }
    if (s.second_pass && s.evals_done == s.sampler->num_evals()) begin_second_pass(*impl_, s);
  }
#ifdef SDSERVE_WITH_CUDA
  if (impl_->device.is_cuda()) step_event(*impl_).record();
#endif
  if (profile) {
    prof.sampler_ms = lap();
    impl_->last_profile = prof;
  }
}

torch::Tensor Model::Impl::decode_float(const std::vector<Trajectory*>& batch) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> latents;
  for (auto* t : batch) latents.push_back(t->state().latent);
  auto z = torch::cat(latents) / vae_scaling_factor;
  // The fp32 VAE's activations at 512x512 are ~1 GiB per image: decoding in chunks bounds the
  // peak (batch 32 peaked at 40 GiB in one piece) at no cost in speed (8 images decode at the
  // same per-image rate as 16 or 32; docs/PERFORMANCE.md).
  std::vector<torch::Tensor> images;
  for (int64_t i = 0; i < z.size(0); i += kDecodeChunk) {
    auto part = vae_decode(z.narrow(0, i, std::min(kDecodeChunk, z.size(0) - i)));
    images.push_back(((part / 2 + 0.5).clamp(0, 1)).cpu());
  }
  return torch::cat(images);
}

torch::Tensor Model::Impl::vae_decode(const torch::Tensor& z) {
  if (vae_overflowed.load()) return vae_fp32->decode(z.to(torch::kFloat32));
  const auto dtype = vae->parameters().front().scalar_type();
  auto out = vae->decode(z.to(dtype)).to(torch::kFloat32);
  // One device sync per chunk; the caller copies the pixels to the host next anyway.
  if (!vae_overflow_check || torch::isfinite(out).all().item<bool>()) return out;
  {
    std::lock_guard<std::mutex> lock(vae_fp32_mutex);
    if (!vae_fp32) {
      log(LogLevel::kWarn,
          "the VAE overflowed in fp16 (inf/NaN in its output): decoding in "
          "float32 from now on (vae_precision fp32 chooses that at start)");
      Vae copy(vae_config);
      load_weights(*copy, vae_weights, torch::kFloat32, device);
      copy->eval();
      if (vae_channels_last) to_channels_last(*copy);
      vae_fp32 = copy;
      vae_overflowed.store(true);
    }
  }
  return vae_fp32->decode(z.to(torch::kFloat32));
}

namespace {
// Inpainting's paste back (ImageSpec::overlay), where a spec asks for it.
std::vector<RgbImage> pasted_back(const std::vector<Trajectory*>& batch,
                                  std::vector<RgbImage> images) {
  for (size_t i = 0; i < batch.size(); ++i)
    if (const auto& overlay = batch[i]->spec().overlay)
      images[i] = apply_overlay(images[i], *overlay);
  return images;
}
}  // namespace

std::vector<RgbImage> Model::decode(const std::vector<Trajectory*>& batch) const {
  if (batch.empty()) return {};
#ifdef SDSERVE_WITH_CUDA
  if (impl_->device.is_cuda()) {
    // The engine decodes on a second thread while the worker steps the UNet: on a stream of its
    // own the VAE overlaps the UNet. The device first finishes what the stepping thread (on the
    // default stream) queued so far, so the latents are final.
    const auto side = c10::cuda::getStreamFromExternal(
        static_cast<cudaStream_t>(impl_->decode_stream.get()), impl_->device.index());
    at::cuda::CUDAEvent ready;
    ready.record(c10::cuda::getDefaultCUDAStream(impl_->device.index()));
    ready.block(side);
    c10::cuda::CUDAStreamGuard guard(side);
    return pasted_back(batch, to_rgb8(impl_->decode_float(batch)));
  }
#endif
  // On the CPU, decoding images one at a time keeps an image's bytes independent of what
  // finished beside it (a batched convolution may round differently); the GPU batches for speed.
  std::vector<RgbImage> out;
  for (auto* t : batch) out.push_back(to_rgb8(impl_->decode_float({t})).front());
  return pasted_back(batch, std::move(out));
}

int Model::evals_total(const ImageSpec& spec) const {
  pipeline::validate(spec);
  const auto sampler = make_sampler(
      spec.sampler, spec.scheduler == "karras" ? SigmaSchedule::kKarras : SigmaSchedule::kNormal,
      spec.steps, impl_->scheduler);
  return sampler->num_evals() - (spec.init_image ? first_eval(spec, *sampler) : 0) +
         (spec.hires ? second_pass_evals(*impl_, spec) : 0);
}

torch::Tensor Model::Impl::predicted_x0(const Trajectory::State& s) const {
  if (!s.last_eps.defined()) return s.latent;
  // The scaled model input is x_t in DDPM form; ᾱ at a fractional timestep is interpolated.
  const double t = std::clamp(s.last_timestep, 0.0, static_cast<double>(alphas_cumprod.size() - 1));
  const size_t lo = static_cast<size_t>(std::floor(t));
  const size_t hi = std::min(lo + 1, alphas_cumprod.size() - 1);
  const double a = alphas_cumprod[lo] + (t - lo) * (alphas_cumprod[hi] - alphas_cumprod[lo]);
  return (s.last_input - std::sqrt(1 - a) * s.last_eps) / std::sqrt(a);
}

Model::StepRows Model::last_step_rows() const {
  return impl_->last_step_rows;
}

RgbImage Model::preview(const Trajectory& trajectory, int max_side) const {
  torch::NoGradGuard no_grad;
  auto x0 = impl_->predicted_x0(trajectory.state())[0].to(torch::kFloat32);  // (C, h, w)
  const bool sdxl = impl_->info.family == "sdxl";
  auto factors = torch::from_blob(const_cast<float*>(&(sdxl ? kLatentRgbSdxl : kLatentRgb)[0][0]),
                                  {4, 3}, torch::kFloat32)
                     .to(x0.device());
  auto rgb = torch::einsum("chw,cr->rhw", {x0.narrow(0, 0, 4), factors});
  if (sdxl)
    rgb = rgb + torch::from_blob(const_cast<float*>(kLatentRgbBiasSdxl), {3, 1, 1}, torch::kFloat32)
                    .to(x0.device());
  auto images = ((rgb + 1.0) / 2.0).clamp(0, 1).unsqueeze(0);
  return shrink_to(to_rgb8(images)[0], max_side);
}

RgbImage Model::preview_vae(const Trajectory& trajectory, int max_side) const {
  torch::NoGradGuard no_grad;
  auto x0 = impl_->predicted_x0(trajectory.state()) / impl_->vae_scaling_factor;
  auto images = impl_->vae_decode(x0);
  return shrink_to(to_rgb8((images / 2 + 0.5).clamp(0, 1).cpu())[0], max_side);
}

std::vector<RgbImage> Model::generate(const GenerateRequest& request,
                                      const Progress& progress) const {
  pipeline::validate(request, impl_->info.text_layers);
  auto cond = encode_text(request.prompt, request.clip_skip, TextRole::kPrompt,
                          request.prompt_syntax, request.image.loras);
  EmbeddingPtr uncond;
  if (request.image.guidance_scale > 1.0)
    uncond = encode_text(request.negative_prompt, request.clip_skip, TextRole::kNegative,
                         request.prompt_syntax, request.image.loras);
  std::vector<std::unique_ptr<Trajectory>> owned;
  std::vector<Trajectory*> batch;
  for (int k = 0; k < request.num_images; ++k) {
    ImageSpec spec = request.image;
    spec.seed = request.image.seed + static_cast<uint64_t>(k);
    owned.push_back(begin(spec, cond, uncond));
    batch.push_back(owned.back().get());
  }
  const int total = batch.front()->evals_total();
  for (int i = 0; i < total; ++i) {
    step(batch);
    if (progress) progress(i + 1, total);
  }
  return decode(batch);
}

}  // namespace sdserve::pipeline
