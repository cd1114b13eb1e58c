#include "sdload/runner.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/steady_timer.hpp>
#include <cstdio>
#include <map>
#include <memory>

#include "sdload/job.h"

namespace sdload {
namespace {

namespace asio = boost::asio;

std::atomic<int> g_interrupts{0};

extern "C" void on_signal(int) {
  if (g_interrupts.fetch_add(1) + 1 >= 3) _exit(130);
}

constexpr Millis kTick{100};
constexpr int kTicksPerProgressLine = 10;
constexpr Millis kRetryAfterCap{1000};  // a rejected closed-loop client waits at most this

Millis to_millis(double seconds) {
  return Millis(static_cast<long>(seconds * 1000.0));
}

class Runner {
 public:
  Runner(const Options& options, const Server& server, const RunSpec& spec, Workload workload)
      : options_(options),
        workload_(std::move(workload)),
        ctx_{ioc_, server, options.decode, Clock::now()},
        arrival_timer_(ioc_),
        stop_timer_(ioc_),
        drain_timer_(ioc_),
        tick_timer_(ioc_),
        tty_(isatty(STDERR_FILENO) != 0) {
    result_.spec = spec;
    result_.url = server.url;
    result_.duration_s = options.duration_s;
    interrupts_seen_ = g_interrupts.load();
  }

  RunResult run();

 private:
  // Ends the live line first when it rewrites itself on a terminal.
  const char* line_break() const { return tty_ && !options_.quiet ? "\n" : ""; }
  double elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  void launch(int client);
  void on_done(uint64_t key, int client, JobRecord&& rec);
  void next_arrival();
  void stop_submitting();
  void maybe_end();
  void tick();
  void abort_all(const std::string& why);
  void print_progress();

  asio::io_context ioc_;
  const Options& options_;
  Workload workload_;
  JobContext ctx_;
  RunResult result_;
  std::unique_ptr<Arrivals> arrivals_;
  asio::steady_timer arrival_timer_, stop_timer_, drain_timer_, tick_timer_;
  std::map<uint64_t, std::shared_ptr<JobRun>> in_flight_;
  uint64_t next_key_ = 0;
  Clock::time_point start_;
  double next_arrival_s_ = 0;
  bool submitting_ = true;
  bool ended_ = false;
  int interrupts_seen_ = 0;
  int ticks_ = 0;
  long counts_[5] = {};  // by Outcome, for the progress line
  long images_ok_ = 0;
  const bool tty_;
};

RunResult Runner::run() {
  start_ = ctx_.run_start = Clock::now();
  if (result_.spec.open_loop) {
    // The rate is in images; jobs of several images arrive proportionally less often.
    arrivals_ =
        std::make_unique<Arrivals>(result_.spec.rate / workload_.mean_images(), options_.seed);
    next_arrival();
  } else {
    for (int c = 0; c < result_.spec.clients && submitting_; ++c) launch(c);
  }
  if (submitting_ && options_.duration_s > 0) {
    stop_timer_.expires_at(start_ + to_millis(options_.duration_s));
    stop_timer_.async_wait([this](boost::system::error_code ec) {
      if (!ec) stop_submitting();
    });
  }
  tick();
  // Every operation has a deadline, so this ends; the bound below is a second line of defence.
  Clock::time_point ended_at{};
  while (!ioc_.stopped()) {
    ioc_.run_for(kTick);
    if (ended_ && ended_at == Clock::time_point{}) ended_at = Clock::now();
    if (ended_ && Clock::now() - ended_at > 2 * ctx_.server.timeout) ioc_.stop();
  }
  if (!options_.quiet && tty_) std::fputc('\n', stderr);
  double last = 0;
  for (const auto& r : result_.records) last = std::max(last, r.ended_at_s);
  if (submitting_) result_.submit_window_s = elapsed();
  // Throughput is over the window, or longer when jobs were still finishing after it.
  result_.elapsed_s = std::max(result_.submit_window_s, last);
  return std::move(result_);
}

void Runner::launch(int client) {
  if (!submitting_) return;
  if (options_.max_jobs > 0 && result_.submitted >= options_.max_jobs) return stop_submitting();
  ++result_.submitted;
  const uint64_t key = next_key_++;
  auto job = std::make_shared<JobRun>(ctx_, workload_.next(), [this, key, client](JobRecord&& r) {
    on_done(key, client, std::move(r));
  });
  in_flight_.emplace(key, job);
  job->start();
  if (options_.max_jobs > 0 && result_.submitted >= options_.max_jobs) stop_submitting();
}

void Runner::next_arrival() {
  next_arrival_s_ += arrivals_->next_gap_s();
  // Past the window: the stop timer ends submissions at the duration itself.
  if (options_.duration_s > 0 && next_arrival_s_ >= options_.duration_s) return;
  arrival_timer_.expires_at(start_ + to_millis(next_arrival_s_));
  arrival_timer_.async_wait([this](boost::system::error_code ec) {
    if (ec || !submitting_) return;
    // Open loop: arrivals do not wait for answers, however slow the server is.
    launch(-1);
    if (submitting_) next_arrival();
  });
}

void Runner::on_done(uint64_t key, int client, JobRecord&& rec) {
  ++counts_[static_cast<int>(rec.outcome)];
  if (rec.outcome == Outcome::kSucceeded) images_ok_ += rec.images_fetched;
  // A closed-loop client whose job was refused (429, 503, no connection...) waits a little
  // before its next one, instead of spinning on refusals that come back at once.
  Millis wait{0};
  if (!rec.accepted)
    wait = rec.outcome == Outcome::kRejected && rec.retry_after_s > 0
               ? std::min(kRetryAfterCap, to_millis(rec.retry_after_s))
               : kRetryAfterCap;
  result_.records.push_back(std::move(rec));
  in_flight_.erase(key);
  if (client >= 0 && submitting_) {
    if (wait.count() == 0) {
      launch(client);
    } else {
      auto timer = std::make_shared<asio::steady_timer>(ioc_, wait);
      timer->async_wait([this, timer, client](boost::system::error_code ec) {
        if (!ec) launch(client);
        maybe_end();
      });
    }
  }
  maybe_end();
}

void Runner::stop_submitting() {
  if (!submitting_) return;
  submitting_ = false;
  result_.submit_window_s = elapsed();
  arrival_timer_.cancel();
  stop_timer_.cancel();
  drain_timer_.expires_after(to_millis(options_.drain_timeout_s));
  drain_timer_.async_wait([this](boost::system::error_code ec) {
    if (ec || in_flight_.empty()) return;
    result_.drain_timed_out = true;
    if (!options_.quiet)
      std::fprintf(stderr, "%ssdload: drain timeout: abandoning %zu job(s) in flight\n",
                   line_break(), in_flight_.size());
    abort_all("drain_timeout");
  });
  maybe_end();
}

void Runner::maybe_end() {
  if (ended_ || submitting_ || !in_flight_.empty()) return;
  ended_ = true;
  drain_timer_.cancel();
  tick_timer_.cancel();
  if (!options_.quiet) print_progress();
}

void Runner::abort_all(const std::string& why) {
  // A copy: each abort removes its job from in_flight_.
  const auto jobs = in_flight_;
  for (const auto& [key, job] : jobs) job->abort(why);
}

void Runner::tick() {
  const int interrupts = g_interrupts.load();
  if (interrupts > interrupts_seen_) {
    interrupts_seen_ = interrupts;
    result_.interrupted = true;
    if (!options_.quiet || interrupts > 1)
      std::fprintf(stderr,
                   interrupts == 1 ? "%ssdload: interrupted: no more submissions; waiting for %zu "
                                     "job(s) in flight (Ctrl-C again to abandon them)\n"
                                   : "%ssdload: abandoning %zu job(s) in flight\n",
                   line_break(), in_flight_.size());
    stop_submitting();
    if (interrupts > 1) abort_all("interrupted");
  }
  if (ended_) return;
  if (!options_.quiet && ++ticks_ % kTicksPerProgressLine == 0) print_progress();
  tick_timer_.expires_after(kTick);
  tick_timer_.async_wait([this](boost::system::error_code ec) {
    if (!ec) tick();
  });
}

void Runner::print_progress() {
  const double t = elapsed();
  char line[320];
  std::snprintf(line, sizeof line,
                "[%s %s] %5.1fs  sent %ld  ok %ld  failed %ld  rejected %ld  cancelled %ld  "
                "expired %ld  in flight %zu  %.2f img/s%s",
                result_.url.c_str(), result_.spec.label.c_str(), t, result_.submitted, counts_[0],
                counts_[1], counts_[2], counts_[3], counts_[4], in_flight_.size(),
                t > 0 ? static_cast<double>(images_ok_) / t : 0.0,
                submitting_ ? "" : "  (draining)");
  // On a terminal the line rewrites itself; in a log it is one line per second.
  if (tty_)
    std::fprintf(stderr, "\r\033[K%s", line);
  else
    std::fprintf(stderr, "%s\n", line);
  std::fflush(stderr);
}

}  // namespace

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

int interrupt_count() {
  return g_interrupts.load();
}

RunResult run_once(const Options& options, const Server& server, const RunSpec& spec,
                   Workload workload) {
  Runner runner(options, server, spec, std::move(workload));
  return runner.run();
}

}  // namespace sdload
