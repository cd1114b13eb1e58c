// Limits on what one accepted request may cost (issue #23): a running job stops at max_run_s and
// ends `timed_out` on every route.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "harness.h"

namespace sdserve::itest {
namespace {

// 16 images x 150 steps at 128 px: minutes of CPU work, cut short by max_run_s.
json long_job(const std::string& prompt) {
  json body = small_job(prompt, 150, 7);
  body["width"] = body["height"] = 128;
  body["num_images"] = 16;
  return body;
}

// The service's max_run_s stops a long job between UNet steps: the job, its events, /metrics,
// /v1/generate and A1111's txt2img all say timed_out (distinct from expired); a request may ask
// for a shorter limit but not a longer one; a normal job still succeeds.
TEST(LimitsTest, JobRunningPastMaxRunSEndsTimedOutEverywhere) {
  ServerProcess server({"--max-run-s", "1"});
  const int port = server.port();

  // A request's own limit must lie within the service's.
  json too_long = small_job("asks for more time", 2, 1);
  too_long["max_run_s"] = 2;
  const auto refused = post(port, "/v1/jobs", too_long);
  EXPECT_EQ(refused.status, 400) << refused.body;
  EXPECT_EQ(refused.body_json()["error"]["field"], "max_run_s");
  EXPECT_NE(refused.body.find("at most 1"), std::string::npos) << refused.body;
  too_long["max_run_s"] = 0;
  EXPECT_EQ(post(port, "/v1/jobs", too_long).status, 400);

  const auto start = std::chrono::steady_clock::now();
  const json accepted = submit(port, long_job("runs out of time"));
  const std::string id = accepted.at("id");
  WsClient events;
  ASSERT_TRUE(events.connect(port, "/v1/jobs/" + id + "/events"));
  const auto final_event =
      events.next_json([](const json& j) { return is_final_type(j.value("type", "")); });
  ASSERT_TRUE(final_event);
  EXPECT_EQ((*final_event)["type"], "timed_out") << final_event->dump();
  EXPECT_NE((*final_event)["error"].get<std::string>().find("max_run_s (1 s)"), std::string::npos)
      << final_event->dump();
  // Stopped within the limit plus a step or two, not after its 2,400 image-steps.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));

  const json view = get(port, "/v1/jobs/" + id).body_json();
  EXPECT_EQ(view["status"], "timed_out");
  EXPECT_TRUE(view["images"].empty());
  EXPECT_LT(view["step"].get<int>(), 150);
  EXPECT_LT(view["timings"]["run_s"].get<double>(), 20.0);
  EXPECT_EQ(get(port, "/v1/jobs/" + id + "/images/0").status, 409);  // never ready
  EXPECT_TRUE(wait_metric(port, "sdserve_jobs_finished_total{status=\"timed_out\"}", 1));
  EXPECT_EQ(metric(port, "sdserve_jobs_finished_total{status=\"expired\"}"), 0);

  // /v1/generate answers it as a failed job, with its own type.
  const auto generated = post(port, "/v1/generate", long_job("generate runs out of time"));
  EXPECT_EQ(generated.status, 500) << generated.body;
  EXPECT_EQ(generated.body_json()["error"]["type"], "timed_out");

  // A1111's txt2img answers an error, as A1111 does for a failed generation.
  const auto a1111 = post(port, "/sdapi/v1/txt2img",
                          json{{"prompt", "txt2img runs out of time"},
                               {"steps", 150},
                               {"width", 128},
                               {"height", 128},
                               {"batch_size", 16}});
  EXPECT_EQ(a1111.status, 500) << a1111.body;
  EXPECT_EQ(metric(port, "sdserve_jobs_finished_total{status=\"timed_out\"}"), 3);

  // A short job within the limit still succeeds.
  const auto small = post(port, "/v1/generate", small_job("fits", 2, 3));
  EXPECT_EQ(small.status, 200) << small.body;
}

// A size whose estimated peak memory (attention's score matrix: 65,536 tokens at 2048x2048)
// cannot fit what the device has is refused with a 400 naming width and the figures, on /v1 and
// A1111's route, while a normal request succeeds. With the default budget (the memory free at
// start-up) and with max_memory_mb.
TEST(LimitsTest, RequestThatCannotFitInMemoryIsRefusedUpFront) {
  {
    ServerProcess server;
    const int port = server.port();
    json huge = small_job("too big for memory", 2, 1);
    huge["width"] = huge["height"] = 2048;
    const auto r = post(port, "/v1/jobs", huge);
    ASSERT_EQ(r.status, 400) << r.body;
    const json err = r.body_json()["error"];
    EXPECT_EQ(err["type"], "validation_error");
    EXPECT_EQ(err["field"], "width");
    const std::string message = err["message"];
    for (const char* words :
         {"2048x2048", "estimated", "for one image", "available", "max_memory_mb", "num_images"})
      EXPECT_NE(message.find(words), std::string::npos) << words << " in " << message;
    const auto a1111 =
        post(port, "/sdapi/v1/txt2img",
             json{{"prompt", "too big"}, {"steps", 2}, {"width", 2048}, {"height", 2048}});
    EXPECT_EQ(a1111.status, 400) << a1111.body;
    EXPECT_EQ(a1111.body_json()["error"]["field"], "width");
    const auto normal = post(port, "/v1/generate", small_job("fits", 2, 2));
    EXPECT_EQ(normal.status, 200) << normal.body;
  }
  {
    ServerProcess server({"--max-memory-mb", "100"});
    const int port = server.port();
    json big = small_job("past max_memory_mb", 2, 3);
    big["width"] = big["height"] = 512;  // 2.1 GB of attention scores for one image
    const auto r = post(port, "/v1/jobs", big);
    ASSERT_EQ(r.status, 400) << r.body;
    EXPECT_NE(r.body.find("max_memory_mb)"), std::string::npos) << r.body;
    EXPECT_EQ(post(port, "/v1/generate", small_job("fits", 2, 4)).status, 200);
  }
}

}  // namespace
}  // namespace sdserve::itest
