// Client pictures (init_image, A1111's init_images) through pipeline::decode_image(), then the
// Lanczos resize a request applies. Any input is decoded or refused with ImageError; anything
// else escaping (or a sanitizer report) is a finding. Properties: a decoded image is within the
// limits and holds width x height x 3 bytes.
#include <cstdint>
#include <string>
#include <vector>

#include "finding.h"
#include "pipeline/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<uint8_t> bytes(data, data + size);
  sdserve::pipeline::ImageLimits limits;
  limits.max_side = 512;  // small, so that a declared size is checked and memory stays bounded
  limits.max_pixels = 256 * 256;
  sdserve::pipeline::RgbImage image;
  try {
    image = sdserve::pipeline::decode_image(bytes, limits);
  } catch (const sdserve::pipeline::ImageError&) {
    return 0;
  }
  if (image.width < 1 || image.height < 1 || image.width > limits.max_side ||
      image.height > limits.max_side ||
      static_cast<int64_t>(image.width) * image.height > limits.max_pixels)
    finding("decoded past the limits: " + std::to_string(image.width) + "x" +
            std::to_string(image.height));
  if (image.pixels.size() != static_cast<size_t>(image.width) * image.height * 3)
    finding("pixel buffer of the wrong size");
  const auto resized = sdserve::pipeline::resize_lanczos(image, 24, 16);
  if (resized.pixels.size() != 24u * 16u * 3u) finding("resized to the wrong size");
  return 0;
}
