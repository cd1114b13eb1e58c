#include "pipeline/image.h"

#include <png.h>
#include <turbojpeg.h>
#ifdef SDSERVE_WITH_WEBP
#include <webp/decode.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>

namespace sdserve::pipeline {
namespace {

void png_write_to_vector(png_structp png, png_bytep data, png_size_t length) {
  auto* out = static_cast<std::vector<uint8_t>*>(png_get_io_ptr(png));
  out->insert(out->end(), data, data + length);
}

void png_flush_noop(png_structp) {}

// libpng reports errors by longjmp by default; throwing from its error callback is the usual C++
// alternative and keeps the stack unwinding through our RAII owners.
[[noreturn]] void png_throw(png_structp, png_const_charp message) {
  throw std::runtime_error(std::string("PNG: ") + message);
}
void png_warn(png_structp, png_const_charp) {}

struct PngReadCursor {
  const std::vector<uint8_t>* bytes;
  size_t offset;
};

void png_read_from_vector(png_structp png, png_bytep data, png_size_t length) {
  auto* cur = static_cast<PngReadCursor*>(png_get_io_ptr(png));
  if (cur->offset + length > cur->bytes->size()) png_error(png, "truncated PNG data");
  std::memcpy(data, cur->bytes->data() + cur->offset, length);
  cur->offset += length;
}

void check_image(const RgbImage& image) {
  if (image.width <= 0 || image.height <= 0 ||
      image.pixels.size() != static_cast<size_t>(image.width) * image.height * 3)
    throw std::invalid_argument("image buffer does not match its size");
}

// UTF-8 whose code points all fit in Latin-1, converted; false for anything else (including
// invalid UTF-8, which then goes out unchanged in iTXt).
bool utf8_to_latin1(const std::string& in, std::string* out) {
  out->clear();
  for (size_t i = 0; i < in.size(); ++i) {
    const auto c = static_cast<unsigned char>(in[i]);
    if (c < 0x80) {
      *out += static_cast<char>(c);
    } else if ((c == 0xC2 || c == 0xC3) && i + 1 < in.size() &&
               (static_cast<unsigned char>(in[i + 1]) & 0xC0) == 0x80) {
      *out += static_cast<char>(((c & 0x03) << 6) | (static_cast<unsigned char>(in[++i]) & 0x3F));
    } else {
      return false;
    }
  }
  return true;
}

std::string latin1_to_utf8(const std::string& in) {
  std::string out;
  for (const unsigned char c : in) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else {
      out += static_cast<char>(0xC0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  return out;
}

// UTF-8 as UTF-16 code units (invalid bytes become U+FFFD).
std::vector<uint16_t> utf8_to_utf16(const std::string& in) {
  std::vector<uint16_t> out;
  for (size_t i = 0; i < in.size();) {
    const auto c = static_cast<unsigned char>(in[i]);
    const int extra = c < 0x80         ? 0
                      : (c >> 5) == 6  ? 1
                      : (c >> 4) == 14 ? 2
                      : (c >> 3) == 30 ? 3
                                       : -1;
    uint32_t cp = extra == 0 ? c : extra == 1 ? c & 0x1F : extra == 2 ? c & 0x0F : c & 0x07;
    bool ok = extra >= 0;
    for (int k = 1; ok && k <= extra; ++k) {
      if (i + k >= in.size() || (static_cast<unsigned char>(in[i + k]) & 0xC0) != 0x80) {
        ok = false;
      } else {
        cp = (cp << 6) | (static_cast<unsigned char>(in[i + k]) & 0x3F);
      }
    }
    if (!ok || cp > 0x10FFFF) {
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    i += static_cast<size_t>(extra) + 1;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      out.push_back(static_cast<uint16_t>(0xD800 | (cp >> 10)));
      out.push_back(static_cast<uint16_t>(0xDC00 | (cp & 0x3FF)));
    } else {
      out.push_back(static_cast<uint16_t>(cp));
    }
  }
  return out;
}

// An APP1 Exif segment holding one tag, UserComment, as A1111 writes it for JPEGs (piexif's
// "unicode" encoding: the 8-byte charset code "UNICODE\0", then UTF-16 big-endian). Big-endian
// TIFF ("MM"); IFD0 holds only the pointer to the Exif IFD.
std::vector<uint8_t> exif_user_comment(const std::string& text) {
  std::vector<uint8_t> tiff;
  auto u16 = [&](uint32_t v) {
    tiff.push_back(static_cast<uint8_t>(v >> 8));
    tiff.push_back(static_cast<uint8_t>(v));
  };
  auto u32 = [&](uint32_t v) {
    u16(v >> 16);
    u16(v & 0xFFFF);
  };
  auto units = utf8_to_utf16(text);
  constexpr size_t kMaxUnits = (65535 - 2 - 6 - 44 - 8) / 2;  // one APP1 segment
  if (units.size() > kMaxUnits) units.resize(kMaxUnits);
  const uint32_t count = static_cast<uint32_t>(8 + units.size() * 2);
  tiff.insert(tiff.end(), {'M', 'M'});
  u16(42);
  u32(8);                                    // IFD0
  u16(1);                                    // one entry:
  u16(0x8769), u16(4), u32(1), u32(26);      // ExifIFDPointer, LONG -> the Exif IFD at 26
  u32(0);                                    // no IFD1
  u16(1);                                    // Exif IFD, one entry:
  u16(0x9286), u16(7), u32(count), u32(44);  // UserComment, UNDEFINED, its bytes at 44
  u32(0);
  const char code[8] = {'U', 'N', 'I', 'C', 'O', 'D', 'E', '\0'};
  tiff.insert(tiff.end(), code, code + 8);
  for (const uint16_t u : units) u16(u);
  std::vector<uint8_t> seg = {0xFF, 0xE1};
  const size_t length = 2 + 6 + tiff.size();
  seg.push_back(static_cast<uint8_t>(length >> 8));
  seg.push_back(static_cast<uint8_t>(length));
  const char header[6] = {'E', 'x', 'i', 'f', '\0', '\0'};
  seg.insert(seg.end(), header, header + 6);
  seg.insert(seg.end(), tiff.begin(), tiff.end());
  return seg;
}

// Pillow's resampling (its Resample.c), for resize_lanczos().
constexpr int kWeightBits = 32 - 8 - 2;

double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= M_PI;
  return std::sin(x) / x;
}

double lanczos3(double x) {
  return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3.0) : 0.0;
}

// The input pixels output pixel i reads along one axis, and their fixed-point weights.
struct Taps {
  int first = 0;
  std::vector<int32_t> weights;
};

std::vector<Taps> lanczos_taps(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filter_scale = std::max(scale, 1.0);  // widen the filter when shrinking
  const double support = 3.0 * filter_scale;
  std::vector<Taps> taps(static_cast<size_t>(out_size));
  for (int i = 0; i < out_size; ++i) {
    const double center = (i + 0.5) * scale;
    // Truncation as C's (int) cast, then clamped to the image.
    const int lo = std::max(static_cast<int>(center - support + 0.5), 0);
    const int hi = std::min(static_cast<int>(center + support + 0.5), in_size);
    std::vector<double> w;
    double sum = 0;
    for (int x = lo; x < hi; ++x) {
      w.push_back(lanczos3((x - center + 0.5) / filter_scale));
      sum += w.back();
    }
    taps[i].first = lo;
    for (double v : w) {
      if (sum != 0.0) v /= sum;
      const double fixed = v * (1 << kWeightBits);
      taps[i].weights.push_back(static_cast<int32_t>(v < 0 ? fixed - 0.5 : fixed + 0.5));
    }
  }
  return taps;
}

uint8_t clip8(int32_t acc) {
  return static_cast<uint8_t>(std::clamp(acc >> kWeightBits, 0, 255));
}

// One pass: along x when `horizontal`, else along y; out is out_w x out_h.
RgbImage resample_pass(const RgbImage& in, int out_w, int out_h, bool horizontal) {
  const auto taps = lanczos_taps(horizontal ? in.width : in.height, horizontal ? out_w : out_h);
  RgbImage out;
  out.width = out_w;
  out.height = out_h;
  out.pixels.resize(static_cast<size_t>(out_w) * out_h * 3);
  const auto at = [&](int x, int y, int c) {
    return static_cast<int32_t>(in.pixels[(static_cast<size_t>(y) * in.width + x) * 3 + c]);
  };
  for (int y = 0; y < out_h; ++y)
    for (int x = 0; x < out_w; ++x) {
      const Taps& t = taps[horizontal ? x : y];
      for (int c = 0; c < 3; ++c) {
        int32_t acc = 1 << (kWeightBits - 1);
        for (size_t k = 0; k < t.weights.size(); ++k) {
          const int src = t.first + static_cast<int>(k);
          acc += (horizontal ? at(src, y, c) : at(x, src, c)) * t.weights[k];
        }
        out.pixels[(static_cast<size_t>(y) * out_w + x) * 3 + c] = clip8(acc);
      }
    }
  return out;
}

}  // namespace

std::vector<uint8_t> encode_png(const RgbImage& image,
                                const std::vector<std::pair<std::string, std::string>>& text) {
  check_image(image);
  std::vector<uint8_t> out;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, png_throw, png_warn);
  if (png == nullptr) throw std::runtime_error("PNG: cannot create writer");
  png_infop info = png_create_info_struct(png);
  struct Guard {
    png_structp* p;
    png_infop* i;
    ~Guard() { png_destroy_write_struct(p, i); }
  } guard{&png, &info};
  png_set_write_fn(png, &out, png_write_to_vector, png_flush_noop);
  png_set_IHDR(png, info, image.width, image.height, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  // Level 1 is ~5x faster than the default for ~10% larger files: encoding runs per image.
  png_set_compression_level(png, 1);
  // tEXt is Latin-1 by the PNG spec: text that fits it goes there (converted from UTF-8, as
  // A1111 does), anything else into an uncompressed iTXt chunk, which is UTF-8. Readers (PIL,
  // A1111's PNG Info, civitai) then show the prompt as written.
  // Neither chunk can hold a NUL (libpng measures the text with strlen, so one in a prompt cut
  // the rest of the parameters off): each becomes U+FFFD, and the text goes into iTXt.
  std::vector<png_text> chunks(text.size());
  std::vector<std::string> latin1(text.size()), values(text.size());
  static char empty[] = "";
  for (size_t i = 0; i < text.size(); ++i) {
    chunks[i] = {};
    chunks[i].key = const_cast<char*>(text[i].first.c_str());
    for (const char c : text[i].second) {
      if (c == '\0')
        values[i] += "\xEF\xBF\xBD";
      else
        values[i] += c;
    }
    if (utf8_to_latin1(values[i], &latin1[i])) {
      chunks[i].compression = PNG_TEXT_COMPRESSION_NONE;
      chunks[i].text = const_cast<char*>(latin1[i].c_str());
      chunks[i].text_length = latin1[i].size();
    } else {
      chunks[i].compression = PNG_ITXT_COMPRESSION_NONE;
      chunks[i].text = const_cast<char*>(values[i].c_str());
      chunks[i].itxt_length = values[i].size();
      chunks[i].lang = empty;
      chunks[i].lang_key = empty;
    }
  }
  if (!chunks.empty()) png_set_text(png, info, chunks.data(), static_cast<int>(chunks.size()));
  png_write_info(png, info);
  for (int y = 0; y < image.height; ++y)
    png_write_row(
        png, const_cast<png_bytep>(image.pixels.data() + static_cast<size_t>(y) * image.width * 3));
  png_write_end(png, nullptr);
  return out;
}

namespace {

void check_declared_size(const char* format, uint64_t width, uint64_t height,
                         const ImageLimits& limits) {
  const auto side = static_cast<uint64_t>(limits.max_side);
  if (width == 0 || height == 0 || width > side || height > side ||
      width * height > static_cast<uint64_t>(limits.max_pixels))
    throw ImageError(std::string(format) + " image of " + std::to_string(width) + "x" +
                     std::to_string(height) + " is over the limits (each side at most " +
                     std::to_string(limits.max_side) + ", at most " +
                     std::to_string(limits.max_pixels) + " pixels)");
}

// The one PNG reader. `limits` (clients' images) bounds the declared size before any pixel is
// decoded, and libpng's own allocations; `to_end` also reads the chunks after the pixels (and
// checks them), where `text` receives the text chunks.
RgbImage read_png(const std::vector<uint8_t>& bytes, const ImageLimits* limits, bool to_end,
                  std::vector<std::pair<std::string, std::string>>* text) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, nullptr, png_throw, png_warn);
  if (png == nullptr) throw std::runtime_error("PNG: cannot create reader");
  png_infop info = png_create_info_struct(png);
  struct Guard {
    png_structp* p;
    png_infop* i;
    ~Guard() { png_destroy_read_struct(p, i, nullptr); }
  } guard{&png, &info};
  PngReadCursor cursor{&bytes, 0};
  png_set_read_fn(png, &cursor, png_read_from_vector);
  if (limits != nullptr) {
    png_set_user_limits(png, static_cast<png_uint_32>(limits->max_side),
                        static_cast<png_uint_32>(limits->max_side));
    png_set_chunk_malloc_max(png, 8 << 20);
  }
  png_read_info(png, info);
  if (limits != nullptr)
    check_declared_size("PNG", png_get_image_width(png, info), png_get_image_height(png, info),
                        *limits);
  png_set_expand(png);
  png_set_strip_16(png);
  png_set_strip_alpha(png);
  png_set_gray_to_rgb(png);
  const int passes = png_set_interlace_handling(png);
  png_read_update_info(png, info);
  RgbImage image;
  image.width = static_cast<int>(png_get_image_width(png, info));
  image.height = static_cast<int>(png_get_image_height(png, info));
  if (png_get_rowbytes(png, info) != static_cast<size_t>(image.width) * 3)
    throw ImageError("PNG: unexpected row layout");
  image.pixels.resize(static_cast<size_t>(image.width) * image.height * 3);
  for (int pass = 0; pass < passes; ++pass)
    for (int y = 0; y < image.height; ++y)
      png_read_row(png, image.pixels.data() + static_cast<size_t>(y) * image.width * 3, nullptr);
  if (!to_end) return image;
  png_read_end(png, info);
  if (text != nullptr) {
    png_textp chunks = nullptr;
    int n = png_get_text(png, info, &chunks, nullptr);
    for (int i = 0; i < n; ++i) {
      const auto& t = chunks[i];
      const bool itxt =
          t.compression == PNG_ITXT_COMPRESSION_NONE || t.compression == PNG_ITXT_COMPRESSION_zTXt;
      std::string value(t.text, itxt ? t.itxt_length : t.text_length);
      text->emplace_back(t.key, itxt ? value : latin1_to_utf8(value));
    }
  }
  return image;
}

}  // namespace

RgbImage decode_png(const std::vector<uint8_t>& bytes,
                    std::vector<std::pair<std::string, std::string>>* text) {
  return read_png(bytes, nullptr, /*to_end=*/true, text);
}

namespace {

RgbImage decode_jpeg_checked(const std::vector<uint8_t>& bytes, const ImageLimits& limits) {
  tjhandle handle = tjInitDecompress();
  if (handle == nullptr) throw std::runtime_error("JPEG: cannot create decoder");
  struct Guard {
    tjhandle h;
    ~Guard() { tjDestroy(h); }
  } guard{handle};
  int width = 0, height = 0, subsampling = 0, colorspace = 0;
  if (tjDecompressHeader3(handle, bytes.data(), static_cast<unsigned long>(bytes.size()), &width,
                          &height, &subsampling, &colorspace) != 0)
    throw ImageError(std::string("JPEG: ") + tjGetErrorStr2(handle));
  check_declared_size("JPEG", static_cast<uint64_t>(width), static_cast<uint64_t>(height), limits);
  RgbImage image;
  image.width = width;
  image.height = height;
  image.pixels.resize(static_cast<size_t>(width) * height * 3);
  // Accurate DCT: the pixels libjpeg's default gives (what PIL decodes), not the fast path's.
  if (tjDecompress2(handle, bytes.data(), static_cast<unsigned long>(bytes.size()),
                    image.pixels.data(), width, 0, height, TJPF_RGB, TJFLAG_ACCURATEDCT) != 0 &&
      tjGetErrorCode(handle) == TJERR_FATAL)
    throw ImageError(std::string("JPEG: ") + tjGetErrorStr2(handle));
  return image;
}

#ifdef SDSERVE_WITH_WEBP
// Lossy and lossless WebP through libwebp, alpha dropped (as PIL's convert("RGB")). The size
// comes from the headers (VP8X's canvas may declare up to 16777216 per side) and is checked
// before anything is decoded. Animated files are refused: which frame was meant is a guess.
RgbImage decode_webp_checked(const std::vector<uint8_t>& bytes, const ImageLimits& limits) {
  WebPBitstreamFeatures features;
  const VP8StatusCode status = WebPGetFeatures(bytes.data(), bytes.size(), &features);
  if (status == VP8_STATUS_NOT_ENOUGH_DATA)
    throw ImageError("the image is corrupt: WebP: truncated");
  if (status != VP8_STATUS_OK)
    throw ImageError("the image is corrupt: WebP: unreadable headers (libwebp status " +
                     std::to_string(static_cast<int>(status)) + ")");
  check_declared_size("WebP", static_cast<uint64_t>(std::max(features.width, 0)),
                      static_cast<uint64_t>(std::max(features.height, 0)), limits);
  if (features.has_animation)
    throw ImageError("animated WebP is not supported: send one frame (a still WebP, PNG or JPEG)");
  RgbImage image;
  image.width = features.width;
  image.height = features.height;
  image.pixels.resize(static_cast<size_t>(image.width) * image.height * 3);
  if (WebPDecodeRGBInto(bytes.data(), bytes.size(), image.pixels.data(), image.pixels.size(),
                        image.width * 3) == nullptr)
    throw ImageError("the image is corrupt: WebP: the pixels cannot be decoded");
  return image;
}
#endif

}  // namespace

bool webp_supported() {
#ifdef SDSERVE_WITH_WEBP
  return true;
#else
  return false;
#endif
}

RgbImage decode_image(const std::vector<uint8_t>& bytes, const ImageLimits& limits) {
  const auto starts = [&](const char* magic, size_t at = 0) {
    const size_t n = std::strlen(magic);
    return bytes.size() >= at + n && std::memcmp(bytes.data() + at, magic, n) == 0;
  };
  const bool webp = starts("RIFF") && starts("WEBP", 8);
  try {
    if (starts("\x89PNG\r\n\x1a\n")) return read_png(bytes, &limits, /*to_end=*/false, nullptr);
    if (starts("\xff\xd8\xff")) return decode_jpeg_checked(bytes, limits);
#ifdef SDSERVE_WITH_WEBP
    if (webp) return decode_webp_checked(bytes, limits);
#endif
  } catch (const ImageError&) {
    throw;
  } catch (const std::exception& e) {
    throw ImageError(std::string("the image is corrupt: ") + e.what());
  }
  if (webp)
    throw ImageError(
        "WebP is not supported by this build (built without libwebp): send PNG or JPEG");
  throw ImageError(webp_supported() ? "not a PNG, JPEG or WebP image" : "not a PNG or JPEG image");
}

std::string read_png_text(const std::vector<uint8_t>& png, const std::string& key) {
  // Walks the chunk headers only (no libpng: nothing is decoded), so any bytes are safe.
  const auto be32 = [](const uint8_t* p) {
    return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
  };
  size_t at = 8;  // after the signature
  while (at + 12 <= png.size()) {
    const uint32_t length = be32(&png[at]);
    if (length > png.size() - at - 12) break;
    const std::string type(reinterpret_cast<const char*>(&png[at + 4]), 4);
    const std::string data(reinterpret_cast<const char*>(&png[at + 8]), length);
    at += 12 + length;
    const auto nul = data.find('\0');
    if (nul == std::string::npos || data.compare(0, nul, key) != 0 || nul != key.size()) continue;
    if (type == "tEXt") return latin1_to_utf8(data.substr(nul + 1));
    if (type == "iTXt" && data.size() > nul + 2 && data[nul + 1] == 0) {
      // compression flag 0, method, language tag\0, translated keyword\0, text
      const auto lang_end = data.find('\0', nul + 3);
      if (lang_end == std::string::npos) continue;
      const auto translated_end = data.find('\0', lang_end + 1);
      if (translated_end == std::string::npos) continue;
      return data.substr(translated_end + 1);
    }
  }
  return "";
}

std::vector<uint8_t> encode_jpeg(const RgbImage& image, int quality,
                                 const std::string& user_comment) {
  check_image(image);
  std::unique_ptr<void, int (*)(tjhandle)> tj(tjInitCompress(), tjDestroy);
  if (!tj) throw std::runtime_error("JPEG: cannot create compressor");
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  if (tjCompress2(tj.get(), image.pixels.data(), image.width, 0, image.height, TJPF_RGB, &buf,
                  &size, TJSAMP_420, std::clamp(quality, 1, 100), TJFLAG_FASTDCT) != 0) {
    tjFree(buf);
    throw std::runtime_error(std::string("JPEG: ") + tjGetErrorStr2(tj.get()));
  }
  std::vector<uint8_t> out(buf, buf + size);
  tjFree(buf);
  if (user_comment.empty()) return out;
  // The Exif segment goes right after SOI and JFIF's APP0, where readers look for it.
  size_t at = 2;
  if (out.size() > 4 && out[2] == 0xFF && out[3] == 0xE0) at = 4 + ((out[4] << 8) | out[5]);
  const auto exif = exif_user_comment(user_comment);
  out.insert(out.begin() + static_cast<std::ptrdiff_t>(at), exif.begin(), exif.end());
  return out;
}

RgbImage resize_lanczos(const RgbImage& image, int width, int height) {
  if (width < 1 || height < 1 || image.width < 1 || image.height < 1)
    throw std::invalid_argument("resize_lanczos: empty image or size");
  RgbImage out = image;
  if (width != out.width) out = resample_pass(out, width, out.height, true);
  if (height != out.height) out = resample_pass(out, out.width, height, false);
  return out;
}

RgbImage shrink_to(const RgbImage& image, int max_side) {
  const int longest = std::max(image.width, image.height);
  if (max_side <= 0 || longest <= max_side) return image;
  const int factor = (longest + max_side - 1) / max_side;
  RgbImage out;
  out.width = std::max(1, image.width / factor);
  out.height = std::max(1, image.height / factor);
  out.pixels.resize(static_cast<size_t>(out.width) * out.height * 3);
  // Box average; a side shorter than `factor` (a very wide or tall image) keeps one row or column
  // whose box is clipped to the image.
  for (int y = 0; y < out.height; ++y) {
    const int y1 = std::min(image.height, (y + 1) * factor);
    for (int x = 0; x < out.width; ++x) {
      const int x1 = std::min(image.width, (x + 1) * factor);
      const int count = (y1 - y * factor) * (x1 - x * factor);
      for (int c = 0; c < 3; ++c) {
        int sum = 0;
        for (int sy = y * factor; sy < y1; ++sy)
          for (int sx = x * factor; sx < x1; ++sx)
            sum += image.pixels[(static_cast<size_t>(sy) * image.width + sx) * 3 + c];
        out.pixels[(static_cast<size_t>(y) * out.width + x) * 3 + c] =
            static_cast<uint8_t>((sum + count / 2) / count);
      }
    }
  }
  return out;
}

}  // namespace sdserve::pipeline
