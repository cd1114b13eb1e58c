#include "sdload/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace sdload {
namespace {

using json = nlohmann::ordered_json;

double nth(const std::vector<double>& sorted, double p) {
  const size_t rank =
      static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

json to_json(const Percentiles& p) {
  if (p.n == 0) return {{"n", 0}};
  return {{"n", p.n},     {"p50", p.p50}, {"p90", p.p90},
          {"p99", p.p99}, {"max", p.max}, {"mean", p.mean}};
}

double per_second(double count, double seconds) {
  return seconds > 0 ? count / seconds : 0.0;
}

void count_outcome(RunSummary& s, Outcome o) {
  switch (o) {
    case Outcome::kSucceeded:
      ++s.succeeded;
      break;
    case Outcome::kFailed:
      ++s.failed;
      break;
    case Outcome::kRejected:
      ++s.rejected;
      break;
    case Outcome::kCancelled:
      ++s.cancelled;
      break;
    case Outcome::kExpired:
      ++s.expired;
      break;
  }
}

}  // namespace

const char* to_string(Outcome o) {
  switch (o) {
    case Outcome::kSucceeded:
      return "succeeded";
    case Outcome::kFailed:
      return "failed";
    case Outcome::kRejected:
      return "rejected";
    case Outcome::kCancelled:
      return "cancelled";
    case Outcome::kExpired:
      return "expired";
  }
  return "?";
}

Percentiles percentiles(std::vector<double> values) {
  Percentiles p;
  values.erase(std::remove_if(values.begin(), values.end(), [](double v) { return v < 0; }),
               values.end());
  p.n = values.size();
  if (values.empty()) return p;
  std::sort(values.begin(), values.end());
  p.p50 = nth(values, 50);
  p.p90 = nth(values, 90);
  p.p99 = nth(values, 99);
  p.max = values.back();
  p.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(p.n);
  return p;
}

bool RunSummary::counts_add_up() const {
  return submitted == records && submitted == succeeded + failed + rejected + cancelled + expired;
}

long RunSummary::error_total() const {
  long n = 0;
  for (const auto& [cls, keys] : errors)
    for (const auto& [key, count] : keys) n += count;
  return n;
}

RunSummary summarize(const RunResult& run) {
  RunSummary s;
  s.spec = run.spec;
  s.url = run.url;
  s.duration_s = run.duration_s;
  s.submit_window_s = run.submit_window_s;
  s.elapsed_s = run.elapsed_s;
  s.drain_timed_out = run.drain_timed_out;
  s.interrupted = run.interrupted;
  s.submitted = run.submitted;
  s.records = static_cast<long>(run.records.size());
  std::vector<double> submit, queue, first, final_event, e2e;
  for (const JobRecord& r : run.records) {
    count_outcome(s, r.outcome);
    s.images_expected += r.images_expected;
    s.images_fetched += r.images_fetched;
    s.images_decoded += r.images_decoded;
    s.decode_failures += r.decode_failures;
    for (const auto& [cls, key] : r.errors) ++s.errors[cls][key];
    // The message goes with the job's most specific error (a 4xx's server error type).
    if (!r.errors.empty() && !r.error_message.empty()) {
      const std::string where = r.errors.back().first + "/" + r.errors.back().second;
      if (!s.error_examples.count(where)) s.error_examples[where] = r.error_message.substr(0, 200);
    }
    submit.push_back(r.submit_s);
    if (r.outcome != Outcome::kSucceeded) continue;
    queue.push_back(r.queue_s);
    first.push_back(r.first_step_s);
    final_event.push_back(r.final_s);
    e2e.push_back(r.e2e_s);
  }
  s.submit = percentiles(std::move(submit));
  s.queue_wait = percentiles(std::move(queue));
  s.first_step = percentiles(std::move(first));
  s.final_event = percentiles(std::move(final_event));
  s.e2e = percentiles(std::move(e2e));
  long images_ok = 0;
  for (const JobRecord& r : run.records)
    if (r.outcome == Outcome::kSucceeded) images_ok += r.images_fetched;
  s.completed_img_per_s = per_second(static_cast<double>(images_ok), s.elapsed_s);
  s.completed_jobs_per_s = per_second(static_cast<double>(s.succeeded), s.elapsed_s);
  s.submitted_per_s = per_second(static_cast<double>(s.submitted), s.submit_window_s);
  return s;
}

json to_json(const RunSummary& s) {
  json j = {
      {"label", s.spec.label}, {"url", s.url}, {"mode", s.spec.open_loop ? "open" : "closed"}};
  if (s.spec.open_loop)
    j["offered_img_per_s"] = s.spec.rate;
  else
    j["clients"] = s.spec.clients;
  j["duration_s"] = s.duration_s;
  j["submit_window_s"] = s.submit_window_s;
  j["elapsed_s"] = s.elapsed_s;
  j["drain_timed_out"] = s.drain_timed_out;
  j["interrupted"] = s.interrupted;
  j["counts"] = {{"submitted", s.submitted}, {"succeeded", s.succeeded}, {"failed", s.failed},
                 {"rejected", s.rejected},   {"cancelled", s.cancelled}, {"expired", s.expired}};
  j["counts_add_up"] = s.counts_add_up();
  j["images"] = {{"expected", s.images_expected},
                 {"fetched", s.images_fetched},
                 {"decoded", s.images_decoded},
                 {"decode_failures", s.decode_failures}};
  j["throughput"] = {{"completed_img_per_s", s.completed_img_per_s},
                     {"completed_jobs_per_s", s.completed_jobs_per_s},
                     {"submitted_jobs_per_s", s.submitted_per_s}};
  j["latency_s"] = {{"submit", to_json(s.submit)},
                    {"queue_wait", to_json(s.queue_wait)},
                    {"first_step", to_json(s.first_step)},
                    {"final_event", to_json(s.final_event)},
                    {"e2e", to_json(s.e2e)}};
  j["errors"] = json::object();
  for (const auto& [cls, keys] : s.errors) j["errors"][cls] = keys;
  j["error_examples"] = s.error_examples;
  return j;
}

}  // namespace sdload
