// Forms (multipart/form-data) and WebP init images over the real service: a form is the same
// job as its JSON body (pixel for pixel), the real curl's -F works, malformed forms are 400s that
// say what is wrong; a WebP init image gives a PNG's pixels; the body limit fits 2048 px images.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "harness.h"
#include "pipeline/image.h"

namespace sdserve::itest {
namespace multipart_itest {

const std::string kBoundary = "----sdserveFormBoundary7MA4YWxkTrZu0gW";
const Headers kFormHeaders = {{"Content-Type", "multipart/form-data; boundary=" + kBoundary}};

std::string fixture_text(const std::string& name) {
  std::ifstream in(std::string(SDSERVE_FIXTURES) + "/" + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string base64_text(const std::string& in) {
  static const char* digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  const auto byte = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(in[k])); };
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = (byte(i) << 16) | (byte(i + 1) << 8) | byte(i + 2);
    for (int s = 18; s >= 0; s -= 6) out += digits[(v >> s) & 63];
  }
  if (i < in.size()) {
    const uint32_t v = (byte(i) << 16) | (i + 1 < in.size() ? byte(i + 1) << 8 : 0);
    out += digits[v >> 18];
    out += digits[(v >> 12) & 63];
    out += i + 1 < in.size() ? digits[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

struct Part {
  Part(std::string name, std::string value, std::string filename = "")
      : name(std::move(name)), value(std::move(value)), filename(std::move(filename)) {}
  std::string name, value;
  std::string filename;  // a file part when non-empty
};

// A form as browsers write it (file parts with a filename and the file's Content-Type).
std::string form(const std::vector<Part>& parts) {
  std::string b;
  for (const auto& p : parts) {
    b += "--" + kBoundary + "\r\nContent-Disposition: form-data; name=\"" + p.name + "\"";
    if (!p.filename.empty()) b += "; filename=\"" + p.filename + "\"\r\nContent-Type: image/png";
    b += "\r\n\r\n" + p.value + "\r\n";
  }
  return b + "--" + kBoundary + "--\r\n";
}

// The img2img request of img2img_test.cpp: 8 steps at strength 0.5, size from the 96x64 image.
std::vector<Part> img2img_parts(const std::string& image_file, const std::string& image_bytes) {
  return {{"prompt", "a photo of a cat"},
          {"steps", "8"},
          {"seed", "5"},
          {"guidance_scale", "7.5"},
          {"strength", "0.5"},
          {"sampler", "euler"},
          {"init_image", image_bytes, image_file}};
}

json img2img_json(const std::string& image_bytes) {
  return {{"prompt", "a photo of a cat"},
          {"steps", 8},
          {"seed", 5},
          {"guidance_scale", 7.5},
          {"strength", 0.5},
          {"sampler", "euler"},
          {"init_image", base64_text(image_bytes)}};
}

pipeline::RgbImage png_pixels(const HttpResult& r) {
  EXPECT_EQ(r.status, 200) << r.body.substr(0, 300);
  EXPECT_EQ(r.header("content-type"), "image/png");
  return pipeline::decode_png(std::vector<uint8_t>(r.body.begin(), r.body.end()));
}

std::string field_of(const HttpResult& r) {
  const json j = r.body_json();
  return j.contains("error") && j["error"]["field"].is_string()
             ? j["error"]["field"].get<std::string>()
             : "";
}

std::string find_program(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  for (size_t start = 0; start <= dirs.size();) {
    const size_t end = std::min(dirs.find(':', start), dirs.size());
    const std::string candidate = dirs.substr(start, end - start) + "/" + name;
    if (end > start && access(candidate.c_str(), X_OK) == 0) return candidate;
    start = end + 1;
  }
  return "";
}

TEST(MultipartTest, AFormGivesTheSamePixelsAsItsJson) {
  ServerProcess server;
  const int port = server.port();
  const std::string png = fixture_text("img2img-init-96x64.png");
  const auto from_json = png_pixels(post(port, "/v1/generate", img2img_json(png)));
  EXPECT_EQ(from_json.width, 96);
  EXPECT_EQ(from_json.height, 64);
  const auto from_form = png_pixels(
      http(port, verb::post, "/v1/generate", form(img2img_parts("cat.png", png)), kFormHeaders));
  EXPECT_EQ(from_form.pixels, from_json.pixels);

  // POST /v1/jobs takes the form too: 202, the request as the JSON one's, the same image.
  const auto accepted =
      http(port, verb::post, "/v1/jobs", form(img2img_parts("cat.png", png)), kFormHeaders);
  ASSERT_EQ(accepted.status, 202) << accepted.body;
  const json job = accepted.body_json();
  EXPECT_EQ(job["request"]["init_image"], (json{{"width", 96}, {"height", 64}}));
  EXPECT_EQ(job["request"]["strength"], 0.5);
  EXPECT_EQ(job["request"]["steps"], 8);
  const std::string id = job["id"];
  ASSERT_EQ(wait_final(port, id), "succeeded");
  const auto image = get(port, "/v1/jobs/" + id + "/images/0");
  EXPECT_EQ(png_pixels(image).pixels, from_json.pixels);

  // The init image matters: the same form with another picture differs.
  auto other = img2img_parts("other.png", fixture_text("img2img-init-64x64.png"));
  other.push_back({"width", "96"});
  other.push_back({"height", "64"});
  const auto different =
      png_pixels(http(port, verb::post, "/v1/generate", form(other), kFormHeaders));
  EXPECT_NE(different.pixels, from_json.pixels);
}

TEST(MultipartTest, CurlFormUploadWorks) {
  const std::string curl = find_program("curl");
  if (curl.empty()) GTEST_SKIP() << "curl is not installed";
  ServerProcess server;
  const int port = server.port();
  const std::string init = std::string(SDSERVE_FIXTURES) + "/img2img-init-96x64.png";
  const auto expected =
      png_pixels(post(port, "/v1/generate", img2img_json(fixture_text("img2img-init-96x64.png"))));
  const auto dir = std::filesystem::temp_directory_path() /
                   ("sdserve-curl-" + std::to_string(getpid()) + "-" + std::to_string(port));
  std::filesystem::create_directories(dir);
  const std::string out = (dir / "out.png").string();
  const auto [code, output] =
      run_program({curl,
                   "-sS",
                   "--max-time",
                   "60",
                   "-o",
                   out,
                   "-w",
                   "%{http_code}",
                   "-F",
                   "prompt=a photo of a cat",
                   "-F",
                   "steps=8",
                   "-F",
                   "seed=5",
                   "-F",
                   "guidance_scale=7.5",
                   "-F",
                   "sampler=euler",
                   "-F",
                   "init_image=@" + init,
                   "-F",
                   "strength=0.5",
                   "http://127.0.0.1:" + std::to_string(port) + "/v1/generate"},
                  {}, seconds(90));
  ASSERT_EQ(code, 0) << output;
  EXPECT_EQ(output, "200");
  std::ifstream in(out, std::ios::binary);
  const std::vector<uint8_t> bytes{std::istreambuf_iterator<char>(in),
                                   std::istreambuf_iterator<char>()};
  std::filesystem::remove_all(dir);
  ASSERT_FALSE(bytes.empty());
  EXPECT_EQ(pipeline::decode_png(bytes).pixels, expected.pixels);
}

TEST(MultipartTest, MalformedFormsAre400NamingTheProblem) {
  ServerProcess server;
  const int port = server.port();
  const std::string png = fixture_text("img2img-init-64x64.png");
  struct Case {
    std::string what, body, content_type, type, field, words;
  };
  const std::string ct = "multipart/form-data; boundary=" + kBoundary;
  const std::string ok = form({{"prompt", "x"}, {"steps", "4"}});
  std::vector<Part> many = {{"prompt", "x"}};
  for (int i = 0; i < 70; ++i) many.push_back({"f" + std::to_string(i), "1"});
  const std::string long_header = "--" + kBoundary +
                                  "\r\nContent-Disposition: form-data; name=\"prompt\"\r\n"
                                  "X-Pad: " +
                                  std::string(5000, 'p') + "\r\n\r\nx\r\n--" + kBoundary + "--";
  const std::vector<Case> cases = {
      {"no boundary", ok, "multipart/form-data", "invalid_multipart", "", "no boundary parameter"},
      {"another boundary", ok, "multipart/form-data; boundary=nope", "invalid_multipart", "",
       "no line '--nope' starts a part"},
      {"unterminated part", ok.substr(0, ok.rfind("\r\n--")), ct, "invalid_multipart", "steps",
       "\"steps\" is not terminated"},
      {"no closing line", ok.substr(0, ok.size() - 4), ct, "invalid_multipart", "",
       "ends without its closing line"},
      {"duplicate field", form({{"prompt", "x"}, {"steps", "4"}, {"steps", "5"}}), ct,
       "invalid_multipart", "steps", "sets \"steps\" twice"},
      {"part without a name",
       "--" + kBoundary + "\r\nContent-Disposition: form-data\r\n\r\nx\r\n--" + kBoundary + "--",
       ct, "invalid_multipart", "", "part 1 has no name"},
      {"too many parts", form(many), ct, "invalid_multipart", "", "more than 64 parts"},
      {"header too long", long_header, ct, "invalid_multipart", "",
       "headers are longer than 4096 bytes"},
      {"LF line ends",
       "--" + kBoundary + "\nContent-Disposition: form-data; name=\"prompt\"\n\nx\n--" + kBoundary +
           "--\n",
       ct, "invalid_multipart", "", "must end with CRLF"},
      {"a number that is not", form({{"prompt", "x"}, {"steps", "twelve"}}), ct, "validation_error",
       "steps", "steps must be an integer between 1 and 150 (got \"twelve\")"},
      {"a boolean that is not", form({{"prompt", "x"}, {"cancel_on_disconnect", "yes"}}), ct,
       "validation_error", "cancel_on_disconnect", "must be true or false"},
      {"an unknown field", form({{"prompt", "x"}, {"stpes", "4"}}), ct, "validation_error", "stpes",
       "unknown field"},
      {"not an image", form({{"prompt", "x"}, {"init_image", "GIF89a....", "a.gif"}}), ct,
       "validation_error", "init_image", "not a PNG"},
      {"an empty file", form({{"prompt", "x"}, {"init_image", "", "a.png"}}), ct,
       "validation_error", "init_image", "is empty"},
      {"a truncated image", form({{"prompt", "x"}, {"init_image", png.substr(0, 300), "a.png"}}),
       ct, "validation_error", "init_image", "corrupt"},
      {"invalid UTF-8", form({{"prompt", "caf\xc3"}}), ct, "validation_error", "prompt",
       "not valid UTF-8"},
  };
  for (const auto& c : cases) {
    for (const std::string route : {"/v1/jobs", "/v1/generate"}) {
      const auto r = http(port, verb::post, route, c.body, {{"Content-Type", c.content_type}});
      ASSERT_EQ(r.status, 400) << c.what << " on " << route << ": " << r.error << r.body;
      const json e = r.body_json()["error"];
      EXPECT_EQ(e["type"], c.type) << c.what << ": " << r.body;
      EXPECT_EQ(field_of(r), c.field) << c.what << ": " << r.body;
      EXPECT_NE(e["message"].get<std::string>().find(c.words), std::string::npos)
          << c.what << ": " << r.body;
    }
  }
  // JSON-only routes say so.
  const auto a1111 = http(port, verb::post, "/sdapi/v1/txt2img", ok, {{"Content-Type", ct}});
  EXPECT_EQ(a1111.status, 415) << a1111.body;
  EXPECT_EQ(a1111.body_json()["error"]["type"], "unsupported_media_type");
  // Refusals count as invalid jobs; the server is fine afterwards and still takes a good form.
  EXPECT_EQ(metric(port, "sdserve_jobs_rejected_total{reason=\"invalid\"}"), 2.0 * cases.size());
  EXPECT_EQ(http(port, verb::post, "/v1/jobs", ok, {{"Content-Type", ct}}).status, 202);
  EXPECT_EQ(get(port, "/healthz").status, 200);
}

TEST(MultipartTest, WebpInitImageGivesThePngsPixels) {
  ServerProcess server;
  const int port = server.port();
  const std::string png = fixture_text("img2img-init-96x64.png");
  const std::string webp = fixture_text("img2img-init-96x64-lossless.webp");
  if (!pipeline::webp_supported()) {
    const auto r = post(port, "/v1/jobs", img2img_json(webp));
    EXPECT_EQ(r.status, 400);
    EXPECT_NE(r.body.find("built without libwebp"), std::string::npos) << r.body;
    GTEST_SKIP() << "built without libwebp";
  }
  const auto from_png = png_pixels(post(port, "/v1/generate", img2img_json(png)));
  json as_data_url = img2img_json(webp);
  as_data_url["init_image"] = "data:image/webp;base64," + base64_text(webp);
  EXPECT_EQ(png_pixels(post(port, "/v1/generate", as_data_url)).pixels, from_png.pixels);
  EXPECT_EQ(png_pixels(http(port, verb::post, "/v1/generate", form(img2img_parts("cat.webp", webp)),
                            kFormHeaders))
                .pixels,
            from_png.pixels);
  // A lossy one runs too (its pixels are not the PNG's, so neither is the image).
  const auto lossy = png_pixels(
      post(port, "/v1/generate", img2img_json(fixture_text("img2img-init-96x64-lossy.webp"))));
  EXPECT_EQ(lossy.width, 96);
  EXPECT_NE(lossy.pixels, from_png.pixels);

  // Refused naming init_image: a header declaring 60000x60000 (before any pixel is decoded),
  // an animated file, a truncated one.
  std::string bomb = std::string("RIFF\x16\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0", 24);
  for (int side = 0; side < 2; ++side)
    for (int k = 0; k < 3; ++k) bomb += static_cast<char>((59999 >> (8 * k)) & 0xFF);
  const std::vector<std::pair<std::string, std::string>> refused = {
      {bomb, "WebP image of 60000x60000 is over the limits"},
      {fixture_text("webp-animated-2-frames.webp"), "animated WebP is not supported"},
      {webp.substr(0, webp.size() / 2), "corrupt"}};
  for (const auto& [bytes, words] : refused) {
    const auto r = http(port, verb::post, "/v1/jobs",
                        form({{"prompt", "x"}, {"init_image", bytes, "x.webp"}}), kFormHeaders);
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_EQ(field_of(r), "init_image") << r.body;
    EXPECT_NE(r.body.find(words), std::string::npos) << r.body;
  }
  EXPECT_EQ(get(port, "/healthz").status, 200);
}

// 2048x2048 RGB noise: a PNG that hardly compresses (about 12.6 MB).
std::string noise_png(uint32_t seed) {
  pipeline::RgbImage noise{2048, 2048, std::vector<uint8_t>(2048u * 2048u * 3u)};
  std::mt19937 rng(seed);
  for (auto& v : noise.pixels) v = static_cast<uint8_t>(rng());
  const auto png = pipeline::encode_png(noise);
  return std::string(png.begin(), png.end());
}

TEST(MultipartTest, DefaultBodyLimitFits2048PixelImageAndMask) {
  ServerProcess server;
  const int port = server.port();
  const std::string image = noise_png(1), mask = noise_png(2);
  ASSERT_GT(image.size(), 12u << 20);  // noise indeed
  json body = {{"prompt", "x"},
               {"steps", 2},
               {"width", 64},
               {"height", 64},
               {"init_image", base64_text(image)},
               {"strength", 1.0}};
  // The image alone, resized to 64x64: a job that runs.
  const auto alone = post(port, "/v1/jobs", body);
  ASSERT_EQ(alone.status, 202) << alone.body.substr(0, 300);
  EXPECT_EQ(alone.body_json()["request"]["init_image"], (json{{"width", 64}, {"height", 64}}));
  EXPECT_EQ(wait_final(port, alone.body_json()["id"].get<std::string>()), "succeeded");
  // With a mask of the same size the body (33.6 MB) is read whole: an inpainting job.
  body["mask"] = base64_text(mask);
  const auto with_mask = post(port, "/v1/jobs", body);
  EXPECT_GT(body.dump().size(), 32u << 20);
  EXPECT_EQ(with_mask.status, 202) << with_mask.body.substr(0, 300);
  EXPECT_NE(with_mask.status, 0) << with_mask.error;
  // The same as a form, images as files.
  const auto as_form = http(port, verb::post, "/v1/jobs",
                            form({{"prompt", "x"},
                                  {"steps", "2"},
                                  {"width", "64"},
                                  {"height", "64"},
                                  {"init_image", image, "noise.png"},
                                  {"mask", mask, "mask.png"}}),
                            kFormHeaders);
  EXPECT_EQ(as_form.status, 202) << as_form.body.substr(0, 300);
  EXPECT_NE(as_form.status, 0) << as_form.error;
}

}  // namespace multipart_itest
}  // namespace sdserve::itest
