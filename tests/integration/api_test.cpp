// The API's happy paths against the real binary: submit -> events -> PNG, previews, generate,
// the informational endpoints, and the documented status codes.
#include <gtest/gtest.h>

#include "harness.h"
#include "pipeline/image.h"

namespace sdserve::itest {
namespace {

std::vector<uint8_t> bytes(const std::string& s) {
  return {s.begin(), s.end()};
}

std::string text_chunk(const std::string& png, const std::string& key) {
  std::vector<std::pair<std::string, std::string>> text;
  pipeline::decode_png(bytes(png), &text);
  for (const auto& [k, v] : text)
    if (k == key) return v;
  return "";
}

class ApiTest : public SharedServerTest {};

TEST_F(ApiTest, HealthReadyModelsSamplersMetrics) {
  EXPECT_EQ(get(port(), "/healthz").status, 200);
  EXPECT_EQ(get(port(), "/readyz").status, 200);

  const auto models = get(port(), "/v1/models");
  ASSERT_EQ(models.status, 200);
  const json m = models.body_json()["models"].at(0);
  EXPECT_EQ(m["family"], "sd1");
  EXPECT_GE(m["text_layers"].get<int>(), 1);

  const auto samplers = get(port(), "/v1/samplers");
  ASSERT_EQ(samplers.status, 200);
  bool has_dpmpp = false;
  const json catalog = samplers.body_json();
  for (const auto& s : catalog["samplers"])
    has_dpmpp |= s["name"] == "dpmpp_2m" && s["display_name"] == "DPM++ 2M";
  EXPECT_TRUE(has_dpmpp);
  EXPECT_EQ(samplers.body_json()["schedulers"], json({"normal", "karras"}));

  const auto metrics = get(port(), "/metrics");
  ASSERT_EQ(metrics.status, 200);
  EXPECT_NE(metrics.header("content-type").find("text/plain"), std::string::npos);
  for (const char* name : {"sdserve_queue_depth", "sdserve_running_jobs", "sdserve_active_images",
                           "sdserve_jobs_submitted_total", "sdserve_http_requests_total"})
    EXPECT_NE(metrics.body.find(name), std::string::npos) << name;
}

TEST_F(ApiTest, UnknownPathsAndMethods) {
  const auto nf = get(port(), "/v2/nothing");
  EXPECT_EQ(nf.status, 404);
  EXPECT_EQ(nf.body_json()["error"]["type"], "not_found");
  const auto job = get(port(), "/v1/jobs/no-such-job");
  EXPECT_EQ(job.status, 404);
  EXPECT_EQ(job.body_json()["error"]["type"], "not_found");
  EXPECT_EQ(http(port(), verb::delete_, "/v1/jobs/no-such-job").status, 404);
  EXPECT_EQ(get(port(), "/v1/jobs/no-such-job/images/0").status, 404);

  const auto put = http(port(), verb::put, "/v1/jobs", "{}");
  EXPECT_EQ(put.status, 405);
  EXPECT_EQ(put.header("allow"), "POST");
  EXPECT_EQ(get(port(), "/v1/generate").status, 405);
  EXPECT_EQ(http(port(), verb::post, "/healthz", "{}").status, 405);
  // The events endpoints are WebSockets only, and an unknown job is refused before upgrading.
  EXPECT_EQ(get(port(), "/v1/events").status, 426);
  int status = 0;
  WsClient ws;
  EXPECT_FALSE(ws.connect(port(), "/v1/jobs/no-such-job/events", {}, true, 0, &status));
  EXPECT_EQ(status, 404);
}

TEST_F(ApiTest, SubmitEventsThenPng) {
  json body = small_job("a red apple", 4, 1234);
  body["sampler"] = "DPM++ 2M Karras";  // A1111's name, schedule included
  const json job = submit(port(), body);
  const std::string id = job["id"];
  EXPECT_TRUE(server_->wait_log("POST /v1/jobs 202")) << "one log line per request";
  EXPECT_TRUE(server_->wait_log("job=" + id));
  EXPECT_EQ(job["status"], "queued");
  EXPECT_EQ(job["seed"], 1234);
  EXPECT_TRUE(job["queue_position"].is_number());
  EXPECT_EQ(job["links"]["self"], "/v1/jobs/" + id);
  EXPECT_EQ(job["links"]["events"], "/v1/jobs/" + id + "/events");
  EXPECT_EQ(job["request"]["sampler"], "dpmpp_2m");
  EXPECT_EQ(job["request"]["scheduler"], "karras");

  WsClient ws;
  ASSERT_TRUE(ws.connect(port(), "/v1/jobs/" + id + "/events"));
  std::vector<WsClient::Frame> seen;
  const auto final_event = ws.next_json(
      [](const json& j) { return is_final_type(j.value("type", "")); }, kTimeout, &seen);
  ASSERT_TRUE(final_event) << "no final event";
  EXPECT_EQ((*final_event)["type"], "succeeded");
  EXPECT_EQ((*final_event)["job_id"], id);
  for (const auto& f : seen) {
    if (f.text) {
      EXPECT_EQ(f.as_json()["job_id"], id);
    }
  }
  int code = 0;
  EXPECT_TRUE(ws.wait_closed(kTimeout, &code)) << "the per-job socket closes after the final event";
  EXPECT_EQ(code, 1000);

  const auto status = get(port(), "/v1/jobs/" + id);
  ASSERT_EQ(status.status, 200);
  const json s = status.body_json();
  EXPECT_EQ(s["status"], "succeeded");
  EXPECT_EQ(s["seed"], 1234);
  EXPECT_EQ(s["steps"], 4);
  EXPECT_EQ(s["step"], 4);
  EXPECT_TRUE(s["queue_position"].is_null());
  for (const char* t : {"queued", "started", "finished"}) {
    ASSERT_TRUE(s["timings"][t].is_string()) << t;
    EXPECT_EQ(s["timings"][t].get<std::string>().back(), 'Z') << t;  // ISO-8601 UTC
  }
  ASSERT_EQ(s["images"].size(), 1u);
  EXPECT_EQ(s["images"][0], "/v1/jobs/" + id + "/images/0");

  const auto png = get(port(), s["images"][0]);
  ASSERT_EQ(png.status, 200);
  EXPECT_EQ(png.header("content-type"), "image/png");
  const auto image = pipeline::decode_png(bytes(png.body));
  EXPECT_EQ(image.width, 64);
  EXPECT_EQ(image.height, 64);
  const std::string params = text_chunk(png.body, "parameters");
  EXPECT_NE(params.find("a red apple"), std::string::npos) << params;
  EXPECT_NE(params.find("1234"), std::string::npos) << params;

  // Images that do not exist; jobs that are already final.
  EXPECT_EQ(get(port(), "/v1/jobs/" + id + "/images/1").status, 404);
  EXPECT_EQ(get(port(), "/v1/jobs/" + id + "/images/x").status, 404);
  const auto del = http(port(), verb::delete_, "/v1/jobs/" + id);
  EXPECT_EQ(del.status, 409);
  EXPECT_EQ(del.body_json()["error"]["type"], "conflict");
}

TEST_F(ApiTest, LateSubscriberCatchesUp) {
  const json job = submit(port(), small_job("late", 2, 7));
  const std::string id = job["id"];
  ASSERT_EQ(wait_final(port(), id), "succeeded");
  // The job is over: a new subscriber still gets its final state, then the close.
  WsClient ws;
  ASSERT_TRUE(ws.connect(port(), "/v1/jobs/" + id + "/events"));
  const auto ev = ws.next_json([](const json& j) { return is_final_type(j.value("type", "")); });
  ASSERT_TRUE(ev);
  EXPECT_EQ((*ev)["type"], "succeeded");
  EXPECT_TRUE(ws.wait_closed());
}

TEST_F(ApiTest, PreviewsAreTextThenBinary) {
  json body = small_job("previews", 4, 3);
  body["preview"] = {{"every", 1}, {"format", "png"}, {"max_size", 64}, {"method", "latent2rgb"}};
  const json job = submit(port(), body);
  WsClient ws;
  ASSERT_TRUE(ws.connect(port(), "/v1/jobs/" + job["id"].get<std::string>() + "/events"));
  int previews = 0;
  bool done = false;
  while (!done) {
    auto f = ws.next();
    ASSERT_TRUE(f) << "the stream ended before the final event";
    ASSERT_TRUE(f->text) << "a binary frame must follow a preview event";
    const json ev = f->as_json();
    const std::string type = ev["type"];
    if (type == "preview") {
      auto bin = ws.next();
      ASSERT_TRUE(bin);
      ASSERT_FALSE(bin->text) << "the preview's bytes come right after its JSON";
      const auto img = pipeline::decode_png(bytes(bin->data));
      EXPECT_GT(img.width, 0);
      EXPECT_LE(std::max(img.width, img.height), 64);
      ++previews;
    }
    done = is_final_type(type);
    if (done) {
      EXPECT_EQ(type, "succeeded");
    }
  }
  EXPECT_GE(previews, 1);
}

TEST_F(ApiTest, JpegPreviews) {
  json body = small_job("jpeg previews", 2, 3);
  body["preview"] = {{"every", 1}};  // jpeg is the default format
  const json job = submit(port(), body);
  WsClient ws;
  ASSERT_TRUE(ws.connect(port(), "/v1/jobs/" + job["id"].get<std::string>() + "/events"));
  const auto ev = ws.next_json([](const json& j) { return j.value("type", "") == "preview"; });
  ASSERT_TRUE(ev);
  const auto bin = ws.next();
  ASSERT_TRUE(bin);
  ASSERT_FALSE(bin->text);
  ASSERT_GE(bin->data.size(), 3u);
  EXPECT_EQ(static_cast<unsigned char>(bin->data[0]), 0xFF);  // JPEG SOI marker
  EXPECT_EQ(static_cast<unsigned char>(bin->data[1]), 0xD8);
}

TEST_F(ApiTest, GenerateReturnsPngOrJson) {
  const auto one = post(port(), "/v1/generate", small_job("sync", 2, 99));
  ASSERT_EQ(one.status, 200) << one.body;
  EXPECT_EQ(one.header("content-type"), "image/png");
  EXPECT_EQ(one.header("x-seed"), "99");
  EXPECT_FALSE(one.header("x-job-id").empty());
  EXPECT_EQ(pipeline::decode_png(bytes(one.body)).width, 64);
  EXPECT_NE(text_chunk(one.body, "parameters").find("sync"), std::string::npos);

  json body = small_job("sync pair", 2, 50);
  body["num_images"] = 2;
  const auto two = post(port(), "/v1/generate", body);
  ASSERT_EQ(two.status, 200) << two.body;
  const json j = two.body_json();
  ASSERT_EQ(j["images"].size(), 2u);
  EXPECT_EQ(j["images"][0]["seed"], 50);
  EXPECT_EQ(j["images"][1]["seed"], 51);
  EXPECT_EQ(j["job"]["status"], "succeeded");

  // The same image, via JSON when the client asks for it.
  const auto as_json =
      post(port(), "/v1/generate", small_job("sync", 2, 99), {{"Accept", "application/json"}});
  ASSERT_EQ(as_json.status, 200);
  EXPECT_EQ(as_json.body_json()["images"].size(), 1u);
}

TEST_F(ApiTest, PromptSyntaxWeightsAndLongPromptsRunAndAreEchoed) {
  // 110 words: two chunks of 75 tokens in A1111's syntax, cut to one chunk with "none".
  std::string words;
  for (int i = 0; i < 110; ++i) words += i % 2 ? " red" : " cube";
  const auto run = [&](const std::string& prompt, const std::string& syntax) {
    json body = small_job(prompt, 2, 7);
    body["prompt_syntax"] = syntax;
    const auto r = post(port(), "/v1/generate", body);
    EXPECT_EQ(r.status, 200) << r.body;
    const auto job = get(port(), "/v1/jobs/" + r.header("x-job-id"));
    EXPECT_EQ(job.body_json()["request"]["prompt_syntax"], syntax);
    return pipeline::decode_png(bytes(r.body)).pixels;
  };
  const std::string weighted = "a (red:1.4) [cube]," + words;
  const auto a1111 = run(weighted, "a1111");
  const auto literal = run(weighted, "none");
  EXPECT_NE(a1111, literal);  // the weights and the second chunk change the image
  // Without syntax and within 75 tokens both read the same text: the same pixels.
  EXPECT_EQ(run("a red cube", "a1111"), run("a red cube", "none"));

  // A long prompt and a short one at once: they may share UNet steps (one call per length).
  const json long_job = submit(port(), small_job(words, 3, 1));
  const json short_job = submit(port(), small_job("a red cube", 3, 1));
  EXPECT_EQ(wait_final(port(), long_job["id"]), "succeeded");
  EXPECT_EQ(wait_final(port(), short_job["id"]), "succeeded");
}

TEST_F(ApiTest, RandomSeedIsReported) {
  json body = small_job("random", 1, 0);
  body["seed"] = -1;
  const json a = submit(port(), body);
  body.erase("seed");
  const json b = submit(port(), body);
  EXPECT_TRUE(a["seed"].is_number_unsigned());
  EXPECT_TRUE(b["seed"].is_number_unsigned());
  EXPECT_EQ(wait_final(port(), a["id"]), "succeeded");
  EXPECT_EQ(get(port(), "/v1/jobs/" + a["id"].get<std::string>()).body_json()["seed"], a["seed"]);
}

TEST_F(ApiTest, MultiJobEventSocket) {
  WsClient ws;
  ASSERT_TRUE(ws.connect(port(), "/v1/events"));
  ws.send_text(R"({"subscribe": "no-such-job"})");
  const auto err = ws.next_json([](const json& j) { return j.value("type", "") == "error"; });
  ASSERT_TRUE(err);
  EXPECT_EQ((*err)["error"]["type"], "not_found");
  EXPECT_EQ((*err)["job_id"], "no-such-job");
  ws.send_text("not json");
  const auto bad = ws.next_json([](const json& j) { return j.value("type", "") == "error"; });
  ASSERT_TRUE(bad);

  const std::string a = submit(port(), small_job("multi a", 3, 1))["id"];
  const std::string b = submit(port(), small_job("multi b", 3, 2))["id"];
  ws.send_text(json{{"subscribe", a}}.dump());
  ws.send_text(json{{"subscribe", b}}.dump());
  std::set<std::string> finished;
  while (finished.size() < 2) {
    const auto ev = ws.next_json([](const json& j) { return is_final_type(j.value("type", "")); });
    ASSERT_TRUE(ev) << "missing final events";
    EXPECT_EQ((*ev)["type"], "succeeded");
    finished.insert((*ev)["job_id"].get<std::string>());
  }
  EXPECT_EQ(finished, (std::set<std::string>{a, b}));
  // The socket stays open for more.
  ws.send_text(json{{"unsubscribe", a}}.dump());
  const auto reply = ws.next_json([](const json& j) {
    const std::string t = j.value("type", "");
    return t == "unsubscribed" || t == "error";
  });
  ASSERT_TRUE(reply);  // a final event already ended that subscription: "not subscribed"
  EXPECT_EQ((*reply)["job_id"], a);
}

TEST(ResultStoreTest, EvictedImagesAre410) {
  ServerProcess server({"--result-ttl-s", "0.5"});
  const int port = server.port();
  const std::string id = submit(port, small_job("short-lived", 2, 21))["id"];
  ASSERT_EQ(wait_final(port, id), "succeeded");
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  int status = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    status = get(port, "/v1/jobs/" + id + "/images/0").status;
    if (status != 200) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(status, 410);
  const json job = get(port, "/v1/jobs/" + id).body_json();
  EXPECT_EQ(job["results_evicted"], true);
  EXPECT_TRUE(job["images"].empty());
}

}  // namespace
}  // namespace sdserve::itest
