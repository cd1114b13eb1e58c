#include "pipeline/io/tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "pipeline/errors.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

std::string vocab_path() {
  return test::model_dir() + "/tokenizer/vocab.json";
}
std::string merges_path() {
  return test::model_dir() + "/tokenizer/merges.txt";
}

const ClipTokenizer& tokenizer() {
  static const ClipTokenizer tok = ClipTokenizer::load(vocab_path(), merges_path());
  return tok;
}

// (reference tensor name, prompt) for every "tokens" case of the fixture.
std::vector<std::pair<std::string, std::string>> token_cases() {
  std::ifstream in(test::fixture("tiny-sd15-cases.json"));
  const auto cases = nlohmann::json::parse(in).at("cases");
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& c : cases) {
    if (c.at("kind") == "tokens") out.emplace_back(c.at("name"), c.at("prompt"));
  }
  return out;
}

std::vector<int32_t> reference_ids(const std::string& name) {
  const auto t = test::ref(name).reshape({-1}).to(torch::kInt32).contiguous();
  return std::vector<int32_t>(t.data_ptr<int32_t>(), t.data_ptr<int32_t>() + t.numel());
}

class TempFile {
 public:
  TempFile(const std::string& tag, const std::string& content) {
    path_ = "/tmp/sdserve-tok-" + std::to_string(::getpid()) + "-" + tag;
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << content;
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void expect_refused(const std::string& vocab, const std::string& merges,
                    const std::string& fragment) {
  try {
    ClipTokenizer::load(vocab, merges);
    FAIL() << "expected a ModelError naming " << fragment;
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(ClipTokenizer, SpecialIdsComeFromTheVocabulary) {
  EXPECT_EQ(tokenizer().bos_id(), 49406);
  EXPECT_EQ(tokenizer().eos_id(), 49407);
  EXPECT_EQ(tokenizer().pad_id(), tokenizer().eos_id());
  EXPECT_EQ(tokenizer().max_length(), 77);
  EXPECT_EQ(tokenizer().vocab_size(), 49408u);
}

TEST(ClipTokenizer, MatchesReferenceIds) {
  const auto cases = token_cases();
  ASSERT_EQ(cases.size(), 8u);
  for (const auto& [name, prompt] : cases) {
    EXPECT_EQ(tokenizer().encode(prompt), reference_ids(name)) << name << ": \"" << prompt << "\"";
  }
}

TEST(ClipTokenizer, TokenizeIsUntruncatedAndEncodeKeepsTheFirstTokens) {
  for (const auto& [name, prompt] : token_cases()) {
    const auto tokens = tokenizer().tokenize(prompt);
    const auto ids = tokenizer().encode(prompt);
    const size_t kept = std::min<size_t>(tokens.size(), 75);
    ASSERT_EQ(ids.size(), 77u);
    EXPECT_EQ(ids.front(), tokenizer().bos_id());
    EXPECT_TRUE(std::equal(tokens.begin(), tokens.begin() + kept, ids.begin() + 1)) << name;
    EXPECT_EQ(ids[kept + 1], tokenizer().eos_id()) << name;
  }
  EXPECT_TRUE(tokenizer().tokenize("").empty());
  EXPECT_GT(tokenizer().tokenize(token_cases().back().second).size(), 75u);
}

TEST(ClipTokenizer, ConcurrentCallsAgree) {
  const auto cases = token_cases();
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        for (const auto& [name, prompt] : cases) {
          if (tokenizer().encode(prompt) != reference_ids(name)) ++failures[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int f : failures) EXPECT_EQ(f, 0);
}

TEST(ClipTokenizer, RefusesMissingVocabulary) {
  expect_refused("/nonexistent/vocab.json", merges_path(), "/nonexistent/vocab.json");
}

TEST(ClipTokenizer, RefusesMalformedVocabulary) {
  TempFile bad("vocab-bad.json", "{\"a\": 1,");
  expect_refused(bad.path(), merges_path(), bad.path());
  TempFile no_special("vocab-nospecial.json", "{\"a</w>\": 0}");
  expect_refused(no_special.path(), merges_path(), no_special.path());
  TempFile not_ids("vocab-strings.json", "{\"a</w>\": \"zero\"}");
  expect_refused(not_ids.path(), merges_path(), not_ids.path());
}

TEST(ClipTokenizer, RefusesMissingOrMalformedMerges) {
  expect_refused(vocab_path(), "/nonexistent/merges.txt", "/nonexistent/merges.txt");
  TempFile bad("merges-bad.txt", "#version: 0.2\ni n\nthree symbols here\n");
  expect_refused(vocab_path(), bad.path(), bad.path());
  TempFile empty("merges-empty.txt", "#version: 0.2\n");
  expect_refused(vocab_path(), empty.path(), empty.path());
}

// A vocabulary of another size (the SD 2.x fixture's: CLIP's BPE cut to its first merges plus
// those its prompts need, ~1,000 ids, the special tokens last, "!" padding): ids, special ids and
// BPE all follow the files, and every id stays inside the vocabulary.
TEST(ClipTokenizerTest, ShortVocabularyFollowsItsOwnFiles) {
  const std::string dir = test::fixture("tiny-sd2/tokenizer");
  const auto tok = ClipTokenizer::load(dir + "/vocab.json", dir + "/merges.txt", 77, "!");
  const auto size = static_cast<int32_t>(tok.vocab_size());
  EXPECT_GT(size, 512);
  EXPECT_LT(size, 2000);
  EXPECT_EQ(tok.max_id(), size - 1);
  EXPECT_EQ(tok.bos_id(), size - 2);
  EXPECT_EQ(tok.eos_id(), size - 1);
  EXPECT_EQ(tok.pad_id(), 0);
  EXPECT_EQ(tokenizer().max_id(), 49407);  // CLIP's full vocabulary, for contrast
  // The early merges are CLIP's own ("the</w>" is merge-made in both); a word past the kept
  // merges falls back to shorter pieces.
  EXPECT_EQ(tok.tokenize("the"), tokenizer().tokenize("the"));
  EXPECT_GT(tok.tokenize("zeppelin").size(), tokenizer().tokenize("zeppelin").size());
  for (const int32_t id : tok.encode("zeppelin über the fjord, 1999 — naïve")) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, size);
  }
}

}  // namespace
}  // namespace sdserve::pipeline
