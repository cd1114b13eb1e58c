// Inpainting's pixel work (see inpaint.h). A1111's steps are followed in their order
// (modules/processing.py, StableDiffusionProcessingImg2Img.init and apply_overlay; masking.py);
// the pixels are not A1111's to the byte (its blurs are OpenCV's and Pillow's), only its method.
#include "pipeline/inpaint.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace sdserve::pipeline {
namespace {

uint8_t round8(double v) {
  return static_cast<uint8_t>(std::clamp(std::floor(v + 0.5), 0.0, 255.0));
}

// One axis of a Gaussian blur with OpenCV's kernel size for sigma and reflect-101 borders.
GrayImage blur_axis(const GrayImage& in, double sigma, bool horizontal) {
  if (sigma <= 0) return in;
  const int radius = static_cast<int>(2.5 * sigma + 0.5);
  std::vector<double> kernel(static_cast<size_t>(2 * radius + 1));
  double sum = 0;
  for (int i = -radius; i <= radius; ++i)
    sum += kernel[i + radius] = std::exp(-0.5 * i * i / (sigma * sigma));
  for (double& k : kernel) k /= sum;
  const int n = horizontal ? in.width : in.height;
  const auto reflect = [n](int i) {
    if (n == 1) return 0;
    while (i < 0 || i >= n) i = i < 0 ? -i : 2 * (n - 1) - i;
    return i;
  };
  GrayImage out = in;
  for (int y = 0; y < in.height; ++y)
    for (int x = 0; x < in.width; ++x) {
      double acc = 0;
      for (int k = -radius; k <= radius; ++k) {
        const int sx = horizontal ? reflect(x + k) : x, sy = horizontal ? y : reflect(y + k);
        acc += kernel[k + radius] * in.pixels[static_cast<size_t>(sy) * in.width + sx];
      }
      out.pixels[static_cast<size_t>(y) * in.width + x] = round8(acc);
    }
  return out;
}

// A premultiplied RGBA image in floats, for the fill's blurs.
struct Rgba {
  int width = 0, height = 0;
  std::vector<float> p;  // r, g, b (premultiplied), a; all 0..255
};

// Three box blurs approximate a Gaussian of `sigma` (as Pillow's GaussianBlur does), each a
// running sum with clamped edges: O(pixels) at any radius, where the fill uses radius 256.
void box_blur(Rgba& img, int r, bool horizontal) {
  if (r <= 0) return;
  const int n = horizontal ? img.width : img.height, lines = horizontal ? img.height : img.width;
  std::vector<float> line(static_cast<size_t>(n) * 4), out(line.size());
  const auto at = [&](int line_i, int i) -> float* {
    const int x = horizontal ? i : line_i, y = horizontal ? line_i : i;
    return &img.p[(static_cast<size_t>(y) * img.width + x) * 4];
  };
  for (int l = 0; l < lines; ++l) {
    for (int i = 0; i < n; ++i) std::copy_n(at(l, i), 4, &line[static_cast<size_t>(i) * 4]);
    const auto px = [&](int i) { return &line[static_cast<size_t>(std::clamp(i, 0, n - 1)) * 4]; };
    double acc[4] = {0, 0, 0, 0};
    for (int k = -r; k <= r; ++k)
      for (int c = 0; c < 4; ++c) acc[c] += px(k)[c];
    for (int i = 0; i < n; ++i) {
      for (int c = 0; c < 4; ++c)
        out[static_cast<size_t>(i) * 4 + c] = static_cast<float>(acc[c] / (2 * r + 1));
      for (int c = 0; c < 4; ++c) acc[c] += px(i + r + 1)[c] - px(i - r)[c];
    }
    for (int i = 0; i < n; ++i) std::copy_n(&out[static_cast<size_t>(i) * 4], 4, at(l, i));
  }
}

Rgba gaussian_rgba(Rgba img, double sigma) {
  if (sigma <= 0) return img;
  // Box width for three passes: sqrt(12 sigma^2 / 3 + 1).
  const int r =
      std::max(1, static_cast<int>(std::lround((std::sqrt(4.0 * sigma * sigma + 1) - 1) / 2)));
  for (int pass = 0; pass < 3; ++pass) {
    box_blur(img, r, true);
    box_blur(img, r, false);
  }
  return img;
}

// A1111's masking.fill: the picture outside the mask, blurred ever less and composited, so the
// hole takes the colours around it; outside the hole the picture is unchanged.
RgbImage fill_masked(const RgbImage& image, const GrayImage& mask) {
  const size_t n = static_cast<size_t>(image.width) * image.height;
  Rgba masked{image.width, image.height, std::vector<float>(n * 4)};
  for (size_t i = 0; i < n; ++i) {
    const float a = 255.0f - mask.pixels[i];
    for (int c = 0; c < 3; ++c) masked.p[i * 4 + c] = image.pixels[i * 3 + c] * a / 255.0f;
    masked.p[i * 4 + 3] = a;
  }
  std::vector<float> acc(n * 4, 0.0f);  // premultiplied, starts transparent
  for (const auto& [radius, repeats] :
       {std::pair{256, 1}, {64, 1}, {16, 2}, {4, 4}, {2, 2}, {0, 1}}) {
    const Rgba blurred = gaussian_rgba(masked, radius);
    for (int k = 0; k < repeats; ++k)
      for (size_t i = 0; i < n; ++i) {
        const float sa = blurred.p[i * 4 + 3] / 255.0f;
        for (int c = 0; c < 4; ++c)
          acc[i * 4 + c] = blurred.p[i * 4 + c] + acc[i * 4 + c] * (1 - sa);
      }
  }
  RgbImage out{image.width, image.height, std::vector<uint8_t>(n * 3)};
  for (size_t i = 0; i < n; ++i) {
    const float a = acc[i * 4 + 3];
    for (int c = 0; c < 3; ++c)
      out.pixels[i * 3 + c] = a > 0 ? round8(acc[i * 4 + c] * 255.0f / a) : image.pixels[i * 3 + c];
  }
  return out;
}

RgbImage crop(const RgbImage& image, const CropRegion& r) {
  RgbImage out{r.x2 - r.x1, r.y2 - r.y1, {}};
  out.pixels.resize(static_cast<size_t>(out.width) * out.height * 3);
  for (int y = 0; y < out.height; ++y)
    std::copy_n(&image.pixels[(static_cast<size_t>(y + r.y1) * image.width + r.x1) * 3],
                static_cast<size_t>(out.width) * 3,
                &out.pixels[static_cast<size_t>(y) * out.width * 3]);
  return out;
}

GrayImage crop(const GrayImage& image, const CropRegion& r) {
  GrayImage out{r.x2 - r.x1, r.y2 - r.y1, {}};
  out.pixels.resize(static_cast<size_t>(out.width) * out.height);
  for (int y = 0; y < out.height; ++y)
    std::copy_n(&image.pixels[static_cast<size_t>(y + r.y1) * image.width + r.x1],
                static_cast<size_t>(out.width), &out.pixels[static_cast<size_t>(y) * out.width]);
  return out;
}

RgbImage fit(const RgbImage& image, int width, int height,
             ResizeMode mode = ResizeMode::kJustResize) {
  return resize_picture(image, width, height, mode);
}

GrayImage fit(const GrayImage& image, int width, int height,
              ResizeMode mode = ResizeMode::kJustResize) {
  return resize_picture(image, width, height, mode);
}

// One axis of A1111's expand_crop_region: grow [lo, hi) to `want` within [0, size).
void grow_to(int& lo, int& hi, double want, int size) {
  const int diff = static_cast<int>(want - (hi - lo));
  lo -= diff / 2;
  hi += diff - diff / 2;
  if (hi >= size) {
    lo -= hi - size;
    hi = size;
  }
  if (lo < 0) {
    hi -= lo;
    lo = 0;
  }
  hi = std::min(hi, size);
}

}  // namespace

RgbImage resize_picture(const RgbImage& image, int width, int height, ResizeMode mode) {
  if (image.width == width && image.height == height) return image;
  if (mode == ResizeMode::kJustResize) return resize_lanczos(image, width, height);
  // A1111's resize_image: compare aspect ratios, scale one side to the size, the other by the
  // picture's proportions (integer division), paste centred.
  const double ratio = static_cast<double>(width) / height;
  const double src_ratio = static_cast<double>(image.width) / image.height;
  const bool cover = mode == ResizeMode::kCropAndResize;
  const bool full_width = cover ? ratio > src_ratio : ratio < src_ratio;
  const int src_w = std::max(1, full_width ? width : image.width * height / image.height);
  const int src_h = std::max(1, full_width ? image.height * width / image.width : height);
  const RgbImage scaled = resize_lanczos(image, src_w, src_h);
  RgbImage out{width, height, std::vector<uint8_t>(static_cast<size_t>(width) * height * 3, 0)};
  const int ox = width / 2 - src_w / 2, oy = height / 2 - src_h / 2;
  const auto put = [&](int x, int y, int sx, int sy) {
    std::copy_n(&scaled.pixels[(static_cast<size_t>(sy) * src_w + sx) * 3], 3,
                &out.pixels[(static_cast<size_t>(y) * width + x) * 3]);
  };
  for (int y = std::max(0, oy); y < std::min(height, oy + src_h); ++y)
    for (int x = std::max(0, ox); x < std::min(width, ox + src_w); ++x) put(x, y, x - ox, y - oy);
  if (mode == ResizeMode::kResizeAndFill) {
    // The bars: as many rows (columns) as the top (left) one, each a copy of the edge.
    if (ratio < src_ratio && oy > 0) {
      for (int k = 0; k < oy; ++k)
        for (int x = 0; x < width; ++x) {
          put(x, k, x, 0);
          if (oy + src_h + k < height) put(x, oy + src_h + k, x, src_h - 1);
        }
    } else if (ratio > src_ratio && ox > 0) {
      for (int k = 0; k < ox; ++k)
        for (int y = 0; y < height; ++y) {
          put(k, y, 0, y);
          if (ox + src_w + k < width) put(ox + src_w + k, y, src_w - 1, y);
        }
    }
  }
  return out;
}

GrayImage resize_picture(const GrayImage& image, int width, int height, ResizeMode mode) {
  if (image.width == width && image.height == height) return image;
  RgbImage rgb{image.width, image.height, std::vector<uint8_t>(image.pixels.size() * 3)};
  for (size_t i = 0; i < image.pixels.size(); ++i)
    rgb.pixels[i * 3] = rgb.pixels[i * 3 + 1] = rgb.pixels[i * 3 + 2] = image.pixels[i];
  const RgbImage resized = resize_picture(rgb, width, height, mode);
  GrayImage out{width, height, std::vector<uint8_t>(static_cast<size_t>(width) * height)};
  for (size_t i = 0; i < out.pixels.size(); ++i) out.pixels[i] = resized.pixels[i * 3];
  return out;
}

GrayImage to_gray(const RgbImage& image) {
  GrayImage out{image.width, image.height, {}};
  const size_t n = static_cast<size_t>(image.width) * image.height;
  out.pixels.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t r = image.pixels[i * 3], g = image.pixels[i * 3 + 1],
                   b = image.pixels[i * 3 + 2];
    out.pixels[i] = static_cast<uint8_t>((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16);
  }
  return out;
}

GrayImage resize_lanczos(const GrayImage& image, int width, int height) {
  // Pillow resamples each band alike: one channel of an RGB resize is the "L" resize.
  if (image.width == width && image.height == height) return image;
  return resize_picture(image, width, height, ResizeMode::kJustResize);
}

GrayImage gaussian_blur(const GrayImage& image, double sigma_x, double sigma_y) {
  return blur_axis(blur_axis(image, sigma_x, true), sigma_y, false);
}

bool masked_crop_region(const GrayImage& mask, int padding, int width, int height,
                        CropRegion* region) {
  int x1 = mask.width, y1 = mask.height, x2 = 0, y2 = 0;
  for (int y = 0; y < mask.height; ++y)
    for (int x = 0; x < mask.width; ++x)
      if (mask.pixels[static_cast<size_t>(y) * mask.width + x] > 0) {
        x1 = std::min(x1, x);
        y1 = std::min(y1, y);
        x2 = std::max(x2, x + 1);
        y2 = std::max(y2, y + 1);
      }
  if (x2 <= x1) return false;
  x1 = std::max(x1 - padding, 0);
  y1 = std::max(y1 - padding, 0);
  x2 = std::min(x2 + padding, mask.width);
  y2 = std::min(y2 + padding, mask.height);
  const double ratio = static_cast<double>(width) / height;
  if (static_cast<double>(x2 - x1) / (y2 - y1) > ratio)
    grow_to(y1, y2, (x2 - x1) / ratio, mask.height);
  else
    grow_to(x1, x2, (y2 - y1) * ratio, mask.width);
  *region = {x1, y1, x2, y2};
  return true;
}

RgbImage apply_overlay(const RgbImage& generated, const InpaintOverlay& o) {
  const RgbImage placed = fit(generated, o.w, o.h);
  RgbImage out = o.original;
  for (int y = 0; y < o.h; ++y)
    for (int x = 0; x < o.w; ++x) {
      const size_t i = static_cast<size_t>(y + o.y) * out.width + (x + o.x);
      const uint32_t a = o.alpha.pixels[i];
      for (int c = 0; c < 3; ++c) {
        const uint32_t g = placed.pixels[(static_cast<size_t>(y) * o.w + x) * 3 + c];
        out.pixels[i * 3 + c] =
            static_cast<uint8_t>((g * a + out.pixels[i * 3 + c] * (255 - a) + 127) / 255);
      }
    }
  return out;
}

PreparedInpaint prepare_inpaint(const RgbImage& image, GrayImage mask, int width, int height,
                                const InpaintOptions& options) {
  if (mask.width != image.width || mask.height != image.height)
    mask = resize_lanczos(mask, image.width, image.height);
  if (options.invert)
    for (auto& v : mask.pixels) v = static_cast<uint8_t>(255 - v);
  mask = gaussian_blur(mask, options.mask_blur_x, options.mask_blur_y);

  PreparedInpaint out;
  RgbImage picture;
  GrayImage work_mask;
  CropRegion region;
  if (options.only_masked && masked_crop_region(mask, options.padding, width, height, &region)) {
    // As A1111: the region already has the request's aspect, so "resize and fill" only fills
    // what integer rounding leaves.
    picture = fit(crop(image, region), width, height, ResizeMode::kResizeAndFill);
    work_mask = fit(crop(mask, region), width, height, ResizeMode::kResizeAndFill);
    out.overlay = std::make_shared<InpaintOverlay>(InpaintOverlay{
        image, mask, region.x1, region.y1, region.x2 - region.x1, region.y2 - region.y1});
  } else {
    // An empty mask has no region: the whole picture, as A1111 falls back to.
    picture = fit(image, width, height, options.resize_mode);
    work_mask = fit(mask, width, height, options.resize_mode);
    if (options.paste_back || options.only_masked) {
      // A1111 doubles the mask it pastes through here, so the hole's soft edge leans generated.
      GrayImage alpha = work_mask;
      for (auto& v : alpha.pixels) v = static_cast<uint8_t>(std::min(255, v * 2));
      out.overlay = std::make_shared<InpaintOverlay>(
          InpaintOverlay{picture, std::move(alpha), 0, 0, width, height});
    }
  }
  if (options.fill == MaskedContent::kFill) picture = fill_masked(picture, work_mask);
  out.image = std::make_shared<RgbImage>(std::move(picture));
  out.mask = std::make_shared<GrayImage>(std::move(work_mask));
  return out;
}

}  // namespace sdserve::pipeline
