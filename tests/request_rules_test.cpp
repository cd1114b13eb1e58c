// The README's request-field table against the rules the service enforces (engine::rule(), which
// quotes pipeline::Limits): every "A..B" range in a row must be the range of that row's fields.
// A limit changed in code without the README (or the reverse) fails here.
#include <gtest/gtest.h>

#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "engine/job.h"
#include "pipeline/validate.h"

namespace sdserve {
namespace {

std::string read_readme() {
  std::ifstream in(std::string(SDSERVE_SOURCE_DIR) + "/README.md");
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct Row {
  std::vector<std::string> fields;  // `width`, `height` -> {width, height}
  std::string allowed;
};

// The table under "| field | default | allowed |".
std::vector<Row> request_table(const std::string& readme) {
  std::vector<Row> rows;
  const auto start = readme.find("| field | default | allowed |");
  if (start == std::string::npos) return rows;
  std::istringstream lines(readme.substr(start));
  std::string line;
  std::getline(lines, line);  // header
  std::getline(lines, line);  // |---|
  const std::regex name("`([a-z_]+)`");
  while (std::getline(lines, line) && line.rfind("|", 0) == 0) {
    const auto second = line.find('|', 1);
    const auto last_sep = line.rfind(" | ");
    Row row;
    const std::string first = line.substr(1, second - 1);
    for (std::sregex_iterator it(first.begin(), first.end(), name), end; it != end; ++it)
      row.fields.push_back((*it)[1]);
    row.allowed = line.substr(last_sep + 3);
    rows.push_back(row);
  }
  return rows;
}

TEST(RequestRules, ReadmeTableMatchesTheValidator) {
  const auto rows = request_table(read_readme());
  ASSERT_GE(rows.size(), 10u) << "README.md has no request-field table";
  const engine::RequestBounds bounds;
  const std::regex range("(\\d+)\\.\\.(\\d+)(?![\\d^])");  // not "0..2^64-1"
  int checked = 0;
  for (const auto& row : rows) {
    for (std::sregex_iterator it(row.allowed.begin(), row.allowed.end(), range), end; it != end;
         ++it) {
      for (const auto& field : row.fields) {
        const std::string rule = engine::rule(field, bounds);
        const std::string expected = "between " + (*it)[1].str() + " and " + (*it)[2].str();
        EXPECT_NE(rule.find(expected), std::string::npos)
            << "README says " << field << " is " << it->str() << "; the service: " << rule;
        ++checked;
      }
    }
  }
  EXPECT_GE(checked, 5);  // width, height, steps, guidance_scale, num_images at least
  // The side multiple is stated in words.
  for (const auto& row : rows) {
    if (row.fields.empty() || row.fields[0] != "width") continue;
    EXPECT_NE(row.allowed.find("multiples of " + std::to_string(pipeline::Limits::kSideMultiple)),
              std::string::npos)
        << row.allowed;
  }
}

}  // namespace
}  // namespace sdserve
