#include "server/browser_guard.h"

#include <algorithm>
#include <cctype>

#include <boost/asio/ip/address.hpp>
#include <boost/beast/websocket/rfc6455.hpp>

namespace sdserve::server {
namespace {

std::string ascii_lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string trim(std::string_view s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) return "";
  return std::string(s.substr(b, s.find_last_not_of(" \t") - b + 1));
}

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

bool is_loopback_name(const std::string& name) {
  if (name == "localhost") return true;
  boost::system::error_code ec;
  const auto addr = boost::asio::ip::make_address(name, ec);
  if (ec) return false;
  if (addr.is_v6() && addr.to_v6().is_v4_mapped())
    return boost::asio::ip::make_address_v4(boost::asio::ip::v4_mapped, addr.to_v6()).is_loopback();
  return addr.is_loopback();
}

bool is_wildcard(const std::string& name) {
  boost::system::error_code ec;
  const auto addr = boost::asio::ip::make_address(name, ec);
  return !ec && addr.is_unspecified();
}

// "host[:port]" lower case, with the scheme's default port dropped: "LOCALHOST:80" with http
// -> "localhost"; the same for an Origin's authority and a Host header.
std::string authority(std::string_view text, const std::string& scheme) {
  std::string a = ascii_lower(trim(text));
  const std::string default_port = scheme == "https" ? ":443" : ":80";
  if (a.size() > default_port.size() &&
      a.compare(a.size() - default_port.size(), default_port.size(), default_port) == 0)
    a.resize(a.size() - default_port.size());
  return a;
}

std::string list_text(const std::vector<std::string>& list) {
  if (list.empty()) return "none";
  std::string out;
  for (const auto& s : list) out += (out.empty() ? "" : ", ") + s;
  return out;
}

bool changes_state(const Request& req) {
  switch (req.method()) {
    case http::verb::post:
    case http::verb::put:
    case http::verb::patch:
    case http::verb::delete_:
      return true;
    default:
      return boost::beast::websocket::is_upgrade(req);
  }
}

}  // namespace

std::string host_name(std::string_view host_header) {
  std::string h = ascii_lower(trim(host_header));
  if (!h.empty() && h.front() == '[') {
    const auto end = h.find(']');
    return end == std::string::npos ? h : h.substr(1, end - 1);
  }
  const auto colon = h.find(':');
  if (colon != std::string::npos && h.find(':', colon + 1) == std::string::npos) h.resize(colon);
  while (!h.empty() && h.back() == '.') h.pop_back();
  return h;
}

bool is_loopback_host(const std::string& host) {
  return is_loopback_name(host_name(host));
}

bool host_check_enabled(const config::ServiceConfig& cfg) {
  if (contains(cfg.allowed_hosts, "*")) return false;
  return !cfg.allowed_hosts.empty() || is_loopback_host(cfg.host);
}

void check_host(const config::ServiceConfig& cfg, const Request& req) {
  if (!host_check_enabled(cfg)) return;
  const auto it = req.find(http::field::host);
  if (it == req.end() || trim(it->value()).empty()) return;
  const std::string name = host_name(it->value());
  if (is_loopback_name(name)) return;
  const std::string bound = host_name(cfg.host);
  if (!is_wildcard(bound) && name == bound) return;
  for (const auto& allowed : cfg.allowed_hosts)
    if (host_name(allowed) == name) return;
  const std::string why = is_loopback_host(cfg.host)
                              ? "it listens on loopback (host " + cfg.host + ")"
                              : "allowed_hosts is set";
  throw ApiError(
      403, "host_not_allowed",
      "Host '" + name + "' is not a name this service answers to: " + why +
          ", so it answers only to localhost, loopback addresses" +
          (is_wildcard(bound) || is_loopback_name(bound) ? "" : ", " + cfg.host) +
          " and allowed_hosts (" + list_text(cfg.allowed_hosts) +
          "); a web page could otherwise reach it through a name of its own (DNS rebinding). If '" +
          name + "' is this service's, add it to allowed_hosts (--allowed-hosts, " +
          "SDSERVE_ALLOWED_HOSTS)");
}

void check_origin(const config::ServiceConfig& cfg, const Request& req) {
  if (!changes_state(req)) return;
  const std::string what = boost::beast::websocket::is_upgrade(req)
                               ? std::string("a WebSocket upgrade")
                               : "a " + std::string(req.method_string()) + " request";
  const std::string fix =
      ": pages of other origins may not change state here (submit, cancel, interrupt); only a "
      "page's own origin and those in cors_allow_origins (" +
      list_text(cfg.cors_allow_origins) +
      ") may. If its pages should, add the origin to cors_allow_origins (--cors-allow-origins, "
      "SDSERVE_CORS_ALLOW_ORIGINS)";
  const auto origin_it = req.find(http::field::origin);
  if (origin_it == req.end()) {
    // No Origin: a client that is not a browser (browsers send Origin with every cross-origin
    // POST and upgrade), unless the browser says the request comes from another site.
    const std::string site = ascii_lower(trim(req["Sec-Fetch-Site"]));
    if (site == "cross-site" || site == "same-site")
      throw ApiError(403, "origin_not_allowed",
                     what + " that the browser marks Sec-Fetch-Site: " + site +
                         " and that names no Origin was refused" + fix);
    return;
  }
  const std::string origin = trim(origin_it->value());
  if (contains(cfg.cors_allow_origins, "*") || contains(cfg.cors_allow_origins, origin)) return;
  // Same origin: the Origin's host:port is the Host the request was sent to. Any scheme: behind
  // a TLS proxy that passes Host, the page is https:// while this service speaks http.
  const auto sep = origin.find("://");
  if (sep != std::string::npos) {
    const std::string scheme = ascii_lower(origin.substr(0, sep));
    const std::string host = std::string(req[http::field::host]);
    if (!host.empty() && (scheme == "http" || scheme == "https") &&
        authority(std::string_view(origin).substr(sep + 3), scheme) == authority(host, scheme))
      return;
  }
  throw ApiError(403, "origin_not_allowed",
                 what + " from origin '" + origin + "' was refused" + fix);
}

}  // namespace sdserve::server
