// Every way a request can be refused: 400 naming the field (table-driven over all fields), bad
// JSON, 413 for an oversized body, 401 without an API key, start-up errors of the configuration.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <sstream>

#include "harness.h"

namespace sdserve::itest {
namespace {

class ValidationTest : public SharedServerTest {};

std::string repeated(const std::string& s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += s;
  return out;
}

// At least `tokens` tokens of CLIP's vocabulary ("photo" is one token in every CLIP tokenizer).
std::string long_prompt(int tokens) {
  return repeated("photo ", tokens);
}

struct BadField {
  std::string field;       // the "field" the error must name
  json value;              // put into a valid body under `key`
  std::string key = "";    // defaults to `field`
  std::string in_message;  // also in the message (the allowed range, typically)
};

TEST_F(ValidationTest, EveryFieldIsCheckedAndNamed) {
  const std::vector<BadField> cases = {
      {"prompt", 42, "", "string"},
      {"prompt", nullptr, "", "string"},
      {"negative_prompt", json::array(), "", "string"},
      {"width", 100, "", "multiple of 8"},
      {"width", 32, "", "64 and 2048"},
      {"width", 4096, "", "64 and 2048"},
      {"width", "512", "", "64 and 2048"},
      {"width", 512.5, "", "multiple of 8"},
      {"height", 0, "", "64 and 2048"},
      {"height", -64, "", "64 and 2048"},
      {"steps", 0, "", "1 and 150"},
      {"steps", 151, "", "1 and 150"},
      {"steps", "ten", "", "1 and 150"},
      {"steps", true, "", "1 and 150"},
      {"guidance_scale", -1, "", "0 and 30"},
      {"guidance_scale", 30.5, "", "0 and 30"},
      {"guidance_scale", "7", "", "0 and 30"},
      {"sampler", "eulr", "", "euler"},
      {"sampler", 3, "", "string"},
      {"scheduler", "exponential", "", "normal, karras"},
      {"scheduler", "karras", "", "karras"},  // with ddim, below
      {"seed", -2, "", "-1"},
      {"seed", 1.5, "", "-1"},
      {"seed", "42", "", "-1"},
      {"num_images", 0, "", "1 and 16"},
      {"num_images", 17, "", "1 and 16"},
      {"clip_skip", 0, "", "1 and"},
      {"clip_skip", 1000, "", "1 and"},
      {"preview", "yes", "", "object"},
      {"preview.every", {{"every", 0}}, "preview", "between 1"},
      {"preview.format", {{"format", "gif"}}, "preview", "jpeg, png"},
      {"preview.max_size", {{"max_size", 8}}, "preview", "between"},
      {"preview.method", {{"method", "taesd"}}, "preview", "latent2rgb, vae"},
      {"preview.colour", {{"colour", 1}}, "preview", "unknown"},
      {"priority", "urgent", "", "high, normal, low"},
      {"priority", 1, "", "high, normal, low"},
      {"timeout_s", 0, "", "greater than 0"},
      {"timeout_s", 1e9, "", "at most"},
      {"timeout_s", "60", "", "greater than 0"},
      {"cancel_on_disconnect", "yes", "", "true or false"},
      {"original_size", 1024, "", "object"},
      {"original_size.width", {{"width", -1}}, "original_size", "0 and 8192"},
      {"original_size.height", {{"height", "1024"}}, "original_size", "0 and 8192"},
      {"crops_coords_top_left.top", {{"top", 9000}}, "crops_coords_top_left", "0 and 8192"},
      {"crops_coords_top_left.right", {{"right", 0}}, "crops_coords_top_left", "unknown"},
      {"target_size.width", {{"width", 1.5}}, "target_size", "0 and 8192"},
      {"colour", "blue", "", "unknown field"},
      {"prompt_syntax", "comfy", "", "\"a1111\""},
      {"prompt_syntax", false, "", "\"none\""},
      // A1111's syntax, checked at submission: a weight that is not a number, a prompt past
      // 16 chunks of 75 tokens (BREAK starts a chunk), the same for negatives.
      {"prompt", "a (cat:1.2.3)", "", "not a finite number"},
      {"prompt", "a (cat:1" + std::string(400, '0') + ")", "", "not a finite number"},
      {"prompt", long_prompt(16 * 75 + 1), "", "16 chunks of 75 tokens"},
      {"prompt", repeated("cat BREAK ", 16) + "cat", "", "16 chunks"},
      {"negative_prompt", long_prompt(16 * 75 + 1), "", "16 chunks"},
  };
  for (const auto& c : cases) {
    json body = small_job("validation");
    const std::string key = c.key.empty() ? c.field : c.key;
    body[key] = c.value;
    if (c.field == "scheduler" && c.value == "karras") body["sampler"] = "ddim";
    const auto r = post(port(), "/v1/jobs", body);
    SCOPED_TRACE(c.field + " = " + c.value.dump());
    ASSERT_EQ(r.status, 400) << r.body;
    const json err = r.body_json()["error"];
    EXPECT_EQ(err["type"], "validation_error");
    EXPECT_EQ(err["field"], c.field);
    const std::string msg = err["message"];
    EXPECT_NE(msg.find(c.field), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.in_message), std::string::npos) << msg;
  }
}

TEST_F(ValidationTest, PromptIsRequired) {
  const auto r = post(port(), "/v1/jobs", {{"steps", 2}});
  ASSERT_EQ(r.status, 400);
  EXPECT_EQ(r.body_json()["error"]["field"], "prompt");
  EXPECT_EQ(post(port(), "/v1/generate", {{"steps", 2}}).status, 400);
}

TEST_F(ValidationTest, MalformedJson) {
  for (const std::string body : {"{", "not json", "", "{\"prompt\": \"x\",}"}) {
    const auto r = http(port(), verb::post, "/v1/jobs", body);
    ASSERT_EQ(r.status, 400) << body;
    EXPECT_EQ(r.body_json()["error"]["type"], "invalid_json") << body;
  }
  for (const std::string body : {"[]", "\"prompt\"", "42"}) {
    const auto r = http(port(), verb::post, "/v1/jobs", body);
    ASSERT_EQ(r.status, 400) << body;
    EXPECT_EQ(r.body_json()["error"]["type"], "invalid_json") << body;
  }
}

TEST_F(ValidationTest, AcceptedValuesAtTheLimits) {
  json body = small_job("limits", 1);
  body["negative_prompt"] = "blurry";
  body["guidance_scale"] = 0;
  body["sampler"] = "Euler a";
  body["seed"] = 18446744073709551615ull;
  body["clip_skip"] = 1;
  body["priority"] = "low";
  body["timeout_s"] = 3600;
  body["cancel_on_disconnect"] = false;
  body["preview"] = nullptr;
  // SDXL's size conditioning: accepted (and echoed) for any model, used by SDXL's.
  body["original_size"] = {{"width", 8192}, {"height", 0}};
  body["crops_coords_top_left"] = {{"top", 0}, {"left", 8192}};
  body["target_size"] = nullptr;
  const auto r = post(port(), "/v1/jobs", body);
  ASSERT_EQ(r.status, 202) << r.body;
  EXPECT_EQ(r.body_json()["request"]["sampler"], "euler_ancestral");
  EXPECT_EQ(r.body_json()["request"]["original_size"]["width"], 8192);
  EXPECT_EQ(r.body_json()["request"]["crops_coords_top_left"]["left"], 8192);
  EXPECT_EQ(r.body_json()["seed"], 18446744073709551615ull);
}

TEST_F(ValidationTest, OversizedBodyIs413) {
  json body = small_job("big");
  body["prompt"] = std::string(48 << 20, 'a');  // past the 48 MiB default, by the JSON around it
  const auto r = post(port(), "/v1/jobs", body);
  ASSERT_EQ(r.status, 413) << r.error;
  EXPECT_EQ(r.body_json()["error"]["type"], "payload_too_large");
  // The server is fine afterwards.
  EXPECT_EQ(get(port(), "/healthz").status, 200);
}

TEST_F(ValidationTest, OversizedHeadersAre431) {
  Headers padding;
  for (int i = 0; i < 8; ++i) padding["X-Padding-" + std::to_string(i)] = std::string(4000, 'x');
  const auto r = get(port(), "/healthz", padding);
  EXPECT_EQ(r.status, 431) << r.error;
  EXPECT_EQ(get(port(), "/healthz").status, 200);
}

TEST(AuthTest, ApiKeysAreRequiredWhenConfigured) {
  ServerProcess server({"--api-keys", "k1,k2"});
  const int port = server.port();
  // Open without a key.
  EXPECT_EQ(get(port, "/healthz").status, 200);
  EXPECT_EQ(get(port, "/readyz").status, 200);
  EXPECT_EQ(get(port, "/metrics").status, 200);
  // Closed without one.
  const auto none = post(port, "/v1/jobs", small_job("auth"));
  EXPECT_EQ(none.status, 401);
  EXPECT_EQ(none.body_json()["error"]["type"], "unauthorized");
  EXPECT_EQ(none.header("www-authenticate"), "Bearer");
  EXPECT_EQ(get(port, "/v1/models").status, 401);
  EXPECT_EQ(get(port, "/v1/models", {{"Authorization", "Bearer wrong"}}).status, 401);
  int status = 0;
  WsClient ws;
  EXPECT_FALSE(ws.connect(port, "/v1/events", {}, true, 0, &status));
  EXPECT_EQ(status, 401);
  // Either key works.
  EXPECT_EQ(get(port, "/v1/models", {{"Authorization", "Bearer k1"}}).status, 200);
  const auto ok = post(port, "/v1/jobs", small_job("auth"), {{"Authorization", "Bearer k2"}});
  EXPECT_EQ(ok.status, 202) << ok.body;
  WsClient ws2;
  EXPECT_TRUE(ws2.connect(port, "/v1/events", {{"Authorization", "Bearer k1"}}));
  WsClient ws3;
  EXPECT_TRUE(ws3.connect(port, "/v1/events?api_key=k2"));
}

TEST(StartupTest, BadConfigurationStopsWithExit2) {
  struct Case {
    std::vector<std::string> args;
    std::map<std::string, std::string> env;
    std::string named;
  };
  const std::vector<Case> cases = {
      {{"--max-queue", "0"}, {}, "max_queue"},
      {{"--no-such-flag", "1"}, {}, "--no-such-flag"},
      {{}, {{"SDSERVE_NO_SUCH_KEY", "1"}}, "SDSERVE_NO_SUCH_KEY"},
      {{}, {{"SDSERVE_MAX_BATCH", "many"}}, "SDSERVE_MAX_BATCH"},
      {{"--config", "/nonexistent/sdserve.json"}, {}, "/nonexistent/sdserve.json"},
  };
  for (const auto& c : cases) {
    const auto [status, out] = run_to_exit(c.args, c.env);
    EXPECT_EQ(status, 2) << out;
    EXPECT_NE(out.find(c.named), std::string::npos) << out;
  }
  // A config file is read, and a flag beats it.
  char path[] = "/tmp/sdserve_itest_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  const std::string text = R"({"max_queue": 0})";
  ASSERT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  close(fd);
  const auto [bad_status, bad_out] = run_to_exit({"--config", path});
  EXPECT_EQ(bad_status, 2);
  EXPECT_NE(bad_out.find("max_queue"), std::string::npos) << bad_out;
  EXPECT_NE(bad_out.find(path), std::string::npos) << bad_out;
  unlink(path);

  const auto [status, help] = run_to_exit({"--help"});
  EXPECT_EQ(status, 0);
  for (const char* key : {"--max-queue", "SDSERVE_MAX_QUEUE", "--ws-queue-limit", "--api-keys"})
    EXPECT_NE(help.find(key), std::string::npos) << key;
}

TEST(StartupTest, JsonLogLines) {
  ServerProcess server({"--log-format", "json"});
  ASSERT_EQ(get(server.port(), "/v1/models", {{"X-Request-Id", "json-1"}}).status, 200);
  const auto job = submit(server.port(), small_job("logged as json", 2, 41));
  ASSERT_EQ(wait_final(server.port(), job["id"]), "succeeded");
  ASSERT_TRUE(server.wait_log("GET /v1/models 200"));
  const std::string job_line = "job " + job["id"].get<std::string>() + " succeeded";
  ASSERT_TRUE(server.wait_log(job_line));
  std::istringstream lines(server.log());
  std::string line;
  int parsed = 0;
  bool request_line = false, job_end_line = false;
  while (std::getline(lines, line)) {
    if (line.rfind("{\"time\"", 0) != 0) continue;  // not ours (a library's own output)
    const json j = json::parse(line);
    EXPECT_TRUE(j.contains("level"));
    EXPECT_TRUE(j["msg"].is_string());
    ++parsed;
    // The request's and the job's lines carry their facts as separate fields.
    if (j["msg"] == "GET /v1/models 200") {
      request_line = true;
      EXPECT_EQ(j["method"], "GET");
      EXPECT_EQ(j["route"], "/v1/models");
      EXPECT_EQ(j["status"], 200);
      EXPECT_TRUE(j["ms"].is_number());
      EXPECT_TRUE(j["bytes"].is_number());
      EXPECT_EQ(j["req"], "json-1");
    }
    if (j["msg"] == job_line) {
      job_end_line = true;
      EXPECT_EQ(j["req"].get<std::string>().size(), 32u);  // the server made this request's id
      EXPECT_TRUE(j["queue_wait_s"].is_number());
      EXPECT_TRUE(j["run_s"].is_number());
      EXPECT_EQ(j["images"], 1);
    }
  }
  EXPECT_GE(parsed, 3);
  EXPECT_TRUE(request_line);
  EXPECT_TRUE(job_end_line);
}

}  // namespace
}  // namespace sdserve::itest
