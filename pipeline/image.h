// Images as the rest of the program sees them (8-bit RGB, no torch), and their encoders.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sdserve::pipeline {

struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;  // row-major RGB, width * height * 3 bytes
};

// PNG with optional text chunks (A1111 stores the generation settings under "parameters"): tEXt
// where the UTF-8 text fits Latin-1, iTXt otherwise.
std::vector<uint8_t> encode_png(const RgbImage& image,
                                const std::vector<std::pair<std::string, std::string>>& text = {});

// Decodes a PNG to RGB (tests, round trips); `text` receives its text chunks when non-null, as
// UTF-8 (tEXt converted from Latin-1; iTXt as stored).
RgbImage decode_png(const std::vector<uint8_t>& bytes,
                    std::vector<std::pair<std::string, std::string>>* text = nullptr);

// An image a client sent that cannot be used: not PNG, JPEG or WebP, corrupt, or over the limits.
// The message says which, for a 400.
class ImageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ImageLimits {
  int max_side = 8192;               // either side, in pixels
  int64_t max_pixels = 4096 * 4096;  // width x height (48 MiB decoded)
};

// A client's PNG, JPEG or WebP (lossy or lossless; not animated) as 8-bit RGB (alpha dropped,
// as PIL's convert("RGB")). The declared size is checked against `limits` before any pixel is
// decoded, so a small file declaring 60000x60000 costs nothing. WebP needs a build with libwebp
// (webp_supported()); without it WebP is refused, saying so. Throws ImageError.
RgbImage decode_image(const std::vector<uint8_t>& bytes, const ImageLimits& limits = {});
// Whether this build decodes WebP (CMake found libwebp).
bool webp_supported();

// The text of a PNG's first tEXt or uncompressed iTXt chunk named `key`, as UTF-8 (tEXt is
// Latin-1); "" when there is none. Reads chunk headers only, not the image: cheap and safe on any
// bytes (POST /sdapi/v1/png-info).
std::string read_png_text(const std::vector<uint8_t>& png, const std::string& key);

// Baseline JPEG (previews; `sdserve generate -o x.jpg`), quality 1..100. A non-empty
// `user_comment` goes into an Exif UserComment, where A1111 keeps a JPEG's generation settings.
std::vector<uint8_t> encode_jpeg(const RgbImage& image, int quality = 80,
                                 const std::string& user_comment = "");

// Resized to width x height with a Lanczos (a = 3) filter, as Pillow's Image.resize(size,
// Image.LANCZOS) computes it on 8-bit images, value for value: horizontal then vertical passes,
// 22-bit fixed-point weights, each pass rounded to 8 bits. diffusers' image processor and A1111
// resize init images this way.
RgbImage resize_lanczos(const RgbImage& image, int width, int height);

// Box-filter downscale so that neither side exceeds max_side (no-op when already small enough).
RgbImage shrink_to(const RgbImage& image, int max_side);

}  // namespace sdserve::pipeline
