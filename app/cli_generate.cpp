// `sdserve generate`: one request straight through the pipeline, images written as PNG.
#include <unistd.h>
#include <algorithm>
#include <cctype>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "app/cli.h"
#include "pipeline/errors.h"
#include "pipeline/image.h"
#include "pipeline/pipeline.h"
#include "pipeline/sampler_names.h"
#include "pipeline/validate.h"
#include "server/logging.h"

namespace sdserve {
namespace {

constexpr const char* kHelp = R"(usage: sdserve generate --prompt TEXT [options] -o out.png

  --model PATH        diffusers folder or single-file .safetensors (default: bundled tiny model)
  --prompt TEXT       what to draw (required)
  --negative TEXT     what to avoid (default: empty)
  --steps N           denoising steps, 1..150 (default 30)
  --cfg X             guidance scale, 0..30 (default 7.5; <= 1 skips the negative pass)
  --sampler NAME      euler, euler_ancestral, heun, dpmpp_2m, lms, ddim, pndm, uni_pc
                      (A1111 names such as "DPM++ 2M Karras" work too; default euler)
  --scheduler NAME    normal | karras (default normal)
  --seed N            seed of the first image; image k uses seed + k (default: random)
  --width N --height N  multiples of 8, 64..2048 (default: the model's native size, 512 for
                        SD 1.x, 1024 for SDXL)
  --init-image FILE   image to image: start from this PNG, JPEG or WebP (its size, rounded
                      down to a multiple of 8, unless --width/--height; resized with Lanczos)
  --strength X        with --init-image: how much of it is redrawn, 0..1 (default 0.8; the
                      last int(steps x X) steps run)
  --mask FILE         inpainting: repaint where this PNG, JPEG or WebP is white (with --init-image;
                      resized to the picture when its size differs; default --strength 1)
  --mask-blur N       Gaussian blur of the mask, 0..64 px (default 0)
  --inpainting-fill N what the hole starts from: 0 fill, 1 original (default), 2 latent
                      noise, 3 latent nothing (A1111's)
  --only-masked PAD   inpaint only the mask's bounding box grown by PAD px, at full size,
                      and paste it back (A1111's "Only masked")
  --invert-mask       repaint where the mask is black
  --paste-back        paste the result over the picture through the mask (A1111 does)
  -n N                number of images, 1..16 (default 1): out.png, out-1.png, ...
  --clip-skip N       1 = last CLIP layer (default), 2 = penultimate (A1111's convention)
  --prompt-syntax S   a1111 (default: (word:1.2), [word], BREAK, prompts past 75 tokens) or
                      none (the text as it is, cut at 75 tokens, as diffusers)
  --single-file-config DIR  a diffusers folder whose configs a single-file model uses
                      instead of ones inferred from its shapes
  --device D          auto | cpu | cuda | cuda:N (default auto)
  --precision P       auto | fp32 | fp16 | bf16 (default auto: fp16 on CUDA, fp32 on CPU)
  -o, --output FILE   output path, .png or .jpg/.jpeg (required); the settings go into the
                      PNG's "parameters" text or the JPEG's Exif UserComment, as A1111 writes
  -q, --quiet         no progress bar
)";

// The output format from -o's extension: "png" or "jpeg"; "" for anything else.
std::string output_format(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  if (ext == ".png") return "png";
  if (ext == ".jpg" || ext == ".jpeg") return "jpeg";
  return "";
}

std::string output_path(const std::string& first, int k) {
  if (k == 0) return first;
  std::filesystem::path p(first);
  return (p.parent_path() / (p.stem().string() + "-" + std::to_string(k) + p.extension().string()))
      .string();
}

void draw_progress(int done, int total, double seconds) {
  constexpr int kWidth = 30;
  const int filled = total > 0 ? done * kWidth / total : kWidth;
  const double rate = seconds > 0 ? done / seconds : 0;
  std::fprintf(stderr, "\r[%.*s%*s] %d/%d  %.2f it/s", filled, "##############################",
               kWidth - filled, "", done, total, rate);
  if (done == total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

struct GenerateArgs {
  GenerateArgs() { request.image.width = request.image.height = 0; }  // 0: the model's size
  pipeline::GenerateRequest request;
  pipeline::LoadOptions load;
  std::string model = pipeline::bundled_model_path(), output, init_image, mask;
  pipeline::InpaintOptions inpaint;
  bool quiet = false;
};

// False for --help (printed). Ranges come from pipeline::Limits, the service's own.
bool parse_generate_args(const std::vector<std::string>& args, GenerateArgs& g) {
  using L = pipeline::Limits;
  auto& request = g.request;
  std::string sampler = "euler", scheduler, prompt_syntax = "a1111";
  bool have_prompt = false, have_seed = false, have_strength = false;
  request.image.strength = 0.8;  // diffusers' img2img default
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::cout << kHelp;
      return false;
    }
    if (a == "-q" || a == "--quiet") {
      g.quiet = true;
      continue;
    }
    if (a == "--invert-mask" || a == "--paste-back") {
      (a == "--invert-mask" ? g.inpaint.invert : g.inpaint.paste_back) = true;
      continue;
    }
    if (i + 1 >= args.size())
      throw UsageError(a.rfind("-", 0) == 0 ? a + " needs a value"
                                            : "unexpected argument '" + a + "'");
    const std::string& v = args[++i];
    if (a == "--model")
      g.model = v;
    else if (a == "--prompt")
      request.prompt = v, have_prompt = true;
    else if (a == "--negative")
      request.negative_prompt = v;
    else if (a == "--steps")
      request.image.steps = parse_int_arg(a, v, 1, L::kMaxSteps);
    else if (a == "--cfg")
      request.image.guidance_scale = parse_double_arg(a, v, 0, L::kMaxGuidanceScale);
    else if (a == "--sampler")
      sampler = v;
    else if (a == "--scheduler")
      scheduler = v;
    else if (a == "--seed")
      request.image.seed = parse_u64_arg(a, v), have_seed = true;
    else if (a == "--width")
      request.image.width = parse_int_arg(a, v, L::kMinSide, L::kMaxSide);
    else if (a == "--height")
      request.image.height = parse_int_arg(a, v, L::kMinSide, L::kMaxSide);
    else if (a == "--init-image")
      g.init_image = v;
    else if (a == "--strength")
      request.image.strength = parse_double_arg(a, v, 0, 1), have_strength = true;
    else if (a == "--mask")
      g.mask = v;
    else if (a == "--mask-blur")
      g.inpaint.mask_blur_x = g.inpaint.mask_blur_y = parse_int_arg(a, v, 0, L::kMaxMaskBlur);
    else if (a == "--inpainting-fill")
      g.inpaint.fill = static_cast<pipeline::MaskedContent>(parse_int_arg(a, v, 0, 3));
    else if (a == "--only-masked")
      g.inpaint.only_masked = true, g.inpaint.padding = parse_int_arg(a, v, 0, L::kMaxSide);
    else if (a == "-n")
      request.num_images = parse_int_arg(a, v, 1, L::kMaxImages);
    else if (a == "--clip-skip")
      request.clip_skip = parse_int_arg(a, v, 1, 64);  // the model's depth is checked once loaded
    else if (a == "--prompt-syntax")
      prompt_syntax = v;
    else if (a == "--single-file-config")
      g.load.single_file_config = v;
    else if (a == "--device")
      g.load.device = v;
    else if (a == "--precision")
      g.load.precision = v;
    else if (a == "-o" || a == "--output")
      g.output = v;
    else
      throw UsageError("unknown option '" + a + "'");
  }
  if (!have_prompt) throw UsageError("--prompt is required");
  if (have_strength && g.init_image.empty()) throw UsageError("--strength needs --init-image");
  if (!g.mask.empty() && g.init_image.empty()) throw UsageError("--mask needs --init-image");
  if (!g.mask.empty() && !have_strength) request.image.strength = 1.0;  // diffusers' inpainting
  const pipeline::InpaintOptions plain;
  if (g.mask.empty() &&
      (g.inpaint.invert || g.inpaint.paste_back || g.inpaint.only_masked ||
       g.inpaint.mask_blur_x != plain.mask_blur_x || g.inpaint.fill != plain.fill))
    throw UsageError(
        "--mask-blur, --inpainting-fill, --only-masked, --invert-mask and "
        "--paste-back need --mask");
  if (g.output.empty()) throw UsageError("-o/--output is required");
  if (output_format(g.output).empty())
    throw UsageError("-o '" + g.output + "': sdserve writes .png or .jpg/.jpeg images");
  for (const char* flag : {"--width", "--height"}) {
    const int v = std::string(flag) == "--width" ? request.image.width : request.image.height;
    if (v != 0 && v % L::kSideMultiple != 0)
      throw UsageError(std::string(flag) + " must be a multiple of " +
                       std::to_string(L::kSideMultiple) + ", got " + std::to_string(v));
  }
  try {
    const auto choice = pipeline::resolve_sampler(sampler, scheduler);
    request.image.sampler = choice.sampler;
    request.image.scheduler = choice.scheduler;
    request.prompt_syntax = pipeline::parse_prompt_syntax(prompt_syntax);
  } catch (const pipeline::RequestError& e) {
    throw UsageError(e.what());
  }
  if (!have_seed) request.image.seed = pipeline::random_seed();
  const auto out_dir = std::filesystem::path(g.output).parent_path();
  if (!out_dir.empty() && !std::filesystem::is_directory(out_dir))
    throw UsageError("output folder '" + out_dir.string() + "' does not exist");
  return true;
}

}  // namespace

int run_generate(const std::vector<std::string>& args) {
  GenerateArgs g;
  if (!parse_generate_args(args, g)) return 0;
  const auto& output = g.output;
  const bool quiet = g.quiet;
  setup_logging(quiet ? "warn" : "info");
  using L = pipeline::Limits;
  auto m = pipeline::Model::load(g.model, g.load);
  const auto read_picture = [](const std::string& flag, const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw UsageError(flag + " '" + path + "' cannot be read");
    const std::vector<uint8_t> bytes{std::istreambuf_iterator<char>(in),
                                     std::istreambuf_iterator<char>()};
    try {
      return pipeline::decode_image(bytes);
    } catch (const pipeline::ImageError& e) {
      throw UsageError(flag + " '" + path + "': " + e.what());
    }
  };
  if (!g.init_image.empty()) {
    pipeline::RgbImage init = read_picture("--init-image", g.init_image);
    // Sizes not given come from the image (diffusers' rule: rounded down to a multiple of 8).
    auto& spec = g.request.image;
    if (spec.width == 0) spec.width = std::max(L::kMinSide, init.width / 8 * 8);
    if (spec.height == 0) spec.height = std::max(L::kMinSide, init.height / 8 * 8);
    if (!g.mask.empty()) {
      auto prepared =
          pipeline::prepare_inpaint(init, pipeline::to_gray(read_picture("--mask", g.mask)),
                                    spec.width, spec.height, g.inpaint);
      spec.init_image = std::move(prepared.image);
      spec.mask = std::move(prepared.mask);
      spec.overlay = std::move(prepared.overlay);
      spec.masked_content = g.inpaint.fill;
      spec.mask_blur = g.inpaint.mask_blur_x;
    } else {
      if (init.width != spec.width || init.height != spec.height)
        init = pipeline::resize_lanczos(init, spec.width, spec.height);
      spec.init_image = std::make_shared<const pipeline::RgbImage>(std::move(init));
    }
  }
  // Sizes not given default to the model's own.
  if (g.request.image.width == 0) g.request.image.width = m->info().native_size;
  if (g.request.image.height == 0) g.request.image.height = m->info().native_size;
  const auto& request = g.request;
  const bool bar = !quiet && ::isatty(STDERR_FILENO);
  const auto start = std::chrono::steady_clock::now();
  auto images = m->generate(request, [&](int done, int total) {
    if (bar)
      draw_progress(
          done, total,
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  });
  for (size_t k = 0; k < images.size(); ++k) {
    const uint64_t seed = request.image.seed + k;
    const std::string parameters = pipeline::a1111_parameters(request, seed, m->info());
    const auto bytes = output_format(output) == "jpeg"
                           ? pipeline::encode_jpeg(images[k], 95, parameters)
                           : pipeline::encode_png(images[k], {{"parameters", parameters}});
    const std::string path = output_path(output, static_cast<int>(k));
    std::ofstream file(path, std::ios::binary | std::ios::trunc);
    file.write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
    if (!file) throw std::runtime_error("cannot write '" + path + "'");
    std::cout << path << "  (seed " << seed << ")\n";
  }
  return 0;
}

int parse_int_arg(const std::string& flag, const std::string& value, long long lo, long long hi) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != value.size() || value.empty())
    throw UsageError(flag + " must be an integer, got '" + value + "'");
  if (v < lo || v > hi)
    throw UsageError(flag + " must be between " + std::to_string(lo) + " and " +
                     std::to_string(hi) + ", got " + value);
  return static_cast<int>(v);
}

double parse_double_arg(const std::string& flag, const std::string& value, double lo, double hi) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != value.size() || value.empty())
    throw UsageError(flag + " must be a number, got '" + value + "'");
  if (!(v >= lo && v <= hi))
    throw UsageError(flag + " must be between " +
                     std::to_string(lo).substr(0, std::to_string(lo).find('.') + 2) + " and " +
                     std::to_string(hi).substr(0, std::to_string(hi).find('.') + 2) + ", got " +
                     value);
  return v;
}

uint64_t parse_u64_arg(const std::string& flag, const std::string& value) {
  if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos)
    throw UsageError(flag + " must be a non-negative integer, got '" + value + "'");
  try {
    return std::stoull(value);
  } catch (const std::exception&) {
    throw UsageError(flag + " must fit in 64 bits, got '" + value + "'");
  }
}

}  // namespace sdserve
