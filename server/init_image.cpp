#include "server/init_image.h"

#include "pipeline/inpaint.h"

#include "server/api_json.h"

namespace sdserve::server {

std::optional<std::vector<uint8_t>> unbase64(const std::string& text) {
  std::vector<uint8_t> out;
  out.reserve(text.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0;
  for (const unsigned char c : text) {
    int v;
    if (c >= 'A' && c <= 'Z')
      v = c - 'A';
    else if (c >= 'a' && c <= 'z')
      v = c - 'a' + 26;
    else if (c >= '0' && c <= '9')
      v = c - '0' + 52;
    else if (c == '+' || c == '-')
      v = 62;
    else if (c == '/' || c == '_')
      v = 63;
    else if (c == '=' || c == '\n' || c == '\r' || c == ' ')
      continue;
    else
      return std::nullopt;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<uint8_t>((acc >> bits) & 0xFF));
    }
  }
  return out;
}

pipeline::RgbImage decode_request_image(const std::string& text, const std::string& field) {
  std::string data = text;
  const auto comma = data.find(',');
  if (data.rfind("data:", 0) == 0 && comma != std::string::npos) data.erase(0, comma + 1);
  const auto bytes = unbase64(data);
  if (!bytes || bytes->empty())
    throw ApiError(400, "validation_error",
                   field + " must be a PNG, JPEG or WebP image as base64 text or a data: URL",
                   field);
  try {
    return pipeline::decode_image(*bytes);
  } catch (const pipeline::ImageError& e) {
    throw ApiError(400, "validation_error", field + ": " + e.what(), field);
  }
}

int default_side(int image_side) {
  return image_side / 8 * 8;
}

std::shared_ptr<const pipeline::RgbImage> fit_init_image(pipeline::RgbImage image, int width,
                                                         int height, pipeline::ResizeMode mode) {
  if (image.width != width || image.height != height)
    image = pipeline::resize_picture(image, width, height, mode);
  return std::make_shared<const pipeline::RgbImage>(std::move(image));
}

}  // namespace sdserve::server
