// Inpainting's pixel work, torch-free: masks, A1111's preparation of the picture and mask (blur,
// invert, "only masked" crop, masked-content fill) and its paste back. The denoising itself
// (diffusers' masked latent blend, or a 9-channel inpainting UNet) is in pipeline.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "pipeline/image.h"

namespace sdserve::pipeline {

struct GrayImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;  // row-major, width * height bytes
};

// Luma as Pillow's convert("L") computes it: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
GrayImage to_gray(const RgbImage& image);
// Lanczos resize, value for value as Pillow resizes an "L" image (resize_lanczos on one channel).
GrayImage resize_lanczos(const GrayImage& image, int width, int height);

// How a picture of another size becomes the request's (A1111's resize_mode).
enum class ResizeMode {
  kJustResize = 0,     // stretched to the size (diffusers' only way)
  kCropAndResize = 1,  // scaled to cover the size, centred, the overflow cut off
  kResizeAndFill = 2,  // scaled to fit inside, centred, the bars filled with its edge rows/columns
};
// Lanczos throughout (resize_lanczos); A1111's arithmetic for the scaled size and offsets.
RgbImage resize_picture(const RgbImage& image, int width, int height, ResizeMode mode);
GrayImage resize_picture(const GrayImage& image, int width, int height, ResizeMode mode);

// What the masked area starts from (A1111's inpainting_fill).
enum class MaskedContent {
  kFill = 0,           // the picture's colours blurred into the hole (pixel space)
  kOriginal = 1,       // the picture as it is (diffusers)
  kLatentNoise = 2,    // random latents in the hole
  kLatentNothing = 3,  // zero latents in the hole
};

// A1111's inpainting options. The native API's defaults are diffusers' (no blur, original
// content, whole picture, no paste back); the A1111 route sets A1111's.
struct InpaintOptions {
  int mask_blur_x = 0;  // Gaussian sigma in pixels, as A1111 (OpenCV's kernel of 2*int(2.5s+0.5)+1)
  int mask_blur_y = 0;
  bool invert = false;  // repaint where the mask is black
  MaskedContent fill = MaskedContent::kOriginal;
  // Only the masked area: its bounding box grown by `padding` px and to the request's aspect,
  // cropped from the picture, inpainted at the request's size and pasted back.
  bool only_masked = false;
  int padding = 32;
  // Paste the result over the picture through the blurred mask (A1111 always does; diffusers
  // does not). only_masked implies it.
  bool paste_back = false;
  ResizeMode resize_mode = ResizeMode::kJustResize;  // picture and mask to width x height
};

// Where decode() puts the generated picture: resized to w x h at (x, y) in `original`, and blended
// in through `alpha` (the original's size; 255 = generated, 0 = original), as A1111's
// apply_overlay.
struct InpaintOverlay {
  RgbImage original;
  GrayImage alpha;
  int x = 0, y = 0, w = 0, h = 0;
};
RgbImage apply_overlay(const RgbImage& generated, const InpaintOverlay& overlay);

// The picture and mask as the pipeline takes them (both width x height), and the paste back.
struct PreparedInpaint {
  std::shared_ptr<const RgbImage> image;
  std::shared_ptr<const GrayImage> mask;
  std::shared_ptr<const InpaintOverlay> overlay;  // null: the result is the image
};
// `mask` is resized to the picture's size first when it differs (A1111). Without only_masked the
// picture and mask are fitted to width x height by options.resize_mode when they differ.
PreparedInpaint prepare_inpaint(const RgbImage& image, GrayImage mask, int width, int height,
                                const InpaintOptions& options);

// Separable Gaussian blur as OpenCV's GaussianBlur with reflected borders (BORDER_REFLECT_101);
// sigma 0 leaves that axis alone.
GrayImage gaussian_blur(const GrayImage& image, double sigma_x, double sigma_y);

// The bounding box of the pixels > 0, grown by `padding` and then to width:height within the
// picture, as A1111's get_crop_region + expand_crop_region; false when the mask is empty.
struct CropRegion {
  int x1 = 0, y1 = 0, x2 = 0, y2 = 0;  // [x1, x2) x [y1, y2)
};
bool masked_crop_region(const GrayImage& mask, int padding, int width, int height,
                        CropRegion* region);

}  // namespace sdserve::pipeline
