// Images as the rest of the program sees them (8-bit RGB, no torch), and their encoders.
#pragma once

#include <cstdint>
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

// The text of a PNG's first tEXt or uncompressed iTXt chunk named `key`, as UTF-8 (tEXt is
// Latin-1); "" when there is none. Reads chunk headers only, not the image: cheap and safe on any
// bytes (POST /sdapi/v1/png-info).
std::string read_png_text(const std::vector<uint8_t>& png, const std::string& key);

// Baseline JPEG (previews; `sdserve generate -o x.jpg`), quality 1..100. A non-empty
// `user_comment` goes into an Exif UserComment, where A1111 keeps a JPEG's generation settings.
std::vector<uint8_t> encode_jpeg(const RgbImage& image, int quality = 80,
                                 const std::string& user_comment = "");

// Box-filter downscale so that neither side exceeds max_side (no-op when already small enough).
RgbImage shrink_to(const RgbImage& image, int max_side);

}  // namespace sdserve::pipeline
