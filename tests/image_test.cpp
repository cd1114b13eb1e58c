#include "pipeline/image.h"

#include <gtest/gtest.h>
#include <turbojpeg.h>

#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

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

// The chunk type that carries `key` ("tEXt", "iTXt"), read from the bytes.
std::string chunk_type_of(const std::vector<uint8_t>& png, const std::string& key) {
  for (size_t at = 8; at + 12 <= png.size();) {
    const size_t length = (size_t{png[at]} << 24) | (size_t{png[at + 1]} << 16) |
                          (size_t{png[at + 2]} << 8) | png[at + 3];
    const std::string type(png.begin() + at + 4, png.begin() + at + 8);
    const std::string data(png.begin() + at + 8, png.begin() + at + 8 + length);
    if (data.rfind(key + std::string(1, '\0'), 0) == 0) return type;
    at += 12 + length;
  }
  return "";
}

TEST(Image, TextOutsideLatin1GoesIntoUtf8Itxt) {
  const auto img = gradient(8, 8);
  const std::string utf8 = "caf\xc3\xa9 \xe6\x9d\xb1\xe4\xba\xac";  // "café 東京"
  const auto png = encode_png(img, {{"parameters", utf8}});
  EXPECT_EQ(chunk_type_of(png, "parameters"), "iTXt");
  std::vector<std::pair<std::string, std::string>> text;
  decode_png(png, &text);
  ASSERT_EQ(text.size(), 1u);
  EXPECT_EQ(text[0].second, utf8);
}

TEST(Image, Latin1TextStaysInTextChunkAsLatin1) {
  const auto img = gradient(8, 8);
  const std::string utf8 = "caf\xc3\xa9";  // "café": é is U+00E9, one Latin-1 byte
  const auto png = encode_png(img, {{"parameters", utf8}});
  EXPECT_EQ(chunk_type_of(png, "parameters"), "tEXt");
  const std::string raw(png.begin(), png.end());
  EXPECT_NE(raw.find("caf\xe9"), std::string::npos) << "tEXt holds Latin-1 bytes";
  std::vector<std::pair<std::string, std::string>> text;
  decode_png(png, &text);
  ASSERT_EQ(text.size(), 1u);
  EXPECT_EQ(text[0].second, utf8) << "read back as UTF-8";
}

TEST(Image, PngTextReadsChunksWithoutDecoding) {
  const auto img = gradient(8, 8);
  const std::string utf8 = "caf\xc3\xa9 \xe6\x9d\xb1\xe4\xba\xac";  // iTXt
  const std::string latin = "na\xc3\xafve";                         // tEXt (Latin-1 inside)
  const auto png = encode_png(img, {{"parameters", utf8}, {"Comment", latin}});
  EXPECT_EQ(read_png_text(png, "parameters"), utf8);
  EXPECT_EQ(read_png_text(png, "Comment"), latin);
  EXPECT_EQ(read_png_text(png, "param"), "");  // whole keywords only
  EXPECT_EQ(read_png_text(png, "absent"), "");
  // Any cut of the file, or garbage, reads as "no such text" (never past the end).
  for (size_t cut = 0; cut < png.size(); cut += 7) {
    const std::vector<uint8_t> head(png.begin(), png.begin() + static_cast<long>(cut));
    const auto got = read_png_text(head, "parameters");
    EXPECT_TRUE(got.empty() || got == utf8) << cut;
  }
  EXPECT_EQ(read_png_text(std::vector<uint8_t>(100, 0xff), "parameters"), "");
}

std::vector<uint8_t> decode_jpeg_rgb(const std::vector<uint8_t>& jpeg) {
  std::unique_ptr<void, int (*)(tjhandle)> tj(tjInitDecompress(), tjDestroy);
  int w = 0, h = 0, sub = 0, space = 0;
  auto* data = const_cast<unsigned char*>(jpeg.data());
  if (tjDecompressHeader3(tj.get(), data, jpeg.size(), &w, &h, &sub, &space) != 0) return {};
  std::vector<uint8_t> rgb(static_cast<size_t>(w) * h * 3);
  if (tjDecompress2(tj.get(), data, jpeg.size(), rgb.data(), w, 0, h, TJPF_RGB, 0) != 0) return {};
  return rgb;
}

// The Exif UserComment of a JPEG as written by encode_jpeg, read back from the bytes per the
// Exif layout (big-endian TIFF, IFD0 -> Exif IFD -> tag 0x9286), as UTF-8.
std::string exif_user_comment_of(const std::vector<uint8_t>& jpeg) {
  const std::string raw(jpeg.begin(), jpeg.end());
  const auto exif = raw.find(std::string("Exif\0\0", 6));
  if (exif == std::string::npos) return "<no Exif>";
  const uint8_t* t = jpeg.data() + exif + 6;
  auto u16 = [&](size_t o) { return static_cast<uint32_t>((t[o] << 8) | t[o + 1]); };
  auto u32 = [&](size_t o) { return (u16(o) << 16) | u16(o + 2); };
  if (t[0] != 'M' || u16(2) != 42) return "<not big-endian TIFF>";
  const size_t ifd0 = u32(4);
  if (u16(ifd0 + 2) != 0x8769) return "<no Exif IFD pointer>";
  const size_t exif_ifd = u32(ifd0 + 10);
  if (u16(exif_ifd + 2) != 0x9286 || u16(exif_ifd + 4) != 7) return "<no UserComment>";
  const size_t count = u32(exif_ifd + 6), at = u32(exif_ifd + 10);
  if (std::string(reinterpret_cast<const char*>(t + at), 8) != std::string("UNICODE\0", 8))
    return "<not UNICODE>";
  std::string out;
  for (size_t o = at + 8; o + 1 < at + count; o += 2) {
    uint32_t cp = u16(o);
    if (cp >= 0xD800 && cp < 0xDC00) {
      cp = 0x10000 + ((cp - 0xD800) << 10) + (u16(o + 2) - 0xDC00);
      o += 2;
    }
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return out;
}

TEST(Image, JpegCarriesParametersInExifUserComment) {
  const auto img = gradient(16, 16);
  // "café 東京 🦊": Latin-1, CJK and a character outside the BMP (a surrogate pair).
  const std::string text = "caf\xc3\xa9 \xe6\x9d\xb1\xe4\xba\xac \xf0\x9f\xa6\x8a\nSteps: 4";
  const auto jpeg = encode_jpeg(img, 90, text);
  ASSERT_GT(jpeg.size(), 4u);
  EXPECT_EQ(jpeg[0], 0xFF);
  EXPECT_EQ(jpeg[1], 0xD8);
  EXPECT_EQ(exif_user_comment_of(jpeg), text);
  EXPECT_EQ(exif_user_comment_of(encode_jpeg(img, 90)), "<no Exif>");
  // Still a valid JPEG that decodes to the same pixels as one without the comment.
  EXPECT_EQ(decode_jpeg_rgb(jpeg), decode_jpeg_rgb(encode_jpeg(img, 90)));
  EXPECT_EQ(decode_jpeg_rgb(jpeg).size(), 16u * 16 * 3);
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

// WebP init images (libwebp, when the build has it). Named namespace: unity builds batch files.
namespace webp_test {

std::vector<uint8_t> fixture(const std::string& name) {
  std::ifstream in(std::string(SDSERVE_FIXTURES) + "/" + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string error_of(const std::vector<uint8_t>& bytes, const ImageLimits& limits = {}) {
  try {
    decode_image(bytes, limits);
  } catch (const ImageError& e) {
    return e.what();
  }
  return "<decoded>";
}

// A still WebP's extended header (VP8X) declaring width x height, with no image after it.
std::vector<uint8_t> vp8x_declaring(uint32_t width, uint32_t height) {
  std::vector<uint8_t> b = {'R', 'I', 'F', 'F', 22, 0, 0, 0, 'W', 'E', 'B', 'P',
                            'V', 'P', '8', 'X', 10, 0, 0, 0, 0,   0,   0,   0};
  for (const uint32_t side : {width - 1, height - 1})
    for (int k = 0; k < 3; ++k) b.push_back(static_cast<uint8_t>(side >> (8 * k)));
  return b;
}

TEST(ImageWebp, LosslessDecodesToThePngsPixels) {
  const auto webp = fixture("img2img-init-96x64-lossless.webp");
  if (!webp_supported()) {
    EXPECT_NE(error_of(webp).find("built without libwebp"), std::string::npos) << error_of(webp);
    GTEST_SKIP() << "built without libwebp";
  }
  const RgbImage png = decode_image(fixture("img2img-init-96x64.png"));
  const RgbImage image = decode_image(webp);
  EXPECT_EQ(image.width, 96);
  EXPECT_EQ(image.height, 64);
  EXPECT_EQ(image.pixels, png.pixels);
}

TEST(ImageWebp, LossyDecodesAsPillowDoes) {
  if (!webp_supported()) GTEST_SKIP() << "built without libwebp";
  const RgbImage pillow = decode_image(fixture("img2img-init-96x64-lossy.png"));
  const RgbImage image = decode_image(fixture("img2img-init-96x64-lossy.webp"));
  ASSERT_EQ(image.width, 96);
  ASSERT_EQ(image.height, 64);
  EXPECT_EQ(image.pixels, pillow.pixels);
  // Lossy indeed: the pixels are not the original's.
  EXPECT_NE(image.pixels, decode_image(fixture("img2img-init-96x64.png")).pixels);
}

TEST(ImageWebp, DeclaredSizeIsCheckedBeforeDecoding) {
  if (!webp_supported()) GTEST_SKIP() << "built without libwebp";
  // VP8X's 24-bit sides can declare 60000x60000 (10.8 GB of RGB) in 30 bytes.
  const std::string bomb = error_of(vp8x_declaring(60000, 60000));
  EXPECT_NE(bomb.find("WebP image of 60000x60000 is over the limits"), std::string::npos) << bomb;
  // The fixture's own size against smaller limits: the pixel count, then a side.
  const auto webp = fixture("img2img-init-96x64-lossless.webp");
  EXPECT_NE(error_of(webp, ImageLimits{8192, 96 * 64 - 1}).find("over the limits"),
            std::string::npos);
  EXPECT_NE(error_of(webp, ImageLimits{95, 1 << 20}).find("over the limits"), std::string::npos);
  EXPECT_EQ(error_of(webp, ImageLimits{96, 96 * 64}), "<decoded>");
}

TEST(ImageWebp, AnimatedTruncatedAndCorruptAreRefused) {
  if (!webp_supported()) GTEST_SKIP() << "built without libwebp";
  const std::string animated = error_of(fixture("webp-animated-2-frames.webp"));
  EXPECT_NE(animated.find("animated WebP is not supported"), std::string::npos) << animated;
  auto webp = fixture("img2img-init-96x64-lossless.webp");
  for (const size_t keep : {size_t{12}, size_t{30}, webp.size() / 2, webp.size() - 1}) {
    const auto cut = std::vector<uint8_t>(webp.begin(), webp.begin() + keep);
    EXPECT_NE(error_of(cut).find("corrupt"), std::string::npos) << keep << ": " << error_of(cut);
  }
  for (size_t i = 40; i < webp.size(); i += 97) webp[i] ^= 0x5A;
  const std::string corrupt = error_of(webp);
  EXPECT_NE(corrupt.find("corrupt"), std::string::npos) << corrupt;
}

}  // namespace webp_test
}  // namespace sdserve::pipeline
