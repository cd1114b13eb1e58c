// multipart/form-data request bodies (RFC 7578), as browsers' FormData and `curl -F` send them,
// for POST /v1/jobs and /v1/generate: each part sets the JSON field it is named after. Beast has
// no parser for them; this one is small and bounded (parts, header bytes) and linear in the body.
// No networking, so it is testable and fuzzable on its own.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "server/api_json.h"

namespace sdserve::server::multipart {

// A /v1 request has about 30 fields, each set once; more parts than this is not a request.
constexpr size_t kMaxParts = 64;
// One part's header block (Content-Disposition with a file name, Content-Type): browsers and
// curl send about 150 bytes.
constexpr size_t kMaxPartHeaderBytes = 4096;
// RFC 2046: a boundary is 1 to 70 characters.
constexpr size_t kMaxBoundary = 70;

struct Part {
  std::string name;          // Content-Disposition's name: the JSON field it sets
  bool is_file = false;      // a filename parameter was present (a file input, curl -F x=@f)
  std::string filename;      // as sent ("" for a file input left empty)
  std::string content_type;  // the part's Content-Type, "" when absent (not used: bytes decide)
  std::string_view data;     // the part's bytes, a view into the body
};

// Whether a Content-Type header value is multipart/form-data (parameters aside).
bool is_form(std::string_view content_type);

// The boundary parameter of a multipart/form-data Content-Type. Throws ApiError 400
// invalid_multipart when it is missing or not a valid boundary.
std::string boundary_of(std::string_view content_type);

// The parts of `body` in order. Throws ApiError 400 invalid_multipart, naming the problem (and
// the field, once a part's name is known): no delimiter line, an unterminated part, a part
// without a name, a field set twice, more than kMaxParts parts, a header block longer than
// kMaxPartHeaderBytes, a malformed header.
std::vector<Part> parse(std::string_view body, std::string_view boundary);

// The fields whose file parts carry an image's raw bytes (PNG, JPEG, WebP). Their text parts
// are base64 or a data: URL, as in a JSON body.
const std::vector<std::string>& image_fields();

// A multipart/form-data body as the JSON body job_request() reads, so that a form and the same
// request as JSON are one request: image files become base64 strings; text parts of string
// fields stay text; every other text part is read as JSON (12, 0.6, true, {"every": 2}), and
// text that is not JSON stays a string, for job_request() to refuse naming the field and the
// values it takes. Throws ApiError 400 (invalid_multipart or validation_error naming the field).
BodyJson form_body(std::string_view content_type, std::string_view body);

}  // namespace sdserve::server::multipart
