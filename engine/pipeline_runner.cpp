// ModelRunner over pipeline::Model: the only engine file that calls the model's step API.
#include <chrono>

#include "engine/engine.h"
#include "engine/model_runner.h"
#include "pipeline/bench_support.h"

namespace sdserve::engine {
namespace {

class PipelineRun : public ImageRun {
 public:
  explicit PipelineRun(std::unique_ptr<pipeline::Trajectory> t) : trajectory(std::move(t)) {}
  int evals_done() const override { return trajectory->evals_done(); }
  int evals_total() const override { return trajectory->evals_total(); }
  std::pair<int, int> size() const override {
    return {trajectory->spec().width, trajectory->spec().height};
  }
  std::unique_ptr<pipeline::Trajectory> trajectory;
};

std::vector<pipeline::Trajectory*> trajectories(const std::vector<ImageRun*>& batch) {
  std::vector<pipeline::Trajectory*> out;
  out.reserve(batch.size());
  for (ImageRun* r : batch) out.push_back(static_cast<PipelineRun*>(r)->trajectory.get());
  return out;
}

class PipelineRunner : public ModelRunner {
 public:
  explicit PipelineRunner(std::shared_ptr<pipeline::Model> model)
      : model_(std::move(model)), shape_(pipeline::memory_shape(*model_)) {}

  const pipeline::ModelInfo& info() const override { return model_->info(); }
  Memory memory() const override {
    const auto m = pipeline::bench_support::memory(*model_);
    return {m.allocated, m.reserved};
  }
  pipeline::MemoryEstimate estimate_memory(int width, int height, int unet_rows,
                                           int decode_images) const override {
    return pipeline::estimate_memory(shape_, width, height, unet_rows, decode_images);
  }
  uint64_t available_memory() const override { return pipeline::available_memory(*model_); }
  void check_loras(const std::vector<pipeline::LoraUse>& loras) const override {
    model_->check_loras(loras);
  }
  void set_textual_inversions(std::vector<pipeline::TextualInversionPtr> list) override {
    model_->set_textual_inversions(std::move(list));
  }
  int evals_total(const pipeline::ImageSpec& spec) const override {
    return model_->evals_total(spec);
  }

  void warm_up(int size) override {
    // One short generation, so the first user does not pay for allocator growth and kernel
    // selection, and a model that cannot run here fails now.
    pipeline::GenerateRequest warm;
    warm.prompt = kWarmUpPrompt;
    warm.image.width = warm.image.height = size;
    warm.image.steps = 2;
    model_->generate(warm);
  }

  double time_step(int size, int batch) override {
    if (!timing_cond_) {
      timing_cond_ = model_->encode_text(kWarmUpPrompt);
      timing_uncond_ = model_->encode_text("");
    }
    pipeline::ImageSpec spec;
    spec.width = spec.height = size;
    spec.steps = 3;  // a call to warm up (or capture) and two timed
    std::vector<std::unique_ptr<pipeline::Trajectory>> owned;
    std::vector<pipeline::Trajectory*> trajectories;
    for (int k = 0; k < batch; ++k) {
      owned.push_back(model_->begin(spec, timing_cond_, timing_uncond_));
      trajectories.push_back(owned.back().get());
    }
    // On the CPU a call returns when its step is done. On a GPU it returns once the step before
    // it is done (Model::step bounds the queue to one step), so in steady state the returns of
    // calls two apart are two step times apart; its first call captures the CUDA graph.
    const bool gpu = model_->info().device.rfind("cuda", 0) == 0;
    const int timed = gpu ? 2 : 1;
    if (gpu) model_->step(trajectories);
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < timed; ++i) model_->step(trajectories);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / timed;
  }

  pipeline::EmbeddingPtr encode_text(const std::string& prompt, int clip_skip) override {
    return model_->encode_text(prompt, clip_skip);
  }
  std::vector<pipeline::EmbeddingPtr> encode_texts(const std::vector<std::string>& prompts,
                                                   int clip_skip) override {
    return model_->encode_texts(prompts, clip_skip);
  }
  std::vector<pipeline::EmbeddingPtr> encode_for(
      const std::vector<std::string>& prompts, int clip_skip, pipeline::TextRole role,
      pipeline::PromptSyntax syntax, const std::vector<pipeline::LoraUse>& loras = {}) override {
    return model_->encode_texts(prompts, clip_skip, role, syntax, loras);
  }
  pipeline::TextInput text_input(const std::string& prompt, pipeline::PromptSyntax syntax,
                                 pipeline::TextRole role) const override {
    return model_->text_input(prompt, syntax, role);
  }
  std::string embedding_to_bytes(const pipeline::Embedding& e) const override {
    return model_->embedding_to_bytes(e);
  }
  pipeline::EmbeddingPtr embedding_from_bytes(std::string_view bytes) const override {
    return model_->embedding_from_bytes(bytes);
  }
  uint64_t embedding_size(const pipeline::Embedding& e) const override {
    return pipeline::Model::embedding_size(e);
  }
  std::unique_ptr<ImageRun> begin(const pipeline::ImageSpec& spec, pipeline::EmbeddingPtr cond,
                                  pipeline::EmbeddingPtr uncond) override {
    return std::make_unique<PipelineRun>(model_->begin(spec, std::move(cond), std::move(uncond)));
  }
  void step(const std::vector<ImageRun*>& batch) override { model_->step(trajectories(batch)); }
  pipeline::Model::StepRows last_step_rows() const override { return model_->last_step_rows(); }
  std::vector<pipeline::RgbImage> decode(const std::vector<ImageRun*>& batch) override {
    return model_->decode(trajectories(batch));
  }
  pipeline::RgbImage preview(const ImageRun& run, const PreviewOptions& options) override {
    const auto& t = *static_cast<const PipelineRun&>(run).trajectory;
    return options.method == "vae" ? model_->preview_vae(t, options.max_size)
                                   : model_->preview(t, options.max_size);
  }

 private:
  static constexpr const char* kWarmUpPrompt = "warm-up";
  std::shared_ptr<pipeline::Model> model_;
  pipeline::MemoryShape shape_;  // from the model's configs, for estimate_memory()
  pipeline::EmbeddingPtr timing_cond_, timing_uncond_;  // time_step()'s, on the worker's thread
};

}  // namespace

std::shared_ptr<ModelRunner> pipeline_runner(std::shared_ptr<pipeline::Model> model) {
  return std::make_shared<PipelineRunner>(std::move(model));
}

std::unique_ptr<Engine> Engine::create(const EngineOptions& options,
                                       std::vector<std::shared_ptr<pipeline::Model>> models,
                                       std::shared_ptr<cache::EmbeddingCache> cache) {
  std::vector<std::shared_ptr<ModelRunner>> runners;
  for (auto& m : models) runners.push_back(pipeline_runner(std::move(m)));
  return create(options, std::move(runners), std::move(cache));
}

}  // namespace sdserve::engine
