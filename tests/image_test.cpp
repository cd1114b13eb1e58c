#include "pipeline/image.h"

#include <gtest/gtest.h>

namespace sdserve::pipeline {
namespace {

RgbImage gradient(int w, int h) {
  RgbImage img{w, h, std::vector<uint8_t>(static_cast<size_t>(w) * h * 3)};
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* p = &img.pixels[(static_cast<size_t>(y) * w + x) * 3];
      p[0] = static_cast<uint8_t>(x * 255 / (w - 1));
      p[1] = static_cast<uint8_t>(y * 255 / (h - 1));
      p[2] = static_cast<uint8_t>((x + y) % 256);
    }
  return img;
}

TEST(Image, PngRoundTripKeepsPixelsAndText) {
  const auto img = gradient(37, 21);
  const std::string params = "a cat\nNegative prompt: dog\nSteps: 30, Sampler: Euler a";
  const auto png = encode_png(img, {{"parameters", params}});
  ASSERT_GT(png.size(), 8u);
  EXPECT_EQ(png[1], 'P');
  std::vector<std::pair<std::string, std::string>> text;
  const auto back = decode_png(png, &text);
  EXPECT_EQ(back.width, 37);
  EXPECT_EQ(back.height, 21);
  EXPECT_EQ(back.pixels, img.pixels);
  ASSERT_EQ(text.size(), 1u);
  EXPECT_EQ(text[0].first, "parameters");
  EXPECT_EQ(text[0].second, params);
}

TEST(Image, DecodeRejectsTruncatedPng) {
  auto png = encode_png(gradient(16, 16));
  png.resize(png.size() / 2);
  EXPECT_THROW(decode_png(png), std::runtime_error);
}

TEST(Image, JpegHasMarkers) {
  const auto jpg = encode_jpeg(gradient(64, 48), 75);
  ASSERT_GT(jpg.size(), 4u);
  EXPECT_EQ(jpg[0], 0xFF);
  EXPECT_EQ(jpg[1], 0xD8);
  EXPECT_EQ(jpg[jpg.size() - 2], 0xFF);
  EXPECT_EQ(jpg[jpg.size() - 1], 0xD9);
}

TEST(Image, ShrinkAveragesBoxes) {
  RgbImage img{4, 2, {}};
  for (int i = 0; i < 8; ++i)
    img.pixels.insert(img.pixels.end(), {static_cast<uint8_t>(i * 10), 0, 255});
  const auto small = shrink_to(img, 2);  // factor 2: two 2x2 boxes
  ASSERT_EQ(small.width, 2);
  ASSERT_EQ(small.height, 1);
  EXPECT_EQ(small.pixels[0], (0 + 10 + 40 + 50 + 2) / 4);
  EXPECT_EQ(small.pixels[3], (20 + 30 + 60 + 70 + 2) / 4);
  EXPECT_EQ(small.pixels[2], 255);
  EXPECT_EQ(shrink_to(img, 8).pixels, img.pixels);
}

TEST(Image, RejectsMismatchedBuffer) {
  RgbImage bad{4, 4, std::vector<uint8_t>(10)};
  EXPECT_THROW(encode_png(bad), std::invalid_argument);
}

}  // namespace
}  // namespace sdserve::pipeline
