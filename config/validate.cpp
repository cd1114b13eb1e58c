// Checks across keys; each key's own type and range are checked as it is read (values.cpp).
#include <string>

#include "config/keys.h"

namespace sdserve::config {

using detail::json;
using detail::num;

void validate(const ServiceConfig& c) {
  if (c.host.empty()) throw ConfigError("host must not be empty");
  for (size_t i = 1; i < c.batch_buckets.size(); ++i)
    if (c.batch_buckets[i] <= c.batch_buckets[i - 1])
      throw ConfigError("batch_buckets must be strictly ascending, got " +
                        json(c.batch_buckets).dump());
  if (c.max_batch > c.batch_buckets.back())
    throw ConfigError("max_batch (" + std::to_string(c.max_batch) +
                      ") must not exceed the largest of batch_buckets (" +
                      std::to_string(c.batch_buckets.back()) + ")");
  if (c.default_timeout_s > c.max_timeout_s)
    throw ConfigError("default_timeout_s (" + num(c.default_timeout_s) +
                      ") must not exceed max_timeout_s (" + num(c.max_timeout_s) + ")");
  for (const auto& o : c.cors_allow_origins) {
    // An origin is scheme://host[:port] with nothing after: what browsers send in Origin.
    const auto scheme = o.find("://");
    const bool web = (o.rfind("http://", 0) == 0 || o.rfind("https://", 0) == 0) &&
                     o.size() > scheme + 3 && o.find('/', scheme + 3) == std::string::npos;
    if (o != "*" && !web)
      throw ConfigError(
          "cors_allow_origins entries are origins like https://app.example.com "
          "(no path) or '*', got \"" +
          o + "\"");
  }
  for (const auto& h : c.allowed_hosts) {
    // A name as it appears in a Host header, without scheme, port or path.
    const bool name = !h.empty() && h.find_first_of("/:@ ") == std::string::npos;
    const bool v6 = h.size() > 2 && h.front() == '[' && h.back() == ']';
    if (h != "*" && !name && !v6)
      throw ConfigError(
          "allowed_hosts entries are host names like sd.example.com or addresses (IPv6 in "
          "brackets), without scheme or port, or '*'; got \"" +
          h + "\"");
  }
  const std::string& d = c.device;
  const bool cuda_n = d.rfind("cuda:", 0) == 0 && d.size() > 5 &&
                      d.find_first_not_of("0123456789", 5) == std::string::npos;
  if (d != "auto" && d != "cpu" && d != "cuda" && !cuda_n)
    throw ConfigError("device must be auto, cpu, cuda or cuda:N, got \"" + d + "\"");
}

}  // namespace sdserve::config
