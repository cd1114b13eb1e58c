#include "sdload/chart.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

namespace sdload {
namespace {

constexpr std::chrono::seconds kGnuplotTimeout{60};

std::string find_in_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// A gnuplot single-quoted string: nothing is special inside except '' for a quote.
std::string quoted(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

std::string value(const Percentiles& p, double v) {
  return p.n == 0 ? "NaN" : std::to_string(v);
}

void write_data(const std::string& path, const TargetResult& target) {
  std::ofstream out(path);
  out << "# offered completed e2e_p50 e2e_p99 first_p50 first_p99\n";
  for (const RunSummary& r : target.runs)
    out << r.spec.rate << " " << r.completed_img_per_s << " " << value(r.e2e, r.e2e.p50) << " "
        << value(r.e2e, r.e2e.p99) << " " << value(r.first_step, r.first_step.p50) << " "
        << value(r.first_step, r.first_step.p99) << "\n";
}

std::string script(const std::string& png_path, const std::vector<std::string>& data,
                   const std::vector<TargetResult>& targets) {
  double max_rate = 0;
  for (const auto& t : targets)
    for (const auto& r : t.runs) max_rate = std::max(max_rate, r.spec.rate);
  std::ostringstream s;
  // pngcairo draws better, but only the png terminal is sure to be there.
  s << "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
    << "  set terminal pngcairo size 1000,900 font ',10'\n"
    << "} else {\n  set terminal png size 1000,900\n}\n"
    << "set output " << quoted(png_path) << "\n"
    << "set datafile missing 'NaN'\nset grid\nset key top left\n"
    << "set xrange [0:" << max_rate * 1.05 << "]\n"
    << "set multiplot layout 2,1 title 'sdload sweep'\n"
    << "set xlabel 'offered load (img/s)'\nset ylabel 'latency (s)'\nplot ";
  const bool several = targets.size() > 1;
  for (size_t t = 0; t < targets.size(); ++t) {
    const std::string who = several ? targets[t].url + " " : "";
    const std::string file = quoted(data[t]);
    const int dash = static_cast<int>(t) + 1;  // one dash pattern per target
    const char* names[] = {"e2e p50", "e2e p99", "first step p50", "first step p99"};
    for (int c = 0; c < 4; ++c)
      s << (t || c ? ", " : "") << file << " using 1:" << c + 3 << " with linespoints dt " << dash
        << " lc " << c + 1 << " title " << quoted(who + names[c]);
  }
  s << "\nset ylabel 'completed (img/s)'\nplot x with lines dt 2 lc 'black' title 'offered'";
  for (size_t t = 0; t < targets.size(); ++t)
    s << ", " << quoted(data[t]) << " using 1:2 with linespoints lc " << t + 1 << " title "
      << quoted((several ? targets[t].url + " " : std::string()) + "completed");
  s << "\nunset multiplot\n";
  return s.str();
}

// Runs gnuplot on `script_path`, bounded in time; true when it exited 0.
bool run_gnuplot(const std::string& gnuplot, const std::string& script_path) {
  const pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    execl(gnuplot.c_str(), gnuplot.c_str(), script_path.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + kGnuplotTimeout;
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::cerr << "sdload: gnuplot did not finish in time; stopped it\n";
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

}  // namespace

bool draw_chart(const std::string& png_path, const std::vector<TargetResult>& targets) {
  const std::string gnuplot = find_in_path("gnuplot");
  if (gnuplot.empty()) {
    std::cerr << "sdload: gnuplot is not installed (Debian: apt-get install gnuplot-nox); "
                 "no chart drawn\n";
    return false;
  }
  char dir_template[] = "/tmp/sdload-chart-XXXXXX";
  if (!mkdtemp(dir_template)) {
    std::cerr << "sdload: cannot make a temporary folder for the chart; no chart drawn\n";
    return false;
  }
  const std::string dir = dir_template;
  std::vector<std::string> data;
  for (size_t t = 0; t < targets.size(); ++t) {
    data.push_back(dir + "/target" + std::to_string(t) + ".dat");
    write_data(data.back(), targets[t]);
  }
  const std::string script_path = dir + "/chart.gp";
  std::ofstream(script_path) << script(png_path, data, targets);
  if (!run_gnuplot(gnuplot, script_path)) {
    // Kept, so that the failure can be reproduced by hand.
    std::cerr << "sdload: gnuplot failed; its script and data are in " << dir << "\n";
    return false;
  }
  for (const auto& f : data) std::remove(f.c_str());
  std::remove(script_path.c_str());
  rmdir(dir.c_str());
  return true;
}

}  // namespace sdload
