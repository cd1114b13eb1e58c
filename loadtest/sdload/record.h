// What one run measured: a record per submitted job, and how the run went.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace sdload {

// Every submitted job ends as exactly one of these. A 429 is a rejection, not a failure; a job
// whose outcome sdload could not learn (connection lost, run abandoned) counts as failed.
enum class Outcome { kSucceeded, kFailed, kRejected, kCancelled, kExpired };
const char* to_string(Outcome o);

struct JobRecord {
  Outcome outcome = Outcome::kFailed;
  // (class, key) per error, e.g. ("connection", "submit: refused"), ("http_status", "4xx"),
  // ("server", "validation_error"), ("protocol", "submit: no job id"), ("image", "decode"),
  // ("aborted", "drain_timeout").
  std::vector<std::pair<std::string, std::string>> errors;
  std::string error_message;  // the first error's text from the server, when it sent one

  // Seconds from the start of the POST; -1 when not reached.
  double submit_s = -1;       // POST round trip
  double queue_s = -1;        // queue wait: the server's timings.queue_s, else to `started`
  double first_step_s = -1;   // first `progress` event
  double final_s = -1;        // final event
  double e2e_s = -1;          // images fetched (the final event when there are none)
  double ended_at_s = 0;      // when the record was complete, from the start of the run
  double retry_after_s = -1;  // a 429's Retry-After
  bool accepted = false;      // the POST got its 202

  int images_expected = 0;
  int images_fetched = 0;
  int images_decoded = 0;
  int decode_failures = 0;

  void add_error(std::string cls, std::string key) {
    errors.emplace_back(std::move(cls), std::move(key));
  }
};

// One run: open loop at a rate, or closed loop with a number of clients.
struct RunSpec {
  std::string label;  // "2 img/s", "4 clients"
  bool open_loop = true;
  double rate = 0;  // offered images per second (open loop)
  int clients = 0;  // closed loop
};

struct RunResult {
  RunSpec spec;
  std::string url;
  long submitted = 0;  // counted at submission, apart from the records, to check them
  std::vector<JobRecord> records;
  double duration_s = 0;       // the submission window asked for
  double submit_window_s = 0;  // how long submissions actually went on
  double elapsed_s = 0;        // start to the last job's end
  bool drain_timed_out = false;
  bool interrupted = false;
};

}  // namespace sdload
