// Clients that misbehave (vanish mid-stream, never read, hang up on /v1/generate) and the
// SIGTERM drain.
#include <signal.h>

#include <gtest/gtest.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include "harness.h"

namespace sdserve::itest {
namespace {

namespace asio = boost::asio;

std::string id_of(const json& j) {
  return j["id"].get<std::string>();
}

// Polls GET /v1/jobs/{id} until its status is `status`.
bool wait_status(int port, const std::string& id, const std::string& status) {
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (get(port, "/v1/jobs/" + id).body_json().value("status", "") == status) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

// A raw connection that sends one request and is then dropped without reading anything.
class RawClient {
 public:
  explicit RawClient(int port) : socket_(ioc_) {
    socket_.connect({asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)});
  }
  void send_post(const std::string& target, const std::string& body) {
    const std::string req = "POST " + target +
                            " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            "Content-Length: " +
                            std::to_string(body.size()) + "\r\n\r\n" + body;
    asio::write(socket_, asio::buffer(req));
  }
  void drop() {
    boost::system::error_code ec;
    socket_.set_option(asio::socket_base::linger(true, 0), ec);  // RST, like a crashed client
    socket_.close(ec);
  }

 private:
  asio::io_context ioc_;
  asio::ip::tcp::socket socket_;
};

TEST(RobustnessTest, ClientVanishingMidStreamDisturbsNothing) {
  ServerProcess server;
  const int port = server.port();
  json body = small_job("watched then abandoned", 40, 8);
  body["preview"] = {{"every", 1}, {"format", "png"}};
  const std::string a = id_of(submit(port, body));
  {
    WsClient ws;
    ASSERT_TRUE(ws.connect(port, "/v1/jobs/" + a + "/events"));
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(ws.next()) << "frame " << i;
    ws.abort();
  }
  const std::string b = id_of(submit(port, small_job("bystander", 4, 9)));
  EXPECT_EQ(wait_final(port, b), "succeeded");
  // Without cancel_on_disconnect the abandoned job simply finishes.
  EXPECT_TRUE(wait_status(port, a, "succeeded"));
  EXPECT_EQ(get(port, "/healthz").status, 200);
}

TEST(RobustnessTest, ClientThatNeverReadsDisturbsNothing) {
  ServerProcess server({"--ws-queue-limit", "4"});
  const int port = server.port();
  // 30 steps of PNG VAE previews: far more events than the 4-deep queue holds.
  json body = small_job("flooding previews", 30, 10);
  body["preview"] = {{"every", 1}, {"format", "png"}, {"method", "vae"}};
  const std::string a = id_of(submit(port, body));
  // Sockets on the job that do not read, with tiny receive buffers: one never reads, one
  // starts reading once the job is over.
  WsClient stuck, multi_stuck, late_reader;
  ASSERT_TRUE(stuck.connect(port, "/v1/jobs/" + a + "/events", {}, false, 1024));
  ASSERT_TRUE(multi_stuck.connect(port, "/v1/events", {}, false, 1024));
  multi_stuck.send_text(json{{"subscribe", a}}.dump());
  ASSERT_TRUE(late_reader.connect(port, "/v1/jobs/" + a + "/events", {}, false, 1024));

  // Other clients are served meanwhile, and the flooding job itself completes.
  const auto other = post(port, "/v1/generate", small_job("served meanwhile", 4, 12));
  EXPECT_EQ(other.status, 200);
  EXPECT_EQ(wait_final(port, a), "succeeded");

  // The slow reader lost previews, not the final event.
  late_reader.start_reading();
  int previews = 0;
  const auto final_event = late_reader.next_json([&](const json& j) {
    previews += j.value("type", "") == "preview";
    return is_final_type(j.value("type", ""));
  });
  ASSERT_TRUE(final_event);
  EXPECT_EQ((*final_event)["type"], "succeeded");
  EXPECT_LT(previews, 30);

  stuck.abort();
  multi_stuck.abort();
  EXPECT_TRUE(wait_metric(port, "sdserve_websocket_connections", 0));
  EXPECT_GT(metric(port, "sdserve_websocket_events_dropped_total"), 0);
  EXPECT_EQ(get(port, "/healthz").status, 200);
  const std::string c = id_of(submit(port, small_job("after", 2, 13)));
  EXPECT_EQ(wait_final(port, c), "succeeded");
}

TEST(RobustnessTest, GenerateClientHangingUpCancelsItsJob) {
  ServerProcess server;
  const int port = server.port();
  json body = small_job("abandoned generate", 150, 14);
  body["cancel_on_disconnect"] = true;
  RawClient client(port);
  client.send_post("/v1/generate", body.dump());
  ASSERT_TRUE(wait_metric(port, "sdserve_running_jobs", 1)) << "the job never ran";
  client.drop();
  EXPECT_TRUE(wait_metric(port, "sdserve_jobs_finished_total{status=\"cancelled\"}", 1));
  EXPECT_TRUE(wait_metric(port, "sdserve_running_jobs", 0));
}

TEST(RobustnessTest, LastSubscriberLeavingCancelsWhenAsked) {
  ServerProcess server;
  const int port = server.port();
  json body = small_job("watched, cancel on disconnect", 150, 15);
  body["cancel_on_disconnect"] = true;
  const std::string a = id_of(submit(port, body));
  WsClient ws;
  ASSERT_TRUE(ws.connect(port, "/v1/jobs/" + a + "/events"));
  ASSERT_TRUE(ws.next_json(shows_running));
  ws.abort();
  EXPECT_TRUE(wait_status(port, a, "cancelled"));
}

TEST(RobustnessTest, SigtermDrainsThenExitsZero) {
  ServerProcess server;
  const int port = server.port();
  const std::string a = id_of(submit(port, small_job("in flight at SIGTERM", 60, 16)));
  WsClient job_events, multi;
  ASSERT_TRUE(job_events.connect(port, "/v1/jobs/" + a + "/events"));
  ASSERT_TRUE(multi.connect(port, "/v1/events"));
  ASSERT_TRUE(job_events.next_json(shows_running));

  server.signal(SIGTERM);
  ASSERT_TRUE(server.wait_log("shutting down"));
  // No new work: 503 while draining, or refused once the listener is gone.
  const auto refused = post(port, "/v1/jobs", small_job("too late"));
  EXPECT_TRUE(refused.status == 503 || refused.status == 0)
      << refused.status << " " << refused.body;
  if (refused.status == 503) {
    EXPECT_EQ(refused.body_json()["error"]["type"], "shutting_down");
  }

  // The job in flight finishes, its socket closes normally, the idle one with "going away".
  const auto final_a =
      job_events.next_json([](const json& j) { return is_final_type(j.value("type", "")); });
  ASSERT_TRUE(final_a);
  EXPECT_EQ((*final_a)["type"], "succeeded");
  int code = 0;
  EXPECT_TRUE(job_events.wait_closed(kTimeout, &code));
  EXPECT_EQ(code, 1000);
  EXPECT_TRUE(multi.wait_closed(kTimeout, &code));
  EXPECT_EQ(code, 1001);

  const auto status = server.wait_exit();
  ASSERT_TRUE(status) << "still running";
  EXPECT_EQ(*status, 0);
}

}  // namespace
}  // namespace sdserve::itest
