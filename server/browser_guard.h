// What a web page can do to this service through its user's browser, and the two checks that
// stop it (issue #23, docs/SECURITY.md "Browsers"):
//
// - DNS rebinding: a page at http://evil.example:8080 whose name then resolves to 127.0.0.1
//   reads the service as its own origin. Its requests name the attacker's host in `Host`, so a
//   service bound to loopback (or one with `allowed_hosts`) answers only to the names it is
//   known by: localhost, the loopback addresses, its own bind address and `allowed_hosts`.
// - Cross-site requests that need no preflight (a form's or fetch's text/plain POST) submit jobs
//   although CORS keeps the answer from the page: a request that changes state (POST, PUT,
//   PATCH, DELETE, a WebSocket upgrade) from another origin is refused unless
//   `cors_allow_origins` lists it. Same-origin requests (the page at /) and requests without
//   Origin (curl, the A1111 and ComfyUI clients) pass.
//
// Both are pure functions of the configuration and the request: thread-safe.
#pragma once

#include <string>
#include <string_view>

#include "config/config.h"
#include "server/handlers.h"

namespace sdserve::server {

// The name in a Host header: lower case, without port or trailing dot, an IPv6 address without
// its brackets ("[::1]:8080" -> "::1", "LocalHost.:80" -> "localhost").
std::string host_name(std::string_view host_header);
// Whether `host` (the listen address) is loopback: localhost, 127.0.0.0/8, ::1.
bool is_loopback_host(const std::string& host);
// Whether the Host check applies: bound to loopback, or allowed_hosts set (and not "*").
bool host_check_enabled(const config::ServiceConfig& cfg);

// Throws ApiError 403 `host_not_allowed` when the Host check applies and the request's Host
// names none of the names this service answers to. A request without Host (HTTP/1.0 from a
// non-browser client; browsers always send one) passes.
void check_host(const config::ServiceConfig& cfg, const Request& req);
// Throws ApiError 403 `origin_not_allowed` for a state-changing request from another origin
// (Origin neither the request's own scheme://host:port nor in cors_allow_origins), or, without
// Origin, one a browser marks `Sec-Fetch-Site: cross-site` / `same-site`.
void check_origin(const config::ServiceConfig& cfg, const Request& req);

}  // namespace sdserve::server
