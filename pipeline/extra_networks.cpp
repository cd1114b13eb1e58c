#include "pipeline/extra_networks.h"

#include <cmath>
#include <cstdlib>

#include "pipeline/errors.h"

namespace sdserve::pipeline {
namespace {

// Python's \w on ASCII, and every byte of a multi-byte UTF-8 character (Python's \w takes
// letters of any script; other symbols in a tag's kind are rare enough not to matter).
bool is_word_byte(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c >= 0x80;
}

std::vector<std::string> split(std::string_view s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    const size_t at = s.find(sep, start);
    out.emplace_back(s.substr(start, at == std::string_view::npos ? s.npos : at - start));
    if (at == std::string_view::npos) return out;
    start = at + 1;
  }
}

double weight_of(const std::string& text, const std::string& what, const std::string& field) {
  const char* begin = text.c_str();
  char* end = nullptr;
  const double v = std::strtod(begin, &end);
  if (text.empty() || end == begin || *end != '\0' || !std::isfinite(v) || std::fabs(v) > 100)
    throw RequestError(
        field, field + ": " + what + " '" + text + "' is not a number between -100 and 100");
  return v;
}

}  // namespace

std::string strip_extra_networks(std::string_view prompt, std::vector<ExtraNetwork>* found,
                                 const std::string& field) {
  std::string out;
  out.reserve(prompt.size());
  size_t count = 0;
  size_t i = 0;
  while (i < prompt.size()) {
    if (prompt[i] == '<') {
      size_t j = i + 1;
      while (j < prompt.size() && is_word_byte(static_cast<unsigned char>(prompt[j]))) ++j;
      if (j > i + 1 && j < prompt.size() && prompt[j] == ':') {
        const size_t close = prompt.find('>', j + 1);
        if (close != std::string_view::npos && close > j + 1) {
          if (++count > kMaxExtraNetworks)
            throw RequestError(field, field + " has more than " +
                                          std::to_string(kMaxExtraNetworks) +
                                          " <...:...> extra-network tags");
          if (found) {
            ExtraNetwork n;
            n.kind = std::string(prompt.substr(i + 1, j - i - 1));
            for (auto& item : split(prompt.substr(j + 1, close - j - 1), ':')) {
              const auto eq = item.find('=');
              if (eq != std::string::npos)
                n.named[item.substr(0, eq)] = item.substr(eq + 1);
              else
                n.positional.push_back(std::move(item));
            }
            found->push_back(std::move(n));
          }
          i = close + 1;
          continue;
        }
      }
    }
    out += prompt[i++];
  }
  return out;
}

std::vector<LoraTag> lora_tags(std::string_view prompt, const std::string& field) {
  std::vector<ExtraNetwork> found;
  strip_extra_networks(prompt, &found, field);
  std::vector<LoraTag> out;
  for (const auto& n : found) {
    if (n.kind != "lora" && n.kind != "lyco")
      throw RequestError(field, field + ": <" + n.kind +
                                    ":...> is an extra network sdserve does not have (it has "
                                    "<lora:NAME:WEIGHT>)");
    if (n.positional.empty() || n.positional[0].empty())
      throw RequestError(field, field + ": <" + n.kind + ":...> names no LoRA");
    for (const auto& [key, value] : n.named)
      if (key != "te" && key != "unet")
        throw RequestError(field, field + ": <" + n.kind + ":" + n.positional[0] + ":...> takes " +
                                      key +
                                      "=, which sdserve does not support (te= and unet= only)");
    if (n.positional.size() > 3)
      throw RequestError(field, field + ": <" + n.kind + ":" + n.positional[0] +
                                    ":...> has a 4th argument (dynamic dim), which sdserve does "
                                    "not support");
    LoraTag t;
    t.name = n.positional[0];
    if (n.positional.size() > 1) t.te_weight = weight_of(n.positional[1], "weight", field);
    if (n.named.count("te")) t.te_weight = weight_of(n.named.at("te"), "te", field);
    t.unet_weight = t.te_weight;
    if (n.positional.size() > 2) t.unet_weight = weight_of(n.positional[2], "UNet weight", field);
    if (n.named.count("unet")) t.unet_weight = weight_of(n.named.at("unet"), "unet", field);
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace sdserve::pipeline
