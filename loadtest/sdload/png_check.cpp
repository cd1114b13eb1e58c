#include "sdload/png_check.h"

#include <png.h>

#include <cstring>
#include <vector>

namespace sdload {

PngCheck check_png(const std::string& bytes, int width, int height) {
  PngCheck out;
  // libpng's simplified API: no setjmp/longjmp to handle, errors come back in `image`.
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&image, bytes.data(), bytes.size())) {
    out.error = std::string("not a PNG: ") + image.message;
    return out;
  }
  out.width = static_cast<int>(image.width);
  out.height = static_cast<int>(image.height);
  // Before decoding: the requested size bounds what we allocate, whatever the header claims.
  if (out.width != width || out.height != height) {
    out.error = "PNG is " + std::to_string(out.width) + "x" + std::to_string(out.height) +
                ", requested " + std::to_string(width) + "x" + std::to_string(height);
    png_image_free(&image);
    return out;
  }
  image.format = PNG_FORMAT_RGB;
  std::vector<unsigned char> pixels(PNG_IMAGE_SIZE(image));
  if (!png_image_finish_read(&image, nullptr, pixels.data(), 0, nullptr)) {
    out.error = std::string("corrupt PNG: ") + image.message;
    return out;  // finish_read has freed the image
  }
  out.ok = true;
  return out;
}

}  // namespace sdload
