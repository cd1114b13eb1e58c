// What a web page can do to a keyless service through its user's browser (issue #23,
// docs/SECURITY.md): DNS rebinding (a foreign Host on a loopback-bound server) and cross-site
// requests that change state (a text/plain POST needs no preflight; WebSocket upgrades none).
#include "harness.h"

namespace sdserve::itest {
namespace {

const std::string kEvil = "https://evil.example";

std::string local(int port) {
  return "127.0.0.1:" + std::to_string(port);
}

// A small job as a page's fetch(url, {method: "POST", body}) sends it: text/plain, no preflight.
HttpResult text_post(int port, const std::string& target, const json& body,
                     const Headers& headers) {
  Headers h = headers;
  h["Content-Type"] = "text/plain;charset=UTF-8";
  return http(port, verb::post, target, body.dump(), h);
}

json a1111_job() {
  return {{"prompt", "a cat"}, {"steps", 2}, {"width", 64}, {"height", 64}, {"seed", 3}};
}

void expect_refused(const HttpResult& r, const std::string& type, const std::string& names,
                    const std::string& setting) {
  EXPECT_EQ(r.status, 403) << r.body;
  const auto body = r.body_json();
  EXPECT_EQ(body["error"]["type"], type) << r.body;
  const std::string message = body["error"]["message"].get<std::string>();
  EXPECT_NE(message.find(names), std::string::npos) << message;
  EXPECT_NE(message.find(setting), std::string::npos) << message;
}

TEST(BrowserGuardTest, LoopbackServerAnswersOnlyToLoopbackNames) {
  ServerProcess server;
  const int port = server.port();
  // A page at http://evil.example:PORT whose name now resolves to 127.0.0.1 (DNS rebinding).
  const std::string evil_host = "evil.example:" + std::to_string(port);
  expect_refused(get(port, "/v1/samplers", {{"Host", evil_host}}), "host_not_allowed",
                 "'evil.example'", "allowed_hosts");
  expect_refused(get(port, "/v1/jobs/abc", {{"Host", evil_host}}), "host_not_allowed",
                 "'evil.example'", "allowed_hosts");
  expect_refused(get(port, "/", {{"Host", "Evil.Example."}}), "host_not_allowed", "'evil.example'",
                 "allowed_hosts");
  const double before = metric(port, "sdserve_jobs_submitted_total");
  expect_refused(post(port, "/v1/jobs", small_job("stolen"), {{"Host", evil_host}}),
                 "host_not_allowed", "'evil.example'", "allowed_hosts");
  int status = 0;
  WsClient ws;
  EXPECT_FALSE(ws.connect(port, "/v1/events", {{"Host", evil_host}}, true, 0, &status));
  EXPECT_EQ(status, 403);
  // The names it is known by, port ignored.
  for (const std::string& host : {"localhost:" + std::to_string(port), local(port),
                                  std::string("127.0.0.1"), "127.0.0.2:" + std::to_string(port),
                                  "[::1]:" + std::to_string(port), std::string("LOCALHOST")}) {
    EXPECT_EQ(get(port, "/v1/samplers", {{"Host", host}}).status, 200) << host;
  }
  EXPECT_EQ(post(port, "/v1/jobs", small_job("mine"), {{"Host", "localhost:1"}}).status, 202);
  EXPECT_EQ(metric(port, "sdserve_jobs_submitted_total"), before + 1);
}

TEST(BrowserGuardTest, AllowedHostsAddsNames) {
  ServerProcess server({"--allowed-hosts", "sd.example.com,gpu-box"});
  const int port = server.port();
  EXPECT_EQ(get(port, "/v1/samplers", {{"Host", "sd.example.com"}}).status, 200);
  EXPECT_EQ(get(port, "/v1/samplers", {{"Host", "GPU-BOX:8080"}}).status, 200);
  EXPECT_EQ(get(port, "/v1/samplers", {{"Host", local(port)}}).status, 200);
  expect_refused(get(port, "/v1/samplers", {{"Host", "other.example.com"}}), "host_not_allowed",
                 "sd.example.com, gpu-box", "allowed_hosts");
}

TEST(BrowserGuardTest, ServerOnAllInterfacesAcceptsAnyHostUnlessAllowedHostsIsSet) {
  {
    // As deploy/ runs it for a load balancer or Prometheus; reached here through 127.0.0.1.
    ServerProcess server({"--host", "0.0.0.0"});
    EXPECT_EQ(get(server.port(), "/v1/samplers", {{"Host", "evil.example"}}).status, 200);
    EXPECT_EQ(get(server.port(), "/healthz", {{"Host", "10.1.2.3:8080"}}).status, 200);
  }
  ServerProcess server({"--host", "0.0.0.0", "--allowed-hosts", "sd.example.com"});
  EXPECT_EQ(get(server.port(), "/v1/samplers", {{"Host", "sd.example.com"}}).status, 200);
  expect_refused(get(server.port(), "/v1/samplers", {{"Host", "evil.example"}}), "host_not_allowed",
                 "'evil.example'", "allowed_hosts");
}

TEST(BrowserGuardTest, CrossSitePostsSubmitNothing) {
  ServerProcess server;
  const int port = server.port();
  const double before = metric(port, "sdserve_jobs_submitted_total");
  const Headers evil = {{"Origin", kEvil}, {"Host", local(port)}};
  expect_refused(text_post(port, "/v1/jobs", small_job("stolen"), evil), "origin_not_allowed",
                 kEvil, "cors_allow_origins");
  expect_refused(text_post(port, "/v1/generate", small_job("stolen"), evil), "origin_not_allowed",
                 kEvil, "cors_allow_origins");
  expect_refused(text_post(port, "/sdapi/v1/txt2img", a1111_job(), evil), "origin_not_allowed",
                 kEvil, "cors_allow_origins");
  expect_refused(text_post(port, "/sdapi/v1/interrupt", json::object(), evil), "origin_not_allowed",
                 kEvil, "cors_allow_origins");
  expect_refused(http(port, verb::delete_, "/v1/jobs/abc", "", evil), "origin_not_allowed", kEvil,
                 "cors_allow_origins");
  // A sandboxed frame's opaque origin, and a browser that sent no Origin but says where from.
  expect_refused(text_post(port, "/v1/jobs", small_job("stolen"), {{"Origin", "null"}}),
                 "origin_not_allowed", "'null'", "cors_allow_origins");
  expect_refused(
      text_post(port, "/v1/jobs", small_job("stolen"), {{"Sec-Fetch-Site", "cross-site"}}),
      "origin_not_allowed", "cross-site", "cors_allow_origins");
  // Another port of the same host is another origin.
  expect_refused(text_post(port, "/v1/jobs", small_job("stolen"),
                           {{"Origin", "http://127.0.0.1:1"}, {"Host", local(port)}}),
                 "origin_not_allowed", "http://127.0.0.1:1", "cors_allow_origins");
  EXPECT_EQ(metric(port, "sdserve_jobs_submitted_total"), before);
  // Reading stays as before (CORS keeps the answer from the page).
  EXPECT_EQ(get(port, "/v1/samplers", evil).status, 200);

  // The page at / (same origin), and clients that are not browsers (no Origin).
  const Headers same = {{"Origin", "http://" + local(port)},
                        {"Host", local(port)},
                        {"Sec-Fetch-Site", "same-origin"}};
  EXPECT_EQ(text_post(port, "/v1/jobs", small_job("page"), same).status, 202);
  EXPECT_EQ(http(port, verb::post, "/v1/jobs", small_job("page").dump(),
                 {{"Origin", "http://localhost:" + std::to_string(port)},
                  {"Host", "localhost:" + std::to_string(port)}})
                .status,
            202);
  EXPECT_EQ(post(port, "/v1/jobs", small_job("curl")).status, 202);
  EXPECT_EQ(text_post(port, "/sdapi/v1/txt2img", a1111_job(), {}).status, 200);
  EXPECT_EQ(metric(port, "sdserve_jobs_submitted_total"), before + 4);
}

TEST(BrowserGuardTest, OriginsInCorsAllowOriginsMayPost) {
  ServerProcess server({"--cors-allow-origins", kEvil});
  const int port = server.port();
  const double before = metric(port, "sdserve_jobs_submitted_total");
  const Headers listed = {{"Origin", kEvil}, {"Sec-Fetch-Site", "cross-site"}};
  const auto job = text_post(port, "/v1/jobs", small_job("allowed"), listed);
  EXPECT_EQ(job.status, 202) << job.body;
  EXPECT_EQ(job.header("access-control-allow-origin"), kEvil);
  const auto sd = text_post(port, "/sdapi/v1/txt2img", a1111_job(), listed);
  EXPECT_EQ(sd.status, 200) << sd.body;
  EXPECT_EQ(sd.header("access-control-allow-origin"), kEvil);
  expect_refused(
      text_post(port, "/v1/jobs", small_job("stolen"), {{"Origin", "https://other.example"}}),
      "origin_not_allowed", "https://evil.example", "cors_allow_origins");
  EXPECT_EQ(metric(port, "sdserve_jobs_submitted_total"), before + 2);
}

TEST(BrowserGuardTest, WebSocketUpgradesFromForeignOriginsAreRefused) {
  ServerProcess server;
  const int port = server.port();
  const std::string id = submit(port, small_job("watched"))["id"];
  for (const std::string& target : {std::string("/v1/events"), "/v1/jobs/" + id + "/events"}) {
    int status = 0;
    WsClient evil;
    EXPECT_FALSE(evil.connect(port, target, {{"Origin", kEvil}}, true, 0, &status)) << target;
    EXPECT_EQ(status, 403) << target;
    WsClient page;
    EXPECT_TRUE(
        page.connect(port, target, {{"Origin", "http://" + local(port)}, {"Host", local(port)}}))
        << target;
    WsClient cli;
    EXPECT_TRUE(cli.connect(port, target)) << target;
  }
}

}  // namespace
}  // namespace sdserve::itest
