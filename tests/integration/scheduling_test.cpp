// Admission and batching seen from outside: 429 when the queue is full, cancelling queued and
// running jobs, step-level admission, and pixels that do not depend on the batch.
#include <gtest/gtest.h>

#include "harness.h"
#include "pipeline/image.h"

namespace sdserve::itest {
namespace {

// Long enough that the tests below act while it runs; they cancel it rather than wait.
json long_job(const std::string& prompt) {
  return small_job(prompt, 150, 11);
}

std::string id_of(const json& j) {
  return j["id"].get<std::string>();
}

std::function<bool(const json&)> running(const std::string& id) {
  return [id](const json& ev) { return ev.value("job_id", "") == id && shows_running(ev); };
}

pipeline::RgbImage fetch_image(int port, const std::string& id) {
  const auto r = get(port, "/v1/jobs/" + id + "/images/0");
  EXPECT_EQ(r.status, 200) << r.body;
  return pipeline::decode_png(std::vector<uint8_t>(r.body.begin(), r.body.end()));
}

TEST(SchedulingTest, QueueFullIs429AndCancelWorksQueuedAndRunning) {
  ServerProcess server({"--max-queue", "1", "--max-batch", "1"});
  const int port = server.port();

  const json a = submit(port, long_job("runs"));
  WsClient events_a;
  ASSERT_TRUE(events_a.connect(port, "/v1/jobs/" + id_of(a) + "/events"));
  ASSERT_TRUE(events_a.next_json(shows_running)) << "job A never started";

  // A runs (max_batch 1), B waits in the only queue slot, C does not fit.
  const json b = submit(port, small_job("waits"));
  EXPECT_EQ(b["status"], "queued");
  EXPECT_EQ(b["queue_position"], 0);
  const auto c = post(port, "/v1/jobs", small_job("refused"));
  ASSERT_EQ(c.status, 429) << c.body;
  EXPECT_EQ(c.body_json()["error"]["type"], "queue_full");
  const std::string retry = c.header("retry-after");
  ASSERT_FALSE(retry.empty());
  EXPECT_GE(std::stoi(retry), 1);
  // /v1/generate is refused the same way.
  EXPECT_EQ(post(port, "/v1/generate", small_job("refused too")).status, 429);

  // Cancel the queued job.
  const auto del_b = http(port, verb::delete_, "/v1/jobs/" + id_of(b));
  ASSERT_EQ(del_b.status, 200) << del_b.body;
  EXPECT_EQ(del_b.body_json()["id"], id_of(b));
  EXPECT_EQ(del_b.body_json()["cancel_requested"], true);
  EXPECT_EQ(wait_final(port, id_of(b)), "cancelled");
  EXPECT_EQ(get(port, "/v1/jobs/" + id_of(b)).body_json()["status"], "cancelled");
  EXPECT_EQ(get(port, "/v1/jobs/" + id_of(b) + "/images/0").status, 409);

  // Cancel the running one: its event stream ends with "cancelled".
  const auto del_a = http(port, verb::delete_, "/v1/jobs/" + id_of(a));
  ASSERT_EQ(del_a.status, 200) << del_a.body;
  const auto final_a =
      events_a.next_json([](const json& j) { return is_final_type(j.value("type", "")); });
  ASSERT_TRUE(final_a);
  EXPECT_EQ((*final_a)["type"], "cancelled");
  EXPECT_TRUE(events_a.wait_closed());
  const json after = get(port, "/v1/jobs/" + id_of(a)).body_json();
  EXPECT_EQ(after["status"], "cancelled");
  EXPECT_LT(after["step"].get<int>(), 150);
  EXPECT_EQ(http(port, verb::delete_, "/v1/jobs/" + id_of(a)).status, 409);

  // Room again.
  const json d = submit(port, small_job("fits now"));
  EXPECT_EQ(wait_final(port, id_of(d)), "succeeded");
}

TEST(SchedulingTest, NewJobStartsWhileALongOneRuns) {
  ServerProcess server;
  const int port = server.port();
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/events"));

  const std::string a = id_of(submit(port, long_job("long")));
  ws.send_text(json{{"subscribe", a}}.dump());
  ASSERT_TRUE(ws.next_json(running(a)));

  const std::string b = id_of(submit(port, small_job("short", 10, 5)));
  ws.send_text(json{{"subscribe", b}}.dump());
  // Step-level admission: B starts, and here even finishes, while A is still denoising.
  bool a_ended = false;
  const auto b_done = ws.next_json([&](const json& j) {
    const std::string id = j.value("job_id", "");
    if (id == a && is_final_type(j.value("type", ""))) a_ended = true;
    return id == b && is_final_type(j.value("type", ""));
  });
  ASSERT_TRUE(b_done);
  EXPECT_EQ((*b_done)["type"], "succeeded");
  EXPECT_FALSE(a_ended) << "A ended before B";
  const json job_a = get(port, "/v1/jobs/" + a).body_json();
  const json job_b = get(port, "/v1/jobs/" + b).body_json();
  EXPECT_EQ(job_a["status"], "running");
  EXPECT_TRUE(job_a["timings"]["finished"].is_null());
  EXPECT_TRUE(job_b["timings"]["started"].is_string());
  EXPECT_TRUE(job_b["timings"]["finished"].is_string());
  EXPECT_EQ(http(port, verb::delete_, "/v1/jobs/" + a).status, 200);
}

TEST(SchedulingTest, PixelsDoNotDependOnTheBatch) {
  ServerProcess server;
  const int port = server.port();
  const json x = small_job("a lighthouse at dusk", 6, 4242);

  // Alone.
  const std::string alone = id_of(submit(port, x));
  ASSERT_EQ(wait_final(port, alone), "succeeded");
  const auto ref = fetch_image(port, alone);

  // Joining a batch that is already running.
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/events"));
  const std::string other = id_of(submit(port, long_job("a different prompt")));
  ws.send_text(json{{"subscribe", other}}.dump());
  ASSERT_TRUE(ws.next_json(running(other)));
  const std::string batched = id_of(submit(port, x));
  ws.send_text(json{{"subscribe", batched}}.dump());
  bool other_ended = false;
  const auto done = ws.next_json([&](const json& j) {
    other_ended |= j.value("job_id", "") == other && is_final_type(j.value("type", ""));
    return j.value("job_id", "") == batched && is_final_type(j.value("type", ""));
  });
  ASSERT_TRUE(done);
  ASSERT_EQ((*done)["type"], "succeeded");
  EXPECT_FALSE(other_ended) << "the two jobs did not share batches";

  // Submitted together with other work (a 2-image job of another seed): the three images also
  // finish at the same step, so they are decoded together too.
  json pair = small_job("something else", 6, 77);
  pair["num_images"] = 2;
  const std::string p = id_of(submit(port, pair));
  const std::string together = id_of(submit(port, x));
  EXPECT_EQ(wait_final(port, together), "succeeded");
  EXPECT_EQ(wait_final(port, p), "succeeded");
  EXPECT_EQ(http(port, verb::delete_, "/v1/jobs/" + other).status, 200);

  for (const auto& [how, id] :
       {std::pair<std::string, std::string>{"joining a running batch", batched},
        {"submitted with other work", together}}) {
    const auto img = fetch_image(port, id);
    ASSERT_EQ(img.width, ref.width);
    ASSERT_EQ(img.height, ref.height);
    size_t differing = 0;
    int max_diff = 0;
    for (size_t i = 0; i < img.pixels.size(); ++i) {
      differing += img.pixels[i] != ref.pixels[i];
      max_diff = std::max(max_diff, std::abs(img.pixels[i] - ref.pixels[i]));
    }
    // The same image, to float32's last bits: OpenBLAS (as cuBLAS on a GPU) picks its kernels by
    // matrix shape, so a batch rounds differently from one image, which moves a few 8-bit values
    // by 1 (3 of 12,288 bytes measured). Another seed or prompt would change most bytes by far
    // more. Debian's reference BLAS was bit-exact here.
    EXPECT_LE(max_diff, 1) << how;
    EXPECT_LE(differing, img.pixels.size() / 100)
        << how << ": " << differing << " of " << img.pixels.size()
        << " bytes differ from the same request run alone (max " << max_diff << ")";
  }
}

}  // namespace
}  // namespace sdserve::itest
