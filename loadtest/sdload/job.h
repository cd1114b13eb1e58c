// One job's life as a client sees it: POST /v1/jobs, follow the events link over a WebSocket
// (or poll GET /v1/jobs/{id} if that socket is lost), fetch the images, optionally decode them,
// and hand back one JobRecord. Everything runs on the run's single io_context thread.
#pragma once

#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "sdload/net.h"
#include "sdload/record.h"
#include "sdload/workload.h"

namespace sdload {

using Clock = std::chrono::steady_clock;

struct JobContext {
  boost::asio::io_context& ioc;
  const Server& server;
  bool decode = false;
  Clock::time_point run_start;
};

class JobRun : public std::enable_shared_from_this<JobRun> {
 public:
  using Done = std::function<void(JobRecord&&)>;
  JobRun(const JobContext& ctx, JobSpec spec, Done done);

  void start();
  // Gives the job up (drain timeout, second Ctrl-C): it is recorded as failed with `why`, and a
  // job the server still holds is cancelled there, so that it stops using the server.
  void abort(const std::string& why);

 private:
  void on_submitted(HttpReply&& reply);
  void follow_events(const std::string& target);
  void on_event(const std::string& text);
  void on_events_end(const std::string& why);
  void poll();
  void on_poll(HttpReply&& reply);
  void on_final(const nlohmann::json& j);
  void fetch_image(size_t k);
  void on_image(size_t k, HttpReply&& reply);
  void fail_http(const std::string& op, const HttpReply& reply);
  void finish(Outcome outcome);
  double since_submit() const;

  const JobContext& ctx_;
  JobSpec spec_;
  Done done_;
  JobRecord rec_;
  Clock::time_point t0_;
  std::string id_;
  std::vector<std::string> images_;
  std::shared_ptr<HttpCall> http_;
  std::shared_ptr<EventStream> events_;
  boost::asio::steady_timer poll_timer_;
  std::string events_error_;  // why the WebSocket was lost before the final event
  double started_s_ = -1;     // the `started` event, as this client saw it
  bool final_seen_ = false;
  bool finished_ = false;
};

}  // namespace sdload
