// The Stable Diffusion pipeline as the rest of the program sees it: torch-free.
//
// Two ways in:
//  - Model::generate(): a whole request, for the command line and tests.
//  - The step-level API the batching engine uses: encode_text() once per prompt, begin() one
//    Trajectory per image, then step() any set of trajectories together (different requests,
//    samplers, step counts and guidance scales share one UNet call), decode() the finished ones.
// Image k of a request draws from its own CPU generator seeded seed + k, so an image's pixels do
// not depend on what else shares its batch.
//
// Thread safety: step(), decode() and encode_text(s)() may each run on their own thread (the
// engine's worker, decoder and text threads; on CUDA each of the latter two on a stream of its
// own), each of them from one thread at a time; info(), tokenize(), text_input() and the textual
// inversion members are safe from any thread.
// Requests are checked by validate() in pipeline/validate.h.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pipeline/image.h"
#include "pipeline/inpaint.h"
#include "pipeline/lora.h"
#include "pipeline/textual_inversion.h"

namespace sdserve::pipeline {

enum class Precision { kFloat32, kFloat16, kBFloat16 };
std::string precision_name(Precision p);
Precision parse_precision(const std::string& name);  // "fp32"|"float32"|"fp16"|"float16"|"bf16"|...

struct LoadOptions {
  std::string device = "auto";  // "auto" (first CUDA GPU, else CPU), "cpu", "cuda", "cuda:N"
  // Compute dtype; "auto" picks fp16 on CUDA and fp32 on the CPU.
  std::string precision = "auto";
  // Tokenizer used for single-file checkpoints (which carry none); empty = the bundled SD 1.x one.
  std::string default_tokenizer_dir;
  // Single files only: a diffusers folder of the same architecture whose config.json files,
  // tokenizers and scheduler config replace the ones inferred from shapes (as diffusers'
  // from_single_file(config=...)); needed where shapes cannot tell, e.g. head counts of a
  // model whose heads are not 64 wide. Empty: inferred.
  std::string single_file_config;
  // VAE dtype: "auto" = the compute dtype; when that is fp16 and the VAE's config asks for
  // float32 (force_upcast, as SD 1.x and SDXL do), a decode with inf/NaN is redone in float32,
  // and so is every later one. "fp32" decodes as diffusers does for such VAEs.
  std::string vae_precision = "auto";
  // CUDA only: replay a CUDA graph per (padded batch, resolution) for the UNet, keep
  // convolutions channels-last, pad UNet batches up to these sizes (rows: images x 2 with CFG).
  bool cuda_graphs = true;
  bool channels_last = true;
  std::vector<int> batch_buckets = {1, 2, 4, 8, 16, 32, 64};
  // How LoRAs run (pipeline/lora_runtime.h): "auto" merges them into the weights for a UNet
  // call whose rows all use one set and adds each row's low-rank terms otherwise; "per-row" and
  // "merged" force one way ("merged" runs a call of several sets once per set).
  std::string lora_mode = "auto";
  // LoRAs converted to the device and dtype are kept up to this many MB (least recently used
  // go first).
  int lora_cache_mb = 1024;
};

struct ModelInfo {
  std::string name;  // folder or file name without extension
  std::string path;
  std::string layout;  // "diffusers" | "single-file"
  std::string family;  // "sd1" | "sd2" | "sdxl"
  std::string device;  // "cpu", "cuda:0"
  std::string precision;
  // The resolution the model was trained at (unet sample_size times the VAE's downscaling):
  // 512 for SD 1.x, 768 for SD 2.x's v-models, 1024 for SDXL. Requests default to it.
  int native_size = 512;
  int text_layers = 12;  // clip_skip may be 1..text_layers
  // SDXL: the UNet takes size conditioning (ImageSpec's original/crop/target fields).
  bool size_conditioning = false;
  // SDXL: a negative prompt's embedding differs from the same text's as a prompt (TextRole).
  bool negatives_differ = false;
  int latent_channels = 4;
  // An inpainting model: its UNet takes 9 channels (latents, mask, masked-image latents).
  bool inpainting = false;
  double load_seconds = 0;
  // Bytes its weights take on the device (inspect_model(): an estimate before loading).
  uint64_t weight_bytes = 0;
  // A digest of the text encoder's config and weights (as loaded, in the compute dtype): equal on
  // every replica that loads the same text encoder, different for any other. Embedding cache keys
  // start from it.
  std::string text_fingerprint;
};

// --- Hires fix (A1111's enable_hr): pipeline/hires_spec.cpp (the rules), pipeline/hires.cpp -----
// After text to image, a second pass in the same trajectory: the finished latents upscaled in
// latent space (no VAE), then denoised again as image to image at the larger size. The reference
// is diffusers' img2img pipeline given the upscaled latents as its 4-channel image, with a fresh
// CPU generator seeded as the first pass's (A1111 also draws the second pass's noise from the
// image's seed).
struct HiresSpec {
  // The second pass's size, by A1111's rule (hires_size()): width and height 0 scale the first
  // pass's size by `scale`; one of them set keeps the aspect ratio; both set cover that size at
  // the first pass's aspect ratio and the latents are cropped to it, centred.
  double scale = 2.0;
  int width = 0;                    // A1111's hr_resize_x
  int height = 0;                   // A1111's hr_resize_y
  std::string upscaler = "Latent";  // one of hires_upscalers()
  int steps = 0;                    // 0: the first pass's steps
  double strength = 0.7;            // as img2img's: the last int(steps x strength) steps run
  // Canonical names (resolve_sampler); an empty sampler: the first pass's sampler and scheduler.
  std::string sampler;
  std::string scheduler;
};

// One image's settings. Sizes are pixels (multiples of 8).
struct ImageSpec {
  int width = 512;
  int height = 512;
  // SDXL's size conditioning, in pixels; 0 means diffusers' default: original and target are the
  // image's own size, the crop is (0, 0). Other families ignore them.
  int original_width = 0;
  int original_height = 0;
  int crop_left = 0;
  int crop_top = 0;
  int target_width = 0;
  int target_height = 0;
  int steps = 30;
  double guidance_scale = 7.5;  // <= 1 skips the unconditional pass
  std::string sampler = "euler";
  std::string scheduler = "normal";  // "normal" | "karras"
  uint64_t seed = 0;
  // Image to image (as diffusers' img2img pipelines): the picture to start from, exactly width x
  // height (callers resize: server/init_image.h), VAE-encoded and noised to where the schedule's
  // last int(steps x strength) steps start; only those steps run. Null: text to image.
  std::shared_ptr<const RgbImage> init_image;
  double strength = 1.0;  // 0..1; read only with an init image
  // Inpainting, as diffusers' inpaint pipelines: repaint where the mask is white (binarised at
  // 128), width x height, over init_image. A 4-channel UNet blends the init image's latents,
  // noised to each step's level, back in outside the mask after every step; an inpainting UNet
  // (ModelInfo::inpainting) reads the mask and the masked picture's latents, and without a mask
  // repaints everything (text to image on such a model: no init image either). strength 1 starts
  // from pure noise. Pixel preparation (blur, crop, fill) is prepare_inpaint()'s.
  std::shared_ptr<const GrayImage> mask;
  MaskedContent masked_content = MaskedContent::kOriginal;  // the latent fills act here
  // decode() pastes the result back through it (A1111's overlay); null: the result as it is.
  std::shared_ptr<const InpaintOverlay> overlay;
  int mask_blur = 0;  // for the PNG parameters only ("Mask blur"); -1: x and y differ

  // --- Hires fix (text to image only): width x height is the first pass's size ---
  std::optional<HiresSpec> hires;

  // LoRAs for this image's UNet rows, with their unet_weight (the text encoders' are the
  // `loras` given to encode_text). Images of one batch may use different sets.
  std::vector<LoraUse> loras;
};

// The steps that run for a spec: steps, or int(steps x strength) of them with an init image.
int steps_that_run(const ImageSpec& spec);

// --- Hires fix: the second pass's geometry and settings (torch-free: hires_spec.cpp) ---
// In pixels (multiples of 8): the size the latents are interpolated to (A1111's
// calculate_target_resolution, floored to whole latents), the crop from its left and top, and the
// image's final size.
struct HiresSize {
  int upscaled_width = 0, upscaled_height = 0;
  int crop_left = 0, crop_top = 0;
  int width = 0, height = 0;
};
HiresSize hires_size(const ImageSpec& spec);  // spec.hires must be set
// The second pass's settings: the final size, its steps, sampler, scheduler and strength (read
// as image to image's), the rest as the first pass's; hires unset.
ImageSpec second_pass_spec(const ImageSpec& spec);
// The steps the second pass runs: int(steps x strength) of its steps, as img2img's.
int second_pass_steps_that_run(const ImageSpec& second_pass);
// Sampler steps that run in all passes (users' step counts and progress).
int steps_in_all_passes(const ImageSpec& spec);
// The image's final size: width x height, or the second pass's.
std::pair<int, int> final_size(const ImageSpec& spec);
// The sizes UNet calls run at for a spec: the first pass's, then the second's when it differs.
std::vector<std::pair<int, int>> pass_sizes(const ImageSpec& spec);
// A1111's latent upscalers: "Latent" (bilinear), "Latent (antialiased)", "Latent (bicubic)",
// "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)".
const std::vector<std::string>& hires_upscalers();

// How a prompt's text becomes what the text encoder reads (docs/PROMPTS.md):
//  kA1111: AUTOMATIC1111's syntax: (word), (word:1.3), [word], \( escapes, BREAK; a prompt past
//          the encoder's 75 tokens is encoded in chunks of 75 whose embeddings are joined.
//          Without syntax and within 75 tokens it is exactly kNone.
//  kNone:  the text as it is, cut at 75 tokens, as diffusers encodes it.
enum class PromptSyntax { kA1111, kNone };
std::string prompt_syntax_name(PromptSyntax syntax);        // "a1111" | "none"
PromptSyntax parse_prompt_syntax(const std::string& name);  // throws RequestError("prompt_syntax")
// Chunks of 75 tokens a prompt may take (BREAK starts one); longer ones are refused.
constexpr int kMaxPromptChunks = 16;

// A textual-inversion embedding a prompt calls (textual_inversion.h).
struct UsedEmbedding {
  std::string name;
  std::string sha256;  // of its file
};

// What the text encoder reads for a prompt: one or more chunks of its context (start token, up
// to 75 tokens, end token, padding) and each token's weight (1 without emphasis). Prompts with
// equal inputs have equal embeddings. A prompt that calls textual-inversion embeddings reads
// their vectors where their names were: ids from the text encoder's vocabulary size on index the
// vectors of `embeddings` side by side (vocab_size + row).
struct TextInput {
  std::vector<int32_t> ids;
  std::vector<float> weights;
  std::vector<UsedEmbedding> embeddings;  // in the order of their rows
};

struct GenerateRequest {
  std::string prompt;
  std::string negative_prompt;
  PromptSyntax prompt_syntax = PromptSyntax::kA1111;
  int clip_skip =
      1;  // A1111's convention: 1 = last layer, 2 = penultimate (diffusers' clip_skip=1)
  int num_images = 1;
  ImageSpec image;  // image k uses seed image.seed + k
  // For the PNG parameters only: the LoRAs used, by name, and their short hashes (A1111's
  // "Lora hashes": the first 12 digits of the addnet SHA-256).
  std::vector<std::pair<std::string, std::string>> lora_hashes;
};

class Embedding;  // a prompt's text-encoder output, resident on the model's device
using EmbeddingPtr = std::shared_ptr<const Embedding>;

// What a text is encoded for. SDXL treats negatives differently (as diffusers does): they ignore
// clip_skip, and an empty one is all zeros when the model asks for it
// (force_zeros_for_empty_prompt). Other families encode both alike.
enum class TextRole { kPrompt, kNegative };

// One image being denoised: its latent, its sampler state and its random generator.
class Trajectory {
 public:
  ~Trajectory();
  // The current pass's settings: with the hires fix, second_pass_spec() once the first has ended.
  const ImageSpec& spec() const;
  // UNet evaluations done so far and in all, counting only those that run (image to image skips
  // the first ones): steps, except heun (2 * steps - 1) and pndm (steps + 1). With the hires fix
  // both passes count.
  int evals_done() const;
  int evals_total() const;
  bool done() const { return evals_done() >= evals_total(); }

  struct State;  // defined in pipeline/trajectory_state.h (torch)
  State& state() { return *state_; }
  const State& state() const { return *state_; }
  explicit Trajectory(std::unique_ptr<State> state);

 private:
  std::unique_ptr<State> state_;
};

class Model {
 public:
  using Progress = std::function<void(int done, int total)>;

  // Loads a diffusers folder or a single .safetensors file; throws ModelError with a message
  // saying what is wrong and what to do.
  static std::shared_ptr<Model> load(const std::string& path, const LoadOptions& options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelInfo& info() const;

  // BPE token ids without BOS/EOS/padding (to warn about prompts past 75 tokens).
  std::vector<int32_t> tokenize(const std::string& text) const;

  // Textual-inversion embeddings prompts may call from now on (a prompt word equal to an
  // embedding's name becomes its vectors, as in A1111; docs/PROMPTS.md), replacing those set
  // before. Embeddings this model cannot use (another family's, a clashing name) are skipped and
  // listed with the reason. Safe beside encode_text(s)(), which use the set they started with.
  void set_textual_inversions(std::vector<TextualInversionPtr> list);
  std::vector<TextualInversionInfo> textual_inversions() const;  // usable, by name
  std::vector<SkippedTextualInversion> skipped_textual_inversions() const;

  // What the text encoder reads for `prompt`. Throws RequestError (naming "prompt" or
  // "negative_prompt" after `role`) for syntax it cannot take or a prompt past kMaxPromptChunks.
  TextInput text_input(const std::string& prompt, PromptSyntax syntax,
                       TextRole role = TextRole::kPrompt) const;

  // (1, 77 x chunks, D); weights applied as A1111 does (docs/PROMPTS.md). `loras` adapt the text
  // encoders, each at its te_weight.
  EmbeddingPtr encode_text(const std::string& prompt, int clip_skip = 1,
                           TextRole role = TextRole::kPrompt,
                           PromptSyntax syntax = PromptSyntax::kA1111,
                           const std::vector<LoraUse>& loras = {}) const;
  // Embeddings as bytes (a small versioned header, then the raw tensor) for caches outside the
  // process, and back. embedding_from_bytes() checks everything against this model (format
  // version, dtype, shape, length, finite values) and throws ModelError instead of trusting it.
  std::string embedding_to_bytes(const Embedding& embedding) const;
  EmbeddingPtr embedding_from_bytes(std::string_view bytes) const;
  static size_t embedding_size(const Embedding& embedding);  // bytes it holds on its device
  // Several prompts in one text-encoder call; all of them with the same `loras`.
  std::vector<EmbeddingPtr> encode_texts(const std::vector<std::string>& prompts, int clip_skip = 1,
                                         TextRole role = TextRole::kPrompt,
                                         PromptSyntax syntax = PromptSyntax::kA1111,
                                         const std::vector<LoraUse>& loras = {}) const;
  // Throws RequestError (field "loras") naming the first LoRA that does not fit this model and
  // why: another family, a module the model lacks, a shape that differs; or a missing (null)
  // LoRA or a weight that is not finite. Cheap (names and shapes; nothing moves to the device).
  // Thread-safe.
  void check_loras(const std::vector<LoraUse>& loras) const;
  // `uncond` may be null when spec.guidance_scale <= 1.
  std::unique_ptr<Trajectory> begin(const ImageSpec& spec, EmbeddingPtr cond,
                                    EmbeddingPtr uncond) const;
  // One model evaluation for each trajectory (none may be done; all at one spec().width x
  // height), in a single UNet batch; rows whose prompt embeddings differ in length (long prompts)
  // take one UNet call per length. A hires trajectory whose first pass this ends begins its
  // second here: its spec() (and size) change.
  void step(const std::vector<Trajectory*>& batch) const;
  // The last step()'s UNet rows (one per image, two with CFG) and the rows of padding its CUDA
  // graphs added (batch buckets); for the metrics. Read on the thread that called step().
  struct StepRows {
    int rows = 0;
    int padding = 0;
  };
  StepRows last_step_rows() const;
  // Model evaluations a spec takes (steps, except heun 2 * steps - 1, pndm steps + 1), only
  // those that run with an init image; both passes' with the hires fix.
  int evals_total(const ImageSpec& spec) const;
  // Decodes finished trajectories to 8-bit RGB.
  std::vector<RgbImage> decode(const std::vector<Trajectory*>& batch) const;
  // A cheap preview: the predicted clean latent projected to RGB (no VAE), at most max_side px.
  RgbImage preview(const Trajectory& trajectory, int max_side = 256) const;
  // The same through the VAE decoder (slower, exact colours).
  RgbImage preview_vae(const Trajectory& trajectory, int max_side = 256) const;

  // Whole request: its images run together as one batch; request.image.loras adapt the UNet (at
  // their unet_weight) and the text encoders for its prompts (at their te_weight).
  std::vector<RgbImage> generate(const GenerateRequest& request,
                                 const Progress& progress = {}) const;

  struct Impl;
  Impl& impl() const { return *impl_; }

 private:
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The clip_skip an embedding for `role` really depends on (SDXL negatives ignore it, as in
// diffusers): caches key on it.
inline int effective_clip_skip(const ModelInfo& model, int clip_skip, TextRole role) {
  return role == TextRole::kNegative && model.negatives_differ ? 1 : clip_skip;
}

// "Stable Diffusion XL" for "sdxl", and so on (ModelInfo::family); the code itself otherwise.
std::string family_display_name(const std::string& family);

// What a model is, from its configs and the headers of its files, without loading its weights
// (milliseconds): a models folder's listing, a request's bounds before its model is loaded.
// `device` is empty and `text_fingerprint` too; `precision` and `weight_bytes` are what
// Model::load() with `options` would give. Throws ModelError as Model::load() does.
ModelInfo inspect_model(const std::string& path, const LoadOptions& options = {});

// Opens a .safetensors file and checks its header against its size, as loading does; throws
// ModelError saying what is wrong.
void check_safetensors_file(const std::string& path);

// CUDA devices torch can use (0 on a CPU-only build or machine).
int cuda_device_count();

// The bundled tiny model (models/tiny-sd15, or $SDSERVE_MODELS_DIR/tiny-sd15): the default
// model, and the SD 1.x tokenizer single-file checkpoints use.
std::string bundled_model_path();

// A random seed for a request without one: 32 bits, as in A1111. Thread-safe.
uint64_t random_seed();

// A1111's "parameters" text for a PNG (prompt, negative prompt, then "Steps: ..., Sampler: ...").
// `model_hash`: A1111's short hash of the checkpoint file (AutoV2, 10 hex digits); empty leaves
// "Model hash" out, as A1111 does for a model it has not hashed.
std::string a1111_parameters(const GenerateRequest& request, uint64_t seed, const ModelInfo& model,
                             const std::string& model_hash = "");

}  // namespace sdserve::pipeline
