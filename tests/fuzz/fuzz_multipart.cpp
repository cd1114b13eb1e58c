// multipart/form-data bodies of POST /v1/jobs and /v1/generate (server/multipart.h). The input is
// the Content-Type header value, a newline, then the body. As the router does it:
// multipart::form_body(), then job_request() on the JSON body it made. Documented: ApiError 400
// (invalid_multipart, validation_error). Anything else escaping, or a sanitizer report, is a
// finding. Properties of multipart::parse(): at most kMaxParts parts with distinct non-empty
// names, each part's data inside the body; the parts written out again (same boundary) parse to
// the same names, file names and data.
#include <cstdint>
#include <string>
#include <string_view>

#include "finding.h"
#include "server/api_json.h"
#include "server/multipart.h"

namespace multipart = sdserve::server::multipart;
using sdserve::server::ApiError;

namespace {

void check_refusal(const ApiError& e, const char* stage) {
  if (e.status != 400 || (e.type != "invalid_multipart" && e.type != "validation_error"))
    finding(std::string(stage) + ": unexpected ApiError " + std::to_string(e.status) + " " +
            e.type + ": " + e.what());
  sdserve::server::error_body(e.type, e.what(), e.field);
}

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

void check_parts(std::string_view content_type, std::string_view body) {
  std::string boundary;
  std::vector<multipart::Part> parts;
  try {
    boundary = multipart::boundary_of(content_type);
    parts = multipart::parse(body, boundary);
  } catch (const ApiError& e) {
    return check_refusal(e, "parse");
  }
  if (parts.size() > multipart::kMaxParts) finding("more parts than kMaxParts");
  std::string again;
  bool headers_fit = true;
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& p = parts[i];
    if (p.name.empty()) finding("a part without a name");
    for (size_t j = 0; j < i; ++j)
      if (parts[j].name == p.name) finding("two parts named " + p.name);
    if (p.data.data() < body.data() || p.data.data() + p.data.size() > body.data() + body.size())
      finding("a part's data outside the body");
    std::string headers = "Content-Disposition: form-data; name=" + quoted(p.name);
    if (p.is_file) headers += "; filename=" + quoted(p.filename);
    headers += "\r\n";
    if (!p.content_type.empty()) headers += "Content-Type: " + p.content_type + "\r\n";
    headers_fit = headers_fit && headers.size() <= multipart::kMaxPartHeaderBytes;
    again += "--" + boundary + "\r\n" + headers + "\r\n" + std::string(p.data) + "\r\n";
  }
  again += "--" + boundary + "--\r\n";
  if (!headers_fit) return;  // a name quoted anew may be longer than the limit
  try {
    const auto reparsed = multipart::parse(again, boundary);
    if (reparsed.size() != parts.size()) finding("written out again, the parts differ in number");
    for (size_t i = 0; i < parts.size(); ++i)
      if (reparsed[i].name != parts[i].name || reparsed[i].is_file != parts[i].is_file ||
          reparsed[i].filename != parts[i].filename || reparsed[i].data != parts[i].data)
        finding("written out again, part " + std::to_string(i + 1) + " differs");
  } catch (const ApiError& e) {
    finding(std::string("written out again, the form is refused: ") + e.what());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t newline = input.find('\n');
  const std::string_view content_type = input.substr(0, newline);
  const std::string_view body =
      newline == std::string_view::npos ? std::string_view() : input.substr(newline + 1);
  check_parts(content_type, body);
  sdserve::server::BodyJson doc;
  try {
    doc = multipart::form_body(content_type, body);
  } catch (const ApiError& e) {
    check_refusal(e, "form_body");
    return 0;
  }
  if (!doc.is_object()) finding("form_body gave something other than an object");
  try {
    sdserve::server::job_request(doc, sdserve::engine::RequestBounds{});
  } catch (const ApiError& e) {
    check_refusal(e, "job_request");
  }
  return 0;
}
