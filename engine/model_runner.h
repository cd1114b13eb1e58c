// What the engine's workers need of a model, as an interface: the pipeline implements it
// (pipeline_runner), and the engine's tests put a fake behind it to make every step of a job fail
// on purpose. Torch-free. A worker's thread calls everything but decode(), which its decoder
// thread calls, and encode_text(s)(), which its text thread calls, each concurrently with
// step(): an implementation must allow that. (At warm-up the decoder thread also calls
// encode_text() and begin(), while the worker's thread waits.) memory() may be called from any
// thread.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/job.h"
#include "pipeline/image.h"
#include "pipeline/memory.h"
#include "pipeline/pipeline.h"

namespace sdserve::engine {

// One image being denoised.
class ImageRun {
 public:
  virtual ~ImageRun() = default;
  virtual int evals_done() const = 0;   // model evaluations so far
  virtual int evals_total() const = 0;  // evaluations the image takes (every pass)
  bool done() const { return evals_done() >= evals_total(); }
  // (width, height) in pixels of the latents the next step runs on: the request's, or with the
  // hires fix the second pass's once the first has ended. One UNet call holds one size.
  virtual std::pair<int, int> size() const = 0;
};

class ModelRunner {
 public:
  virtual ~ModelRunner() = default;
  virtual const pipeline::ModelInfo& info() const = 0;
  // Model evaluations per image; throws pipeline::RequestError when the spec cannot run.
  virtual int evals_total(const pipeline::ImageSpec& spec) const = 0;
  // Runs a short generation of one `size` px square image (the worker picks the native size on a
  // GPU, where allocator growth and kernel selection happen there, and a small one on the CPU);
  // throws when the model cannot run here.
  virtual void warm_up(int size) = 0;
  // The seconds one UNet step takes for `batch` square images of `size` px with CFG, measured
  // now, for the admission policy (engine/warm_up.h). On a GPU the first call at a batch size
  // also captures its CUDA graph, which is not counted.
  virtual double time_step(int size, int batch) = 0;
  // The torch allocator's bytes on the model's device (zero on the CPU), for the metrics.
  struct Memory {
    uint64_t allocated = 0, reserved = 0;
  };
  virtual Memory memory() const { return {}; }
  // The estimated peak bytes of one UNet call of `unet_rows` rows of this size (one per image,
  // two with CFG) and one VAE decode of `decode_images` (pipeline/memory.h); zeros: unknown
  // (never refused). Pure arithmetic: any thread.
  virtual pipeline::MemoryEstimate estimate_memory(int /*width*/, int /*height*/, int /*unet_rows*/,
                                                   int /*decode_images*/) const {
    return {};
  }
  // Bytes free for requests on the model's device, measured now; 0: unknown (no check).
  virtual uint64_t available_memory() const { return 0; }
  virtual pipeline::EmbeddingPtr encode_text(const std::string& prompt, int clip_skip) = 0;
  // Several prompts in one text-encoder call (by default, one call each).
  virtual std::vector<pipeline::EmbeddingPtr> encode_texts(const std::vector<std::string>& prompts,
                                                           int clip_skip) {
    std::vector<pipeline::EmbeddingPtr> out;
    for (const auto& p : prompts) out.push_back(encode_text(p, clip_skip));
    return out;
  }
  // encode_texts() for a role (SDXL encodes negatives differently: pipeline::TextRole), a
  // prompt syntax and the text encoders' LoRAs (each at its te_weight; every prompt of the call
  // with the same set). The default suits models that care for none of them.
  virtual std::vector<pipeline::EmbeddingPtr> encode_for(
      const std::vector<std::string>& prompts, int clip_skip, pipeline::TextRole role,
      pipeline::PromptSyntax syntax, const std::vector<pipeline::LoraUse>& loras = {}) {
    (void)role;
    (void)syntax;
    (void)loras;
    return encode_texts(prompts, clip_skip);
  }
  // For the embedding cache and for checking prompts at submission: what the text encoder reads
  // for a prompt (equal inputs, equal embeddings; throws pipeline::RequestError for a prompt it
  // cannot take), and embeddings as bytes and back (from_bytes throws on anything that is not
  // this model's embedding). The defaults suit a model without a shared cache tier.
  virtual pipeline::TextInput text_input(const std::string& prompt, pipeline::PromptSyntax syntax,
                                         pipeline::TextRole role) const {
    (void)role;
    (void)syntax;  // the default encode_for() ignores it too
    pipeline::TextInput in;
    in.ids.assign(prompt.begin(), prompt.end());
    return in;
  }
  virtual std::string embedding_to_bytes(const pipeline::Embedding&) const {
    throw std::logic_error("this model's embeddings cannot be stored outside the process");
  }
  virtual pipeline::EmbeddingPtr embedding_from_bytes(std::string_view) const {
    throw std::logic_error("this model's embeddings cannot be read from outside the process");
  }
  virtual uint64_t embedding_size(const pipeline::Embedding&) const { return 0; }
  // Throws pipeline::RequestError (field "loras") when a LoRA does not fit this model.
  virtual void check_loras(const std::vector<pipeline::LoraUse>&) const {}
  // The textual-inversion embeddings prompts may call by name (pipeline::Model's).
  virtual void set_textual_inversions(std::vector<pipeline::TextualInversionPtr>) {}
  // `uncond` may be null when spec.guidance_scale <= 1.
  virtual std::unique_ptr<ImageRun> begin(const pipeline::ImageSpec& spec,
                                          pipeline::EmbeddingPtr cond,
                                          pipeline::EmbeddingPtr uncond) = 0;
  // One evaluation for every run (none done) in one model call.
  virtual void step(const std::vector<ImageRun*>& batch) = 0;
  // The last step()'s UNet rows and padding rows (pipeline::Model::last_step_rows), read on the
  // thread that called step(). The default: none known.
  virtual pipeline::Model::StepRows last_step_rows() const { return {}; }
  virtual std::vector<pipeline::RgbImage> decode(const std::vector<ImageRun*>& batch) = 0;
  virtual pipeline::RgbImage preview(const ImageRun& run, const PreviewOptions& options) = 0;
};

// The real pipeline (pipeline::Model) behind the interface.
std::shared_ptr<ModelRunner> pipeline_runner(std::shared_ptr<pipeline::Model> model);

}  // namespace sdserve::engine
