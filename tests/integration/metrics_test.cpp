// /metrics after real traffic (issue #10): a succeeded, a cancelled and two rejected jobs move
// the job counters, the histograms and the HTTP families as they should.
#include <gtest/gtest.h>

#include <chrono>

#include "tests/integration/harness.h"

namespace sdserve::itest {
namespace {

std::string id_of(const json& job) {
  return job.value("id", "");
}

TEST(MetricsTest, CountersAndHistogramsFollowRealTraffic) {
  // One waiting job at most, one image per UNet call: the second waiting job is refused.
  ServerProcess server({"--max-queue", "1", "--max-batch", "1"});
  const int port = server.port();
  EXPECT_EQ(metric(port, "sdserve_max_queue"), 1);
  EXPECT_EQ(metric(port, "sdserve_worker_ready{device=\"cpu\"}"), 1);

  json long_job = small_job("long, then cancelled", 150, 21);
  long_job["preview"] = {{"every", 1}, {"format", "png"}};
  const std::string a = id_of(submit(port, long_job));
  WsClient watcher;  // previews count as sent when someone follows the job
  ASSERT_TRUE(watcher.connect(port, "/v1/jobs/" + a + "/events"));
  ASSERT_TRUE(watcher.next_json([](const json& e) { return e.value("type", "") == "preview"; }));
  ASSERT_TRUE(wait_metric(port, "sdserve_job_first_step_seconds_count", 1))
      << "the first job never stepped";
  json low = small_job("waits, then succeeds", 2, 22);
  low["priority"] = "low";
  const std::string b = id_of(submit(port, low));
  EXPECT_EQ(metric(port, "sdserve_queued_jobs{priority=\"low\"}"), 1);
  EXPECT_EQ(metric(port, "sdserve_queued_jobs{priority=\"normal\"}"), 0);
  // b waits behind a (max_batch 1): the oldest waiting job's age grows.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_GE(metric(port, "sdserve_queue_oldest_job_age_seconds"), 0.25);
  EXPECT_EQ(post(port, "/v1/jobs", small_job("no room", 2, 23)).status, 429);
  json invalid = small_job("invalid", 2, 24);
  invalid["steps"] = 0;
  EXPECT_EQ(post(port, "/v1/jobs", invalid).status, 400);
  EXPECT_EQ(http(port, verb::delete_, "/v1/jobs/" + a).status, 200);
  EXPECT_EQ(wait_final(port, a), "cancelled");
  EXPECT_EQ(wait_final(port, b), "succeeded");
  EXPECT_EQ(metric(port, "sdserve_queue_oldest_job_age_seconds"), 0);  // none waiting

  EXPECT_EQ(metric(port, "sdserve_jobs_submitted_total"), 2);
  EXPECT_EQ(metric(port, "sdserve_jobs_finished_total{status=\"succeeded\"}"), 1);
  EXPECT_EQ(metric(port, "sdserve_jobs_finished_total{status=\"cancelled\"}"), 1);
  EXPECT_EQ(metric(port, "sdserve_jobs_finished_total{status=\"failed\"}"), 0);
  EXPECT_EQ(metric(port, "sdserve_jobs_rejected_total{reason=\"queue_full\"}"), 1);
  EXPECT_EQ(metric(port, "sdserve_jobs_rejected_total{reason=\"invalid\"}"), 1);
  // Both jobs waited in the queue and stepped; only the succeeded one has an end-to-end time.
  EXPECT_EQ(metric(port, "sdserve_job_queue_wait_seconds_count"), 2);
  EXPECT_EQ(metric(port, "sdserve_job_first_step_seconds_count"), 2);
  EXPECT_EQ(metric(port, "sdserve_job_latency_seconds_count"), 1);
  EXPECT_EQ(metric(port, "sdserve_job_run_seconds_count"), 1);
  EXPECT_GT(metric(port, "sdserve_job_latency_seconds_sum"), 0);
  // Every UNet call held one image (max_batch 1): a call per step of b, at least one of a.
  const double calls = metric(port, "sdserve_unet_batch_images_count");
  EXPECT_GE(calls, 3);
  EXPECT_EQ(metric(port, "sdserve_unet_batch_images_sum"), calls);
  EXPECT_EQ(metric(port, "sdserve_unet_batch_images_bucket{le=\"1\"}"), calls);
  EXPECT_EQ(metric(port, "sdserve_unet_step_seconds_count{bucket=\"1\"}"), calls);
  EXPECT_EQ(metric(port, "sdserve_unet_steps_total"), calls);
  // Two rows per image with CFG; no padding on the CPU (CUDA graphs pad up to a bucket).
  EXPECT_EQ(metric(port, "sdserve_unet_rows_total"), 2 * calls);
  EXPECT_EQ(metric(port, "sdserve_unet_padded_rows_count"), calls);
  EXPECT_EQ(metric(port, "sdserve_unet_padded_rows_sum"), 0);
  EXPECT_GE(metric(port, "sdserve_vae_decode_seconds_count"), 1);
  // One decode call per image decoded (decode_batch 1).
  EXPECT_EQ(metric(port, "sdserve_vae_decode_images_count"),
            metric(port, "sdserve_vae_decode_seconds_count"));
  EXPECT_EQ(metric(port, "sdserve_vae_decode_images_sum"),
            metric(port, "sdserve_vae_decode_images_count"));
  EXPECT_GE(metric(port, "sdserve_previews_total{result=\"sent\"}"), 1);  // a's, every step
  EXPECT_EQ(metric(port, "sdserve_queued_jobs{priority=\"low\"}"), 0);
  // HTTP by route template and status class, never by raw path.
  EXPECT_EQ(
      metric(port, "sdserve_http_request_duration_seconds_count{code=\"2xx\",route=\"/v1/jobs\"}"),
      2);
  EXPECT_EQ(
      metric(port, "sdserve_http_request_duration_seconds_count{code=\"4xx\",route=\"/v1/jobs\"}"),
      2);
  EXPECT_GE(
      metric(port,
             "sdserve_http_request_duration_seconds_count{code=\"2xx\",route=\"/v1/jobs/{id}\"}"),
      1);
  const std::string body = get(port, "/metrics").body;
  EXPECT_EQ(body.find("/v1/jobs/" + a), std::string::npos) << "a raw path became a label";
  EXPECT_NE(body.find("sdserve_build_info{"), std::string::npos);
  EXPECT_NE(body.find("sdserve_model_info{"), std::string::npos);
  EXPECT_NE(body.find("device=\"cpu\""), std::string::npos);
  // The CPU has no allocator statistics: zero, not absent.
  EXPECT_EQ(metric(port, "sdserve_torch_allocated_bytes{device=\"cpu\"}"), 0);
  // Scrapes above spanned the whole run: images finished per second is a positive rate.
  EXPECT_GT(metric(port, "sdserve_images_per_second"), 0);
  EXPECT_GT(metric(port, "sdserve_iterations_per_second"), 0);
}

TEST(MetricsTest, RequestIdsAreEchoedLoggedAndKeptWithTheJob) {
  ServerProcess server;
  const int port = server.port();
  EXPECT_EQ(get(port, "/v1/models", {{"X-Request-Id", "client-id.7"}}).header("x-request-id"),
            "client-id.7");
  // None, or one unfit for a header and a log line: the server makes one.
  for (const Headers& h : {Headers{}, Headers{{"X-Request-Id", "has spaces \"and quotes\""}}}) {
    const std::string made = get(port, "/v1/models", h).header("x-request-id");
    EXPECT_EQ(made.size(), 32u) << made;
    EXPECT_EQ(made.find_first_not_of("0123456789abcdef"), std::string::npos) << made;
  }
  const auto r = post(port, "/v1/jobs", small_job("traced", 2, 31), {{"X-Request-Id", "trace-42"}});
  ASSERT_EQ(r.status, 202) << r.body;
  EXPECT_EQ(r.header("x-request-id"), "trace-42");
  EXPECT_EQ(r.body_json()["request_id"], "trace-42");
  const std::string id = r.body_json()["id"];
  EXPECT_EQ(wait_final(port, id), "succeeded");
  EXPECT_EQ(get(port, "/v1/jobs/" + id).body_json()["request_id"], "trace-42");
  EXPECT_TRUE(server.wait_log("POST /v1/jobs 202"));
  EXPECT_TRUE(server.wait_log("req=trace-42 job=" + id));                 // the request's line
  EXPECT_TRUE(server.wait_log("job " + id + " succeeded req=trace-42"));  // the job's last line
  // Probes stay out of the info-level log.
  ASSERT_EQ(get(port, "/healthz").status, 200);
  ASSERT_EQ(get(port, "/v1/samplers").status, 200);
  ASSERT_TRUE(server.wait_log("GET /v1/samplers 200"));
  EXPECT_EQ(server.log().find("GET /healthz"), std::string::npos);
}

// The process_* families (issue #23), from /proc, with values that fit this process.
TEST(MetricsTest, ProcessFamiliesDescribeTheProcess) {
  const auto started = std::chrono::system_clock::now();
  ServerProcess server;
  const int port = server.port();
  const double start = metric(port, "process_start_time_seconds");
  const double since_epoch = std::chrono::duration<double>(started.time_since_epoch()).count();
  EXPECT_GT(start, since_epoch - 5);
  EXPECT_LT(start, since_epoch + 120);
  EXPECT_GT(metric(port, "process_resident_memory_bytes"), 10e6);  // libtorch alone is more
  const double fds = metric(port, "process_open_fds");
  EXPECT_GE(fds, 4);  // stdin/out/err and the listening socket at least
  EXPECT_GE(metric(port, "process_max_fds"), fds);
  EXPECT_GT(metric(port, "process_cpu_seconds_total"), 0);  // it loaded and warmed up a model
}

}  // namespace
}  // namespace sdserve::itest
