// multipart/form-data bodies (server/multipart.h) under ASan + UBSan: forms as curl and browsers
// send them give the same request as the JSON body, and every malformed form is a 400 that says
// what is wrong (and which field, once known), in time linear in the body.
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "server/api_json.h"
#include "server/multipart.h"

namespace sdserve::server {
namespace multipart_test {

const std::string kBoundary = "------------------------d74496d66958873e";  // as curl makes them
const std::string kContentType = "multipart/form-data; boundary=" + kBoundary;
const engine::RequestBounds kBounds{};

struct Field {
  Field(std::string name, std::string value, std::string filename = "")
      : name(std::move(name)), value(std::move(value)), filename(std::move(filename)) {}
  std::string name, value;
  std::string filename;  // a file part when non-empty
};

// A form as curl -F writes it (file parts carry a filename and a Content-Type).
std::string form(const std::vector<Field>& fields, const std::string& boundary = kBoundary) {
  std::string b;
  for (const auto& f : fields) {
    b += "--" + boundary + "\r\nContent-Disposition: form-data; name=\"" + f.name + "\"";
    if (!f.filename.empty())
      b += "; filename=\"" + f.filename + "\"\r\nContent-Type: application/octet-stream";
    b += "\r\n\r\n" + f.value + "\r\n";
  }
  return b + "--" + boundary + "--\r\n";
}

std::string fixture(const std::string& name) {
  std::ifstream in(std::string(SDSERVE_FIXTURES) + "/" + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The ApiError that reading the form (and then the request in it) throws; status 0 when none.
ApiError error_of(const std::string& body, const std::string& content_type = kContentType) {
  try {
    job_request(multipart::form_body(content_type, body), kBounds);
  } catch (const ApiError& e) {
    return e;
  }
  return ApiError(0, "accepted", "");
}

void expect_refused(const std::string& body, const std::string& type, const std::string& field,
                    const std::string& words, const std::string& content_type = kContentType) {
  const ApiError e = error_of(body, content_type);
  EXPECT_EQ(e.status, 400) << e.what();
  EXPECT_EQ(e.type, type) << e.what();
  EXPECT_EQ(e.field, field) << e.what();
  EXPECT_NE(std::string(e.what()).find(words), std::string::npos)
      << "'" << words << "' not in: " << e.what();
}

TEST(SanitizeMultipart, AFormIsTheSameRequestAsItsJson) {
  const std::string png = fixture("img2img-init-96x64.png");
  const auto from_form = job_request(
      multipart::form_body(kContentType, form({{"prompt", "12"},
                                               {"negative_prompt", "true"},
                                               {"steps", "12"},
                                               {"guidance_scale", " 6.5 "},
                                               {"sampler", "DPM++ 2M Karras"},
                                               {"seed", "18446744073709551615"},
                                               {"cancel_on_disconnect", "true"},
                                               {"preview", R"({"every": 2, "format": "png"})"},
                                               {"init_image", png, "in.png"},
                                               {"strength", "0.6"},
                                               {"width", "64"}})),
      kBounds);
  const auto from_json =
      parse_job_request(Json{{"prompt", "12"},
                             {"negative_prompt", "true"},
                             {"steps", 12},
                             {"guidance_scale", 6.5},
                             {"sampler", "DPM++ 2M Karras"},
                             {"seed", 18446744073709551615ull},
                             {"cancel_on_disconnect", true},
                             {"preview", {{"every", 2}, {"format", "png"}}},
                             {"init_image", base64(std::vector<uint8_t>(png.begin(), png.end()))},
                             {"strength", 0.6},
                             {"width", 64}}
                            .dump(),
                        kBounds);
  EXPECT_EQ(request_json(from_form), request_json(from_json));
  EXPECT_EQ(from_form.prompt, "12");  // a string field's text stays text
  EXPECT_EQ(from_form.steps, 12);
  EXPECT_EQ(from_form.width, 64);
  EXPECT_EQ(from_form.height, 64);  // from the image
  ASSERT_TRUE(from_form.init_image && from_json.init_image);
  EXPECT_EQ(from_form.init_image->pixels, from_json.init_image->pixels);
}

TEST(SanitizeMultipart, ReadsPartsAsBrowsersAndCurlWriteThem) {
  // Binary data holding CR, LF, "--" and the boundary without its line start; a preamble, an
  // epilogue, transport padding after a delimiter, header names in any case, a quoted boundary.
  const std::string data = std::string("\x89PNG\r\n\x1a\n\0\r\n--", 14) + kBoundary + "x\r\n\r\n";
  const std::string body = "preamble\r\n--" + kBoundary + " \t\r\n" +
                           "content-disposition: Form-Data; filename=\"a \\\"b\\\".png\"; "
                           "NAME=init_image\r\nCONTENT-TYPE: image/png\r\n\r\n" +
                           data + "\r\n--" + kBoundary +
                           "\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n"
                           "a cat\r\n--" +
                           kBoundary + "--epilogue";
  const auto parts = multipart::parse(body, kBoundary);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].name, "init_image");
  EXPECT_TRUE(parts[0].is_file);
  EXPECT_EQ(parts[0].filename, "a \"b\".png");
  EXPECT_EQ(parts[0].content_type, "image/png");
  EXPECT_EQ(parts[0].data, data);
  EXPECT_EQ(parts[1].name, "prompt");
  EXPECT_FALSE(parts[1].is_file);
  EXPECT_EQ(parts[1].data, "a cat");
  EXPECT_EQ(
      multipart::boundary_of("Multipart/Form-Data ; charset=utf-8; boundary=\"" + kBoundary + "\""),
      kBoundary);
  EXPECT_TRUE(multipart::is_form(" multipart/form-data;boundary=x"));
  EXPECT_FALSE(multipart::is_form("application/json"));
  EXPECT_FALSE(multipart::is_form("multipart/mixed; boundary=x"));
  // Empty values, and a form of no parts at all (refused for want of a prompt).
  const auto empty = multipart::parse(form({{"negative_prompt", ""}}), kBoundary);
  ASSERT_EQ(empty.size(), 1u);
  EXPECT_EQ(empty[0].data, "");
  expect_refused("--" + kBoundary + "--", "validation_error", "prompt", "prompt is required");
}

TEST(SanitizeMultipart, TextIsConvertedToTheFieldsTypeOrRefusedNamingIt) {
  // Text that is not the field's type is refused by the field's own rule, quoting the text.
  expect_refused(form({{"prompt", "x"}, {"steps", "twelve"}}), "validation_error", "steps",
                 "steps must be an integer between 1 and 150 (got \"twelve\")");
  expect_refused(form({{"prompt", "x"}, {"steps", "12.5"}}), "validation_error", "steps",
                 "(got 12.5)");
  expect_refused(form({{"prompt", "x"}, {"guidance_scale", ""}}), "validation_error",
                 "guidance_scale", "guidance_scale must be");
  expect_refused(form({{"prompt", "x"}, {"cancel_on_disconnect", "yes"}}), "validation_error",
                 "cancel_on_disconnect", "must be true or false");
  expect_refused(form({{"prompt", "x"}, {"preview", "{\"every\": "}}), "validation_error",
                 "preview", "preview must be an object");
  expect_refused(form({{"prompt", "x"}, {"seed", "1e400"}}), "validation_error", "seed",
                 "seed must be an integer");
  expect_refused(form({{"prompt", "x"}, {"stesp", "12"}}), "validation_error", "stesp",
                 "unknown field");
  expect_refused(form({{"prompt", "caf\xc3"}}), "validation_error", "prompt", "not valid UTF-8");
  expect_refused(form({{"prompt", "x"}, {"sampler", "\xed\xa0\x80"}}), "validation_error",
                 "sampler", "not valid UTF-8");  // a surrogate
  // A string field keeps JSON-looking text as it is.
  const auto r = job_request(
      multipart::form_body(kContentType, form({{"prompt", "{\"a\": 1}"}, {"seed", "-1"}})),
      kBounds);
  EXPECT_EQ(r.prompt, "{\"a\": 1}");
  // A file for a text field gives its text (curl -F prompt=@prompt.txt).
  EXPECT_EQ(
      job_request(multipart::form_body(kContentType, form({{"prompt", "a cat", "p.txt"}})), kBounds)
          .prompt,
      "a cat");
}

TEST(SanitizeMultipart, ImageFilesAreDecodedAsTheJsonsBase64) {
  const std::string png = fixture("img2img-init-64x64.png");
  // init_image and mask are the image fields; mask is refused by job_request() until it knows it.
  EXPECT_EQ(multipart::image_fields(), (std::vector<std::string>{"init_image", "mask"}));
  const BodyJson doc =
      multipart::form_body(kContentType, form({{"prompt", "x"}, {"mask", png, "m.png"}}));
  EXPECT_EQ(doc["mask"], base64(std::vector<uint8_t>(png.begin(), png.end())));
  // A text part for an image field is base64 or a data: URL, as in JSON.
  const auto text = job_request(
      multipart::form_body(
          kContentType,
          form({{"prompt", "x"},
                {"init_image", "data:image/png;base64," + base64({png.begin(), png.end()})}})),
      kBounds);
  ASSERT_TRUE(text.init_image);
  EXPECT_EQ(text.init_image->width, 64);
  expect_refused(form({{"prompt", "x"}, {"init_image", "GIF89a", "a.gif"}}), "validation_error",
                 "init_image", "not a PNG");
  expect_refused(form({{"prompt", "x"}, {"init_image", png.substr(0, 200), "cut.png"}}),
                 "validation_error", "init_image", "corrupt");
  expect_refused(form({{"prompt", "x"}, {"init_image", "", "empty.png"}}), "validation_error",
                 "init_image", "the file \"empty.png\" is empty");
  // A file input left empty (no file name, no bytes): as if absent, as browsers mean it.
  std::string empty_input = form({{"prompt", "x"}});
  empty_input.insert(empty_input.rfind("--" + kBoundary + "--"),
                     "--" + kBoundary +
                         "\r\nContent-Disposition: form-data; name=\"init_image\"; filename=\"\""
                         "\r\nContent-Type: application/octet-stream\r\n\r\n\r\n");
  const BodyJson none = multipart::form_body(kContentType, empty_input);
  EXPECT_FALSE(none.contains("init_image")) << none.dump();
  EXPECT_FALSE(job_request(none, kBounds).init_image);
  // An empty text part is text, refused as "" would be in JSON.
  expect_refused(form({{"prompt", "x"}, {"init_image", ""}}), "validation_error", "init_image",
                 "base64");
}

TEST(SanitizeMultipart, MalformedFormsAre400SayingWhatIsWrong) {
  const std::string ok = form({{"prompt", "x"}, {"steps", "4"}});
  ASSERT_EQ(error_of(ok).status, 0) << error_of(ok).what();
  const auto refused = [](const std::string& body, const std::string& field,
                          const std::string& words,
                          const std::string& content_type = kContentType) {
    expect_refused(body, "invalid_multipart", field, words, content_type);
  };
  refused(ok, "", "no boundary parameter", "multipart/form-data");
  refused(ok, "", "no boundary parameter", "multipart/form-data; charset=utf-8");
  refused(ok, "", "boundary must be 1 to 70", "multipart/form-data; boundary=");
  refused(ok, "", "boundary must be 1 to 70",
          "multipart/form-data; boundary=" + std::string(71, 'a'));
  refused(ok, "", "boundary must be 1 to 70", "multipart/form-data; boundary=\"a\rb\"");
  refused(ok, "", "two boundary", kContentType + "; boundary=x");
  refused(ok, "", "not closed", "multipart/form-data; boundary=\"abc");
  // The boundary is not the body's, or the lines end with LF only.
  refused(ok, "", "no line '--other' starts a part", "multipart/form-data; boundary=other");
  std::string lf = ok;
  for (size_t at; (at = lf.find("\r\n")) != std::string::npos;) lf.erase(at, 1);
  refused(lf, "", "must end with CRLF");
  refused("{\"prompt\": \"x\"}", "", "starts a part");
  // Unterminated: the last part has no delimiter after it, or the closing line is missing.
  refused(ok.substr(0, ok.rfind("\r\n--")), "steps", "part \"steps\" is not terminated");
  refused(ok.substr(0, ok.size() - 4), "", "ends without its closing line");
  refused(ok.substr(0, ok.find("\r\n\r\n") + 2), "", "headers do not end with an empty line");
  // Parts: without a name, with an empty name, without Content-Disposition, of another kind.
  refused("--" + kBoundary + "\r\nContent-Disposition: form-data\r\n\r\nx\r\n--" + kBoundary + "--",
          "", "part 1 has no name");
  refused(form({{"prompt", "x"}, {"", "y"}}), "", "part 2 has no name");
  refused("--" + kBoundary + "\r\nContent-Type: text/plain\r\n\r\nx\r\n--" + kBoundary + "--", "",
          "part 1 has no name");
  refused("--" + kBoundary + "\r\n\r\nx\r\n--" + kBoundary + "--", "", "part 1 has no name");
  refused("--" + kBoundary + "\r\nContent-Disposition: attachment; name=\"a\"\r\n\r\nx\r\n--" +
              kBoundary + "--",
          "", "must be form-data");
  refused("--" + kBoundary + "\r\nContent-Disposition: form-data; name=\"a\"; name=\"b\"\r\n\r\n" +
              "x\r\n--" + kBoundary + "--",
          "a", "names the part twice");
  refused("--" + kBoundary + "\r\nContent-Disposition: form-data; name\r\n\r\nx\r\n--" + kBoundary +
              "--",
          "", "parameter name has no value");
  refused("--" + kBoundary + "\r\nContent-Disposition: form-data; name=\"x\r\n\r\nx\r\n--" +
              kBoundary + "--",
          "", "is not closed");
  refused("--" + kBoundary + "\r\nbroken header\r\n\r\nx\r\n--" + kBoundary + "--", "",
          "not 'Name: value'");
  refused("--" + kBoundary + "\r\nContent-Disposition: form-data;\r\n name=\"a\"\r\n\r\nx\r\n--" +
              kBoundary + "--",
          "", "folded header lines");
  refused("--" + kBoundary +
              "\r\nContent-Disposition: form-data; name=\"prompt\"\r\n"
              "Content-Transfer-Encoding: base64\r\n\r\neA==\r\n--" +
              kBoundary + "--",
          "prompt", "Content-Transfer-Encoding \"base64\" is not supported");
  // A field set twice, even by equal values.
  refused(form({{"prompt", "x"}, {"steps", "4"}, {"steps", "4"}}), "steps", "sets \"steps\" twice");
  // The boundary inside a part's data, not at a line of its own.
  refused(form({{"prompt", "x\r\n--" + kBoundary + "oops"}}), "", "must end with CRLF");
}

TEST(SanitizeMultipart, PartsAndHeadersAreBounded) {
  std::vector<Field> fields = {{"prompt", "x"}};
  for (size_t i = 1; i < multipart::kMaxParts; ++i)
    fields.push_back({"f" + std::to_string(i), "1"});
  // 64 parts are parsed (then refused by job_request for the unknown fields); 65 are not.
  EXPECT_EQ(multipart::parse(form(fields), kBoundary).size(), multipart::kMaxParts);
  fields.push_back({"one_more", "1"});
  expect_refused(form(fields), "invalid_multipart", "", "more than 64 parts");
  // A header block of exactly 4096 bytes is read; one byte more is refused.
  const std::string head = "Content-Disposition: form-data; name=\"prompt\"\r\nX-Pad: ";
  const auto with_headers = [&](size_t block) {
    return "--" + kBoundary + "\r\n" + head + std::string(block - head.size() - 2, 'p') +
           "\r\n\r\na cat\r\n--" + kBoundary + "--";
  };
  EXPECT_EQ(error_of(with_headers(multipart::kMaxPartHeaderBytes)).status, 0);
  expect_refused(with_headers(multipart::kMaxPartHeaderBytes + 1), "invalid_multipart", "",
                 "headers are longer than 4096 bytes");
  // A header block that never ends, as long as the body.
  expect_refused("--" + kBoundary + "\r\n" + head + std::string(1 << 20, 'p'), "invalid_multipart",
                 "", "headers are longer than 4096 bytes");
}

TEST(SanitizeMultipart, HostileBodiesTakeLinearTime) {
  // 16 MiB of near-delimiters: each is CR LF "--" and the boundary but for its last character.
  const std::string near = "\r\n--" + kBoundary.substr(0, kBoundary.size() - 1) + "x";
  std::string data;
  while (data.size() < (16u << 20)) data += near;
  const std::string one_part = form({{"prompt", "x"}, {"negative_prompt", data}});
  const std::string many_crs =
      form({{"prompt", "x"}, {"negative_prompt", std::string(16u << 20, '\r')}});
  for (const std::string* body : {&one_part, &many_crs}) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto parts = multipart::parse(*body, kBoundary);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(parts.size(), 2u);
    EXPECT_LT(s, 2.0) << "16 MiB took " << s << " s";  // ~0.05 s under ASan; quadratic is hours
  }
}

TEST(SanitizeMultipart, RandomlyDamagedFormsParseOrAre400) {
  const std::string png = fixture("img2img-init-64x64.png");
  const std::string good = form({{"prompt", "a cat"},
                                 {"steps", "4"},
                                 {"preview", "{\"every\": 1}"},
                                 {"init_image", png.substr(0, 600), "x.png"}});
  const std::vector<std::string> pieces = {
      "\r\n", "--", "\"", ";", "\r\n\r\n", "--" + kBoundary, "\r\n--" + kBoundary, "name=", "\\"};
  std::mt19937 rng(7);
  int accepted = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string body = good;
    for (int k = 0, n = 1 + static_cast<int>(rng() % 4); k < n; ++k) {
      const size_t at = rng() % (body.size() + 1);
      switch (rng() % 4) {
        case 0:
          if (at < body.size()) body[at] = static_cast<char>(rng());
          break;
        case 1:
          body.insert(at, pieces[rng() % pieces.size()]);
          break;
        case 2:
          body.erase(at, rng() % 8);
          break;
        default:
          body.resize(at);
      }
    }
    const ApiError e = error_of(body);
    if (e.status == 0) {
      ++accepted;
      continue;
    }
    ASSERT_EQ(e.status, 400) << e.what();
    ASSERT_TRUE(e.type == "invalid_multipart" || e.type == "validation_error") << e.type;
    // What the client receives parses as JSON.
    EXPECT_TRUE(nlohmann::json::accept(error_body(e.type, e.what(), e.field)));
  }
  EXPECT_GT(accepted, 0);  // some damage (in the prompt, say) leaves a valid form
}

}  // namespace multipart_test
}  // namespace sdserve::server
