// Browsers calling the API: CORS preflight and headers (config cors_allow_origins), OPTIONS on
// every route, and percent-encoded query parameters (a browser's ?api_key=).
#include "harness.h"

namespace sdserve::itest {
namespace {

const std::string kOrigin = "https://app.example.com";

TEST(CorsTest, WithoutOriginsConfiguredOptionsAnswersButGrantsNothing) {
  ServerProcess server;
  const auto r = http(server.port(), verb::options, "/v1/jobs", "",
                      {{"Origin", kOrigin}, {"Access-Control-Request-Method", "POST"}});
  EXPECT_EQ(r.status, 204);
  EXPECT_EQ(r.header("allow"), "POST, OPTIONS");
  EXPECT_EQ(r.header("access-control-allow-origin"), "");
  const auto g = get(server.port(), "/v1/samplers", {{"Origin", kOrigin}});
  EXPECT_EQ(g.status, 200);
  EXPECT_EQ(g.header("access-control-allow-origin"), "");
}

TEST(CorsTest, AllowedOriginGetsPreflightAndHeadersOthersDoNot) {
  ServerProcess server(
      {"--cors-allow-origins", kOrigin + ",http://localhost:3000", "--api-keys", "k1"});
  // The preflight needs no key: browsers send none with it.
  const auto pre = http(server.port(), verb::options, "/v1/jobs/abc", "",
                        {{"Origin", kOrigin},
                         {"Access-Control-Request-Method", "DELETE"},
                         {"Access-Control-Request-Headers", "authorization"}});
  EXPECT_EQ(pre.status, 204);
  EXPECT_EQ(pre.header("access-control-allow-origin"), kOrigin);
  EXPECT_EQ(pre.header("access-control-allow-methods"), "GET, DELETE, OPTIONS");
  EXPECT_NE(pre.header("access-control-allow-headers").find("Authorization"), std::string::npos);
  EXPECT_EQ(pre.header("vary"), "Origin");

  const auto ok =
      get(server.port(), "/v1/samplers", {{"Origin", kOrigin}, {"Authorization", "Bearer k1"}});
  EXPECT_EQ(ok.status, 200);
  EXPECT_EQ(ok.header("access-control-allow-origin"), kOrigin);
  EXPECT_NE(ok.header("access-control-expose-headers").find("X-Job-Id"), std::string::npos);
  // Errors carry the header too, so that the page can read the message.
  const auto denied = get(server.port(), "/v1/samplers", {{"Origin", kOrigin}});
  EXPECT_EQ(denied.status, 401);
  EXPECT_EQ(denied.header("access-control-allow-origin"), kOrigin);

  const auto other =
      http(server.port(), verb::options, "/v1/jobs", "",
           {{"Origin", "https://evil.example"}, {"Access-Control-Request-Method", "POST"}});
  EXPECT_EQ(other.status, 204);
  EXPECT_EQ(other.header("access-control-allow-origin"), "");
  EXPECT_EQ(other.header("access-control-allow-methods"), "");
}

TEST(CorsTest, WildcardAllowsAnyOrigin) {
  ServerProcess server({"--cors-allow-origins", "*"});
  const auto r = get(server.port(), "/healthz", {{"Origin", "https://anything.example"}});
  EXPECT_EQ(r.header("access-control-allow-origin"), "*");
  EXPECT_EQ(r.header("vary"), "");
}

TEST(CorsTest, AnOriginWithAPathIsAStartUpError) {
  const auto [status, out] = run_to_exit({"--cors-allow-origins", "https://a.example/app"});
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("cors_allow_origins"), std::string::npos) << out;
}

TEST(QueryTest, ApiKeyInTheQueryIsPercentDecoded) {
  // A key with '+', '/' and '=' as a browser's encodeURIComponent sends it.
  ServerProcess server({"--api-keys", "a+b/c=d"});
  // /v1/events is a WebSocket: past authentication a plain GET answers 426, before it 401.
  EXPECT_EQ(get(server.port(), "/v1/events?api_key=a%2Bb%2Fc%3Dd").status, 426);
  EXPECT_EQ(get(server.port(), "/v1/events?x=1&api_key=a+b/c=d").status, 426);
  EXPECT_EQ(get(server.port(), "/v1/events?api_key=a%20b%2Fc%3Dd").status, 401);
  EXPECT_EQ(get(server.port(), "/v1/events?api_key=%zz").status, 401);
}

}  // namespace
}  // namespace sdserve::itest
