// Pictures in requests (image to image): base64 text or a data: URL, decoded under limits, and
// fitted to the request's size. Torch-free; the pipeline's decoders and resize do the pixels.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/image.h"
#include "pipeline/inpaint.h"

namespace sdserve::server {

// Base64 (standard or URL alphabet, padding and line breaks allowed); nullopt when it is not.
std::optional<std::vector<uint8_t>> unbase64(const std::string& text);

// `text` as a client sends a picture: base64, optionally as "data:image/png;base64,...". Throws
// ApiError 400 naming `field` for text that is not base64 or an image that cannot be decoded.
pipeline::RgbImage decode_request_image(const std::string& text, const std::string& field);

// The size a request without width/height gets from its init image: the image's own, rounded
// down to a multiple of 8 (diffusers' rule).
int default_side(int image_side);

// The init image at width x height: as it is when that is its size, else resized with Lanczos
// as diffusers' image processor does (A1111's resize_mode 0, "just resize"), or cropped or filled
// to keep its proportions (resize_mode 1 and 2: pipeline::resize_picture).
std::shared_ptr<const pipeline::RgbImage> fit_init_image(
    pipeline::RgbImage image, int width, int height,
    pipeline::ResizeMode mode = pipeline::ResizeMode::kJustResize);

}  // namespace sdserve::server
