#include "sdload/report.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <set>

namespace sdload {
namespace {

using json = nlohmann::ordered_json;
using Row = std::vector<std::string>;

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

std::string latency_cell(const Percentiles& p) {
  if (p.n == 0) return "-";
  char buf[128];
  std::snprintf(buf, sizeof buf, "%.3f / %.3f / %.3f / %.3f (%zu)", p.p50, p.p90, p.p99, p.max,
                p.n);
  return buf;
}

std::string p_cell(const Percentiles& p, double value) {
  return p.n == 0 ? "-" : fmt("%.3f", value);
}

// Columns padded to their widest cell; the first left-aligned, numbers right-aligned when
// `right` (sweep tables), else left (side by side, where cells are phrases).
void print_table(std::ostream& out, const std::vector<Row>& rows, bool right) {
  std::vector<size_t> width;
  for (const Row& row : rows)
    for (size_t c = 0; c < row.size(); ++c) {
      if (width.size() <= c) width.push_back(0);
      width[c] = std::max(width[c], row[c].size());
    }
  for (const Row& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      const std::string pad(width[c] - row[c].size(), ' ');
      line += c == 0 || !right ? row[c] + pad : pad + row[c];
      if (c + 1 < row.size()) line += "  ";
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out << line << "\n";
  }
}

// Every error key seen in any of `runs`, as "class key".
std::set<std::pair<std::string, std::string>> error_keys(
    const std::vector<const RunSummary*>& runs) {
  std::set<std::pair<std::string, std::string>> keys;
  for (const RunSummary* r : runs)
    for (const auto& [cls, by_key] : r->errors)
      for (const auto& [key, n] : by_key) keys.emplace(cls, key);
  return keys;
}

// One run per column (one target, or the same run against each --compare target).
void print_side_by_side(std::ostream& out, const std::vector<const RunSummary*>& runs) {
  std::vector<Row> rows;
  auto add = [&](const std::string& name, auto cell) {
    Row row{name};
    for (const RunSummary* r : runs) row.push_back(cell(*r));
    rows.push_back(std::move(row));
  };
  auto num = [](long v) { return std::to_string(v); };
  add("", [](const RunSummary& r) { return r.url; });
  add("submitted", [&](const RunSummary& r) { return num(r.submitted); });
  add("succeeded", [&](const RunSummary& r) { return num(r.succeeded); });
  add("failed", [&](const RunSummary& r) { return num(r.failed); });
  add("rejected (429)", [&](const RunSummary& r) { return num(r.rejected); });
  add("cancelled", [&](const RunSummary& r) { return num(r.cancelled); });
  add("expired", [&](const RunSummary& r) { return num(r.expired); });
  add("counts add up", [](const RunSummary& r) { return r.counts_add_up() ? "yes" : "NO"; });
  add("images fetched / decoded",
      [&](const RunSummary& r) { return num(r.images_fetched) + " / " + num(r.images_decoded); });
  add("completed img/s", [](const RunSummary& r) { return fmt("%.2f", r.completed_img_per_s); });
  add("submitted jobs/s", [](const RunSummary& r) { return fmt("%.2f", r.submitted_per_s); });
  add("elapsed s", [](const RunSummary& r) {
    return fmt("%.1f", r.elapsed_s) + (r.drain_timed_out ? " (drain timed out)" : "") +
           (r.interrupted ? " (interrupted)" : "");
  });
  add("latency s", [](const RunSummary&) { return std::string("p50 / p90 / p99 / max (n)"); });
  add("  submit", [](const RunSummary& r) { return latency_cell(r.submit); });
  add("  queue wait", [](const RunSummary& r) { return latency_cell(r.queue_wait); });
  add("  first step", [](const RunSummary& r) { return latency_cell(r.first_step); });
  add("  final event", [](const RunSummary& r) { return latency_cell(r.final_event); });
  add("  end to end", [](const RunSummary& r) { return latency_cell(r.e2e); });
  const auto keys = error_keys(runs);
  add("errors", [&](const RunSummary& r) { return keys.empty() ? "none" : num(r.error_total()); });
  for (const auto& [cls, key] : keys)
    add("  " + cls + " " + key, [&, cls = cls, key = key](const RunSummary& r) {
      const auto c = r.errors.find(cls);
      if (c == r.errors.end()) return num(0);
      const auto k = c->second.find(key);
      return num(k == c->second.end() ? 0 : k->second);
    });
  print_table(out, rows, false);
}

void print_sweep(std::ostream& out, const TargetResult& target) {
  out << target.url << "\n";
  std::vector<Row> rows = {{"offered", "sent", "ok", "failed", "rejected", "cxl", "exp", "img/s",
                            "e2e p50", "e2e p99", "1st p50", "1st p99", "errors"}};
  for (const RunSummary& r : target.runs)
    rows.push_back(
        {fmt("%.2f", r.spec.rate), std::to_string(r.submitted), std::to_string(r.succeeded),
         std::to_string(r.failed), std::to_string(r.rejected), std::to_string(r.cancelled),
         std::to_string(r.expired), fmt("%.2f", r.completed_img_per_s), p_cell(r.e2e, r.e2e.p50),
         p_cell(r.e2e, r.e2e.p99), p_cell(r.first_step, r.first_step.p50),
         p_cell(r.first_step, r.first_step.p99), std::to_string(r.error_total())});
  print_table(out, rows, true);
  for (const RunSummary& r : target.runs)
    for (const auto& [cls, by_key] : r.errors)
      for (const auto& [key, n] : by_key)
        out << "  at " << fmt("%.2f", r.spec.rate) << " img/s: " << cls << " " << key << ": " << n
            << "\n";
}

std::string mode_line(const Options& o, const std::string& workload) {
  std::string mode;
  if (o.mode == Mode::kOpen) mode = "open loop at " + fmt("%g", o.rate) + " img/s";
  if (o.mode == Mode::kClosed) mode = "closed loop with " + std::to_string(o.clients) + " clients";
  if (o.mode == Mode::kSweep)
    mode = "open-loop sweep over " + std::to_string(o.sweep.size()) + " rates";
  return "sdload: " + mode + ", " + fmt("%g", o.duration_s) + " s per run" +
         (o.max_jobs ? " (at most " + std::to_string(o.max_jobs) + " jobs)" : "") + ", " +
         workload + ", seed " + std::to_string(o.seed);
}

// --- Reading a report back (--from-report) ---------------------------------------------------

using in_json = nlohmann::json;  // as read back: the order of keys does not matter

// A value of the report and where it is in it ("targets[0].runs[2].counts"), for messages.
struct Node {
  const in_json& value;
  std::string where;  // "" for the whole report
};

std::string a(const in_json& v) {
  switch (v.type()) {
    case in_json::value_t::null:
      return "null";
    case in_json::value_t::object:
    case in_json::value_t::array:
      return std::string("an ") + v.type_name();
    default:
      return std::string("a ") + v.type_name();
  }
}

// Typed access to a report's fields; anything missing or of the wrong type throws ReportError
// naming the file and the field.
class Reader {
 public:
  explicit Reader(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(const Node& n, const std::string& what) const {
    throw ReportError(file_ + ": " + (n.where.empty() ? "the report" : n.where) + " " + what);
  }

  const Node& object(const Node& n) const {
    if (!n.value.is_object()) fail(n, "is " + a(n.value) + ", expected an object");
    return n;
  }
  bool has(const Node& n, const char* name) const { return object(n).value.contains(name); }
  Node at(const Node& n, const std::string& name) const {
    const std::string where = n.where.empty() ? name : n.where + "." + name;
    const auto it = object(n).value.find(name);
    if (it == n.value.end()) throw ReportError(file_ + ": " + where + " is missing");
    return {*it, where};
  }
  std::vector<Node> elements(const Node& n) const {
    if (!n.value.is_array()) fail(n, "is " + a(n.value) + ", expected an array");
    std::vector<Node> out;
    for (size_t i = 0; i < n.value.size(); ++i)
      out.push_back({n.value[i], n.where + "[" + std::to_string(i) + "]"});
    return out;
  }
  std::string string(const Node& n) const {
    if (!n.value.is_string()) fail(n, "is " + a(n.value) + ", expected a string");
    return n.value.get<std::string>();
  }
  double number(const Node& n) const {
    if (!n.value.is_number()) fail(n, "is " + a(n.value) + ", expected a number");
    return n.value.get<double>();
  }
  long count(const Node& n) const {
    const bool ok =
        n.value.is_number_unsigned()
            ? n.value.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<long>::max())
            : n.value.is_number_integer() && n.value.get<int64_t>() >= 0;
    if (!ok) fail(n, "is " + n.value.dump() + ", expected a count (an integer >= 0)");
    return n.value.get<long>();
  }

 private:
  std::string file_;
};

Percentiles read_percentiles(const Reader& r, const Node& n) {
  Percentiles p;
  p.n = static_cast<size_t>(r.count(r.at(n, "n")));
  if (p.n == 0) return p;  // the report has no more (see stats.cpp)
  p.p50 = r.number(r.at(n, "p50"));
  p.p99 = r.number(r.at(n, "p99"));
  return p;
}

RunSummary read_run(const Reader& r, const Node& n, const std::string& url) {
  RunSummary s;
  s.url = url;
  const auto mode = r.object(n).value.find("mode");
  if (mode != n.value.end() && *mode == "closed")
    r.fail(n, "is a closed-loop run (--clients): a chart needs open-loop runs (--sweep)");
  s.spec.rate = r.number(r.at(n, "offered_img_per_s"));
  s.spec.label = fmt("%g img/s", s.spec.rate);
  const Node counts = r.at(n, "counts");
  s.submitted = r.count(r.at(counts, "submitted"));
  s.succeeded = r.count(r.at(counts, "succeeded"));
  s.failed = r.count(r.at(counts, "failed"));
  s.rejected = r.count(r.at(counts, "rejected"));
  s.cancelled = r.count(r.at(counts, "cancelled"));
  s.expired = r.count(r.at(counts, "expired"));
  s.completed_img_per_s = r.number(r.at(r.at(n, "throughput"), "completed_img_per_s"));
  const Node latency = r.at(n, "latency_s");
  s.e2e = read_percentiles(r, r.at(latency, "e2e"));
  s.first_step = read_percentiles(r, r.at(latency, "first_step"));
  if (r.has(n, "errors")) {
    const Node errors = r.at(n, "errors");
    for (const auto& cls : r.object(errors).value.items()) {
      const Node by_key = r.at(errors, cls.key());
      for (const auto& key : r.object(by_key).value.items())
        s.errors[cls.key()][key.key()] = r.count(r.at(by_key, key.key()));
    }
  }
  return s;
}

}  // namespace

CheckResult check_results(const std::vector<TargetResult>& targets) {
  CheckResult c;
  auto problem = [&](const RunSummary& r, const std::string& what) {
    c.passed = false;
    c.problems.push_back(r.url + " [" + r.spec.label + "]: " + what);
  };
  size_t runs = 0;
  for (const TargetResult& t : targets)
    for (const RunSummary& r : t.runs) {
      ++runs;
      if (!r.counts_add_up())
        problem(r,
                "counts do not add up (submitted " + std::to_string(r.submitted) + ", " +
                    std::to_string(r.records) + " records, outcomes " +
                    std::to_string(r.succeeded + r.failed + r.rejected + r.cancelled + r.expired) +
                    ")");
      if (r.succeeded == 0) problem(r, "no job succeeded");
      if (r.decode_failures > 0 || r.images_decoded != r.images_fetched)
        problem(r, std::to_string(r.images_fetched - r.images_decoded) + " of " +
                       std::to_string(r.images_fetched) + " fetched image(s) did not decode");
    }
  if (runs == 0) {
    c.passed = false;
    c.problems.push_back("no run took place");
  }
  return c;
}

void print_summary(std::ostream& out, const Options& options, const std::string& workload,
                   const std::vector<TargetResult>& targets) {
  out << mode_line(options, workload) << "\n";
  if (options.mode == Mode::kSweep) {
    print_sweep_tables(out, targets);
    return;
  }
  // Runs are aligned by position: with --compare, run i of each target had the same traffic.
  size_t n = 0;
  for (const TargetResult& t : targets) n = std::max(n, t.runs.size());
  for (size_t i = 0; i < n; ++i) {
    std::vector<const RunSummary*> column;
    for (const TargetResult& t : targets)
      if (i < t.runs.size()) column.push_back(&t.runs[i]);
    out << "\n";
    print_side_by_side(out, column);
    for (const RunSummary* r : column)
      for (const auto& [where, message] : r->error_examples)
        out << "  e.g. " << (column.size() > 1 ? r->url + " " : "") << where << ": " << message
            << "\n";
  }
}

bool write_report(const std::string& path, const Options& options, const std::string& workload,
                  const std::vector<TargetResult>& targets, const CheckResult& check,
                  bool interrupted) {
  json j = {{"tool", "sdload"}, {"options", options_json(options)}, {"workload", workload}};
  j["interrupted"] = interrupted;
  j["targets"] = json::array();
  for (const TargetResult& t : targets) {
    json runs = json::array();
    for (const RunSummary& r : t.runs) runs.push_back(to_json(r));
    j["targets"].push_back({{"url", t.url}, {"runs", runs}});
  }
  j["check"] = {{"passed", check.passed}, {"problems", check.problems}};
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  out.close();
  if (!out) {
    std::cerr << "sdload: cannot write the report to '" << path << "'\n";
    return false;
  }
  return true;
}

ReadReport read_report(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ReportError(path + ": cannot read it (" + std::strerror(errno) + ")");
  in_json root;
  try {
    root = in_json::parse(in);
  } catch (const in_json::parse_error& e) {
    std::string why = e.what();  // "[json.exception.parse_error.101] parse error at line 1, ..."
    if (const size_t end = why.find("] "); why.rfind("[json.", 0) == 0 && end != std::string::npos)
      why = why.substr(end + 2);
    throw ReportError(path + ": not valid JSON (" + why + ")");
  } catch (const std::exception& e) {  // a folder, an I/O error
    throw ReportError(path + ": cannot read it (" + e.what() + ")");
  }
  const Reader r(path);
  const Node report{root, ""};
  ReadReport out;
  if (r.has(report, "workload")) out.workload = r.string(r.at(report, "workload"));
  try {
    for (const Node& target : r.elements(r.at(report, "targets"))) {
      TargetResult t{r.string(r.at(target, "url")), {}};
      for (const Node& run : r.elements(r.at(target, "runs")))
        t.runs.push_back(read_run(r, run, t.url));
      // A target whose first run was interrupted: nothing of it to draw.
      if (!t.runs.empty()) out.targets.push_back(std::move(t));
    }
  } catch (const in_json::exception& e) {  // not expected: every access above is checked
    throw ReportError(path + ": " + e.what());
  }
  if (out.targets.empty()) throw ReportError(path + ": the report has no runs: nothing to draw");
  return out;
}

void print_sweep_tables(std::ostream& out, const std::vector<TargetResult>& targets) {
  for (const TargetResult& t : targets) {
    out << "\n";
    print_sweep(out, t);
  }
}

}  // namespace sdload
