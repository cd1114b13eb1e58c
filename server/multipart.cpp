#include "server/multipart.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <set>

#include "config/safe_json.h"

namespace sdserve::server::multipart {
namespace {

[[noreturn]] void malformed(const std::string& message, const std::string& field = "") {
  // A field name from the client goes into the error's `field` bounded, as api_json does.
  throw ApiError(400, "invalid_multipart", "multipart/form-data: " + message,
                 field.size() <= 64 ? field : field.substr(0, 64));
}

// A client's field name in a message: bounded, printable, quoted.
std::string quoted_name(const std::string& name) {
  return safe_json::describe(BodyJson(name), 40);
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// RFC 7230's token characters (parameter names).
bool is_tchar(unsigned char c) {
  return std::isalnum(c) ||
         std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) != std::string_view::npos;
}

// RFC 2046's boundary characters. None is CR, which keeps every search for a delimiter linear.
bool is_bchar(unsigned char c) {
  return std::isalnum(c) ||
         std::string_view("'()+_,-./:=? ").find(static_cast<char>(c)) != std::string_view::npos;
}

struct Param {
  std::string key;  // lower case
  std::string value;
};

// The `; key=value` parameters after a header's first value (RFC 7231): values are quoted
// strings (backslash escapes) or run to the next ';' (clients leave characters such as '/' or
// '=' of a boundary unquoted).
std::vector<Param> parameters(std::string_view s, const std::string& header) {
  std::vector<Param> out;
  size_t i = 0;
  const auto skip_space = [&] {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
  };
  for (;;) {
    skip_space();
    if (i == s.size()) return out;
    if (s[i] != ';') malformed(header + ": parameters must be separated by ';'");
    ++i;
    skip_space();
    if (i == s.size()) return out;  // a trailing ';'
    const size_t key_start = i;
    while (i < s.size() && is_tchar(static_cast<unsigned char>(s[i]))) ++i;
    if (i == key_start) malformed(header + ": a parameter has no name");
    Param p{lower(s.substr(key_start, i - key_start)), ""};
    skip_space();
    if (i == s.size() || s[i] != '=') malformed(header + ": parameter " + p.key + " has no value");
    ++i;
    skip_space();
    if (i < s.size() && s[i] == '"') {
      for (++i;; ++i) {
        if (i == s.size()) malformed(header + ": the quoted value of " + p.key + " is not closed");
        if (s[i] == '"') break;
        if (s[i] == '\\' && i + 1 < s.size()) ++i;
        p.value += s[i];
      }
      ++i;
    } else {
      const size_t end = std::min(s.find(';', i), s.size());
      p.value = std::string(trim(s.substr(i, end - i)));
      i = end;
    }
    out.push_back(std::move(p));
  }
}

std::string_view media_type(std::string_view content_type) {
  return trim(content_type.substr(0, content_type.find(';')));
}

std::string part_label(size_t index, const std::string& name) {
  return name.empty() ? "part " + std::to_string(index) : "part " + quoted_name(name);
}

// A part's header block (`headers`: its lines, each ending with CRLF) into `part`.
void read_headers(std::string_view headers, size_t index, Part& part) {
  bool disposition = false;
  while (!headers.empty()) {
    const size_t eol = headers.find("\r\n");  // present: the block ends with CRLF
    const std::string_view line = headers.substr(0, eol);
    headers.remove_prefix(eol + 2);
    const std::string label = part_label(index, part.name);
    if (line.empty() || line.front() == ' ' || line.front() == '\t')
      malformed(label + ": folded header lines are not supported", part.name);
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0)
      malformed(label + ": a header line is not 'Name: value'", part.name);
    const std::string header = lower(trim(line.substr(0, colon)));
    const std::string_view value = trim(line.substr(colon + 1));
    if (header == "content-disposition") {
      if (disposition) malformed(label + ": two Content-Disposition headers", part.name);
      disposition = true;
      const std::string type = lower(media_type(value));
      if (type != "form-data")
        malformed(label + ": Content-Disposition must be form-data, not " +
                      quoted_name(std::string(type)),
                  part.name);
      const size_t semi = value.find(';');
      bool named = false;
      for (auto& p : parameters(semi == std::string_view::npos ? "" : value.substr(semi),
                                label + "'s Content-Disposition")) {
        if (p.key == "name") {
          if (named) malformed(label + ": Content-Disposition names the part twice", part.name);
          named = true;
          part.name = std::move(p.value);
        } else if (p.key == "filename" || p.key == "filename*") {
          part.is_file = true;
          part.filename = std::move(p.value);
        }
      }
    } else if (header == "content-type") {
      part.content_type = std::string(value);
    } else if (header == "content-transfer-encoding") {
      // RFC 7578 deprecates it; clients send the bytes as they are.
      const std::string encoding = lower(value);
      if (encoding != "binary" && encoding != "8bit" && encoding != "7bit")
        malformed(label + ": Content-Transfer-Encoding " + quoted_name(encoding) +
                      " is not supported; send the bytes as they are (binary)",
                  part.name);
    }  // other headers carry nothing a field needs
  }
  if (part.name.empty())
    malformed("part " + std::to_string(index) +
              " has no name: each part needs 'Content-Disposition: form-data; name=\"FIELD\"'");
}

// RFC 3629 UTF-8 (no overlong forms, surrogates or code points past U+10FFFF): what the strings
// of a JSON body hold, so that a form's text reaches the rest of the server as JSON text would.
bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t n;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) {
      n = 1, cp = c & 0x1Fu, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, cp = c & 0x0Fu, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, cp = c & 0x07u, min = 0x10000;
    } else {
      return false;
    }
    if (s.size() - i <= n) return false;
    for (size_t k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

// The fields that take a string: their text parts are the string itself ("12" stays a prompt
// of two digits). Every other field's text is read as JSON. A string field added to
// request_fields() belongs here too.
bool takes_string(const std::string& name) {
  static const std::set<std::string, std::less<>> names = {
      "prompt", "negative_prompt", "sampler", "scheduler", "prompt_syntax", "priority"};
  return names.count(name) > 0 ||
         std::find(image_fields().begin(), image_fields().end(), name) != image_fields().end();
}

BodyJson text_value(const std::string& name, std::string_view text) {
  if (!valid_utf8(text))
    throw ApiError(400, "validation_error",
                   quoted_name(name) + " is not valid UTF-8 text (form fields are UTF-8)",
                   name.size() <= 64 ? name : name.substr(0, 64));
  if (takes_string(name)) return BodyJson(std::string(text));
  try {
    return safe_json::parse<BodyJson>(text, safe_json::Limits{safe_json::kMaxDepth, kMaxBodyKeys});
  } catch (const safe_json::Error&) {
    // Not JSON ("abc" for steps): kept as text, which job_request() refuses with the field's
    // own rule, as it would refuse "abc" in a JSON body.
    return BodyJson(std::string(text));
  }
}

}  // namespace

bool is_form(std::string_view content_type) {
  return lower(media_type(content_type)) == "multipart/form-data";
}

std::string boundary_of(std::string_view content_type) {
  const size_t semi = content_type.find(';');
  std::string boundary;
  bool found = false;
  if (semi != std::string_view::npos) {
    for (auto& p : parameters(content_type.substr(semi), "Content-Type")) {
      if (p.key != "boundary") continue;
      if (found) malformed("Content-Type has two boundary parameters");
      found = true;
      boundary = std::move(p.value);
    }
  }
  if (!found)
    malformed(
        "Content-Type has no boundary parameter (multipart/form-data; boundary=...), which "
        "says where each part ends");
  const bool valid =
      !boundary.empty() && boundary.size() <= kMaxBoundary && boundary.back() != ' ' &&
      std::all_of(boundary.begin(), boundary.end(), [](char c) { return is_bchar(c); });
  if (!valid)
    malformed(
        "the boundary must be 1 to 70 letters, digits, spaces (not last) or any of '()+_,-./:=? "
        "(RFC 2046)");
  return boundary;
}

std::vector<Part> parse(std::string_view body, std::string_view boundary) {
  // Each part ends at CRLF "--" boundary. A boundary holds no CR, so a partial match never
  // overlaps the next candidate: every search below is linear in the body.
  const std::string delimiter = "\r\n--" + std::string(boundary);
  const std::string_view dash_boundary = std::string_view(delimiter).substr(2);
  const std::string first_line = "'" + std::string(dash_boundary) + "'";
  size_t pos;
  if (body.substr(0, dash_boundary.size()) == dash_boundary) {
    pos = dash_boundary.size();
  } else {  // a preamble before the first delimiter is allowed, and ignored
    const size_t at = body.find(delimiter);
    if (at == std::string_view::npos)
      malformed("no line " + first_line +
                " starts a part: the body is not in the boundary's parts, or its lines do not "
                "end with CRLF");
    pos = at + delimiter.size();
  }
  std::vector<Part> parts;
  std::set<std::string, std::less<>> names;
  for (;;) {
    // After a delimiter: "--" ends the body (an epilogue may follow, ignored), or transport
    // padding and CRLF start a part.
    if (body.substr(pos, 2) == "--") return parts;
    while (pos < body.size() && (body[pos] == ' ' || body[pos] == '\t')) ++pos;
    if (pos >= body.size())
      malformed("the body ends without its closing line '" + std::string(dash_boundary) + "--'");
    if (body.substr(pos, 2) != "\r\n")
      malformed("a boundary line " + first_line +
                " must end with CRLF (or '--' for the last); a part's data may not contain it");
    pos += 2;
    if (parts.size() == kMaxParts)
      malformed("more than " + std::to_string(kMaxParts) +
                " parts; a request has one part per field");
    const size_t index = parts.size() + 1;
    Part part;
    std::string_view headers;  // the header lines, each with its CRLF
    if (body.substr(pos, 2) == "\r\n") {
      pos += 2;  // no headers: refused below, for want of a name
    } else {
      const std::string_view window = body.substr(pos, kMaxPartHeaderBytes + 2);
      const size_t blank = window.find("\r\n\r\n");
      if (blank == std::string_view::npos) {
        if (window.size() < kMaxPartHeaderBytes + 2)
          malformed("part " + std::to_string(index) +
                    "'s headers do not end with an empty line: the body ends");
        malformed("part " + std::to_string(index) + "'s headers are longer than " +
                  std::to_string(kMaxPartHeaderBytes) + " bytes");
      }
      headers = window.substr(0, blank + 2);
      pos += blank + 4;
    }
    read_headers(headers, index, part);
    if (!names.insert(part.name).second)
      malformed("the form sets " + quoted_name(part.name) + " twice; each field is one part",
                part.name);
    const size_t end = body.find(delimiter, pos);
    if (end == std::string_view::npos)
      malformed(part_label(index, part.name) + " is not terminated: no line " + first_line +
                    " follows its data",
                part.name);
    part.data = body.substr(pos, end - pos);
    parts.push_back(std::move(part));
    pos = end + delimiter.size();
  }
}

const std::vector<std::string>& image_fields() {
  static const std::vector<std::string> fields = {"init_image", "mask"};
  return fields;
}

BodyJson form_body(std::string_view content_type, std::string_view body) {
  const std::string boundary = boundary_of(content_type);
  const auto& images = image_fields();
  BodyJson doc = BodyJson::object();
  for (const Part& p : parse(body, boundary)) {
    const bool image = std::find(images.begin(), images.end(), p.name) != images.end();
    if (!image || !p.is_file) {
      doc[p.name] = text_value(p.name, p.data);  // a file for a text field gives its text
      continue;
    }
    if (p.data.empty()) {
      // What a browser sends for a file input left empty: as if the field were absent.
      if (p.filename.empty()) continue;
      throw ApiError(400, "validation_error",
                     p.name + ": the file " + quoted_name(p.filename) +
                         " is empty (expected a PNG, JPEG or WebP image)",
                     p.name);
    }
    // As base64, the JSON body's form of an image: one decoder, one set of checks and messages.
    doc[p.name] = base64(std::vector<uint8_t>(p.data.begin(), p.data.end()));
  }
  return doc;
}

}  // namespace sdserve::server::multipart
