// A1111's prompt syntax (pipeline/prompt_syntax.h), torch-free. Expected pieces and weights were
// computed by A1111's own parse_prompt_attention (modules/prompt_parser.py, run on these inputs
// under Python 3.11); the first six are also the examples in its docstring. Weights are compared
// exactly: the same multiplications in the same order give the same doubles.
#include "pipeline/prompt_syntax.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "pipeline/errors.h"
#include "pipeline/io/tokenizer.h"

namespace sdserve::pipeline {
namespace {

struct Expected {
  std::string text;
  double weight;  // -1: a BREAK (A1111 marks it so)
};

void expect_pieces(const std::string& prompt, const std::vector<Expected>& want) {
  SCOPED_TRACE(prompt);
  const auto got = parse_prompt_attention(prompt, "prompt");
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i].weight == -1) {
      EXPECT_TRUE(got[i].is_break) << i;
      continue;
    }
    EXPECT_FALSE(got[i].is_break) << i;
    EXPECT_EQ(got[i].text, want[i].text) << i;
    EXPECT_EQ(got[i].weight, want[i].weight) << i;
  }
}

TEST(PromptSyntax, ParsesAsA1111Does) {
  expect_pieces("normal text", {{"normal text", 1.0}});
  expect_pieces("an (important) word", {{"an ", 1.0}, {"important", 1.1}, {" word", 1.0}});
  expect_pieces("(unbalanced", {{"unbalanced", 1.1}});
  expect_pieces("\\(literal\\]", {{"(literal]", 1.0}});
  expect_pieces("(unnecessary)(parens)", {{"unnecessaryparens", 1.1}});
  expect_pieces("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                {{"a ", 1.0},
                 {"house", 1.5730000000000004},
                 {" ", 1.1},
                 {"on", 1.0},
                 {" a ", 1.1},
                 {"hill", 0.55},
                 {", sun, ", 1.1},
                 {"sky", 1.4641000000000006},
                 {".", 1.1}});
  expect_pieces("[[a]] ((b)", {{"a", 0.8264462809917354}, {" ", 1.0}, {"b", 1.2100000000000002}});
  expect_pieces("(a [b) c]", {{"a ", 1.1}, {"b", 1.0}, {" c", 0.9090909090909091}});
  expect_pieces("((a:1.5):2)", {{"a", 3.0}});
  expect_pieces("", {{"", 1.0}});
}

TEST(PromptSyntax, TextThatIsNotSyntaxStaysText) {
  // A weight without an open '(' is text; so are stray closers and a ':' not followed by a
  // number and ')'; a lone backslash is dropped; spaces around a weight are allowed.
  expect_pieces("cat: dog :1.2) (bird : -0.5 )", {{"cat: dog :1.2) ", 1.0}, {"bird ", -0.5}});
  expect_pieces("] ) : (", {{"] ) : ", 1.0}});
  expect_pieces("\\x\\\\y", {{"x\\y", 1.0}});
  expect_pieces("a (b:2.5e1) c", {{"a ", 1.0}, {"b:2.5e1", 1.1}, {" c", 1.0}});
}

TEST(PromptSyntax, BreakIsAWordOfItsOwn) {
  expect_pieces("a cat BREAK a dog", {{"a cat", 1.0}, {"", -1}, {"a dog", 1.0}});
  expect_pieces("BREAK cat", {{"", 1.0}, {"", -1}, {"cat", 1.0}});
  expect_pieces("tab\tBREAK\nnext", {{"tab", 1.0}, {"", -1}, {"next", 1.0}});
  expect_pieces("xBREAK catBREAK BREAK_x", {{"xBREAK catBREAK BREAK_x", 1.0}});
  // Letters outside ASCII are word characters too (Python's \b is Unicode-aware).
  expect_pieces("caf\u00e9 (na\u00efve:1.2) BREAK\u00e9t\u00e9",
                {{"caf\u00e9 ", 1.0}, {"na\u00efve", 1.2}, {" BREAK\u00e9t\u00e9", 1.0}});
}

TEST(PromptSyntax, BadWeightsAndHostileInputAreRefusedNamingTheField) {
  const std::vector<std::string> bad = {"a (cat:1.2.3)", "a (cat:.)",
                                        "(x:1" + std::string(400, '0') + ")"};
  for (const auto& prompt : bad) {
    try {
      parse_prompt_attention(prompt, "negative_prompt");
      FAIL() << prompt;
    } catch (const RequestError& e) {
      EXPECT_EQ(e.field(), "negative_prompt");
      EXPECT_NE(std::string(e.what()).find("not a finite number"), std::string::npos) << e.what();
    }
  }
  // Each closing bracket multiplies everything after its opening one: quadratic in "(a" x n.
  // A megabyte of it is refused after bounded work instead of holding the server.
  std::string hostile;
  for (int i = 0; i < 500000; ++i) hostile += "(a";
  EXPECT_THROW(parse_prompt_attention(hostile, "prompt"), RequestError);
  // Deep nesting is cheap (each bracket closes over one piece) but 1.1^10000 is no number.
  EXPECT_EQ(parse_prompt_attention(std::string(1000, '(') + "a", "prompt").size(), 1u);
  EXPECT_THROW(parse_prompt_attention(std::string(10000, '(') + "a", "prompt"), RequestError);
}

class PromptChunks : public ::testing::Test {
 protected:
  PromptChunks()
      : tok_(ClipTokenizer::load(SDSERVE_MODELS "/tiny-sd15/tokenizer/vocab.json",
                                 SDSERVE_MODELS "/tiny-sd15/tokenizer/merges.txt")) {
    rules_.comma_token = tok_.find_token(",</w>");
    for (const char* word : {"cat", "dog", ","})
      EXPECT_EQ(tok_.tokenize(word).size(), 1u) << word;  // the arithmetic below counts on it
  }
  std::vector<TokenChunk> chunks(const std::string& prompt, const std::string& field = "prompt") {
    return chunk_prompt(
        parse_prompt_attention(prompt, field),
        [this](const std::string& t, size_t max) { return tok_.tokenize(t, max); }, rules_, field);
  }
  static std::string words(const std::string& word, int n) {
    std::string out;
    for (int i = 0; i < n; ++i) out += word + " ";
    return out;
  }
  int32_t id(const char* word) const { return tok_.tokenize(word).at(0); }

  ClipTokenizer tok_;
  ChunkRules rules_;
};

TEST_F(PromptChunks, ShortPromptIsOneChunkOfItsTokens) {
  const auto c = chunks("a red cube");
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].tokens, tok_.tokenize("a red cube"));
  EXPECT_EQ(c[0].weights, std::vector<float>(c[0].tokens.size(), 1.0f));
  // An empty prompt is one empty chunk (start, end, padding).
  ASSERT_EQ(chunks("").size(), 1u);
  EXPECT_TRUE(chunks("")[0].tokens.empty());
}

TEST_F(PromptChunks, LongPromptsFillChunksOf75) {
  const auto c = chunks(words("cat", 80));
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].tokens, std::vector<int32_t>(75, id("cat")));
  EXPECT_EQ(c[1].tokens, std::vector<int32_t>(5, id("cat")));
  EXPECT_EQ(chunks(words("cat", 75)).size(), 1u);  // exactly full: no empty second chunk
}

TEST_F(PromptChunks, AFullChunkIsCutAfterARecentComma) {
  // 70 cats, a comma (token 70), 10 dogs: at the 76th token the comma is 5 back, within A1111's
  // 20, so the 4 dogs after it move to the next chunk.
  auto c = chunks(words("cat", 70) + ", " + words("dog", 10));
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].tokens.size(), 71u);
  EXPECT_EQ(c[0].tokens.back(), rules_.comma_token);
  EXPECT_EQ(c[1].tokens, std::vector<int32_t>(10, id("dog")));
  // A comma 25 back is too far: a plain cut at 75.
  c = chunks(words("cat", 50) + ", " + words("dog", 40));
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].tokens.size(), 75u);
  EXPECT_EQ(c[1].tokens.size(), 16u);
}

TEST_F(PromptChunks, BreakStartsAChunkAndWeightsFollowTheirTokens) {
  auto c = chunks("cat BREAK (dog:1.5) [cat]");
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].tokens, std::vector<int32_t>{id("cat")});
  EXPECT_EQ(c[1].tokens, (std::vector<int32_t>{id("dog"), id("cat")}));
  EXPECT_EQ(c[1].weights, (std::vector<float>{1.5f, static_cast<float>(1 / 1.1)}));
  c = chunks("BREAK cat");  // as A1111: an empty first chunk
  ASSERT_EQ(c.size(), 2u);
  EXPECT_TRUE(c[0].tokens.empty());
}

TEST_F(PromptChunks, MoreThanSixteenChunksAreRefusedNamingTheField) {
  EXPECT_EQ(chunks(words("cat", 16 * 75)).size(), 16u);
  const std::vector<std::string> too_long = {words("cat", 16 * 75 + 1),
                                             words("cat BREAK", 16) + "cat"};
  for (const auto& prompt : too_long) {
    try {
      chunks(prompt, "negative_prompt");
      FAIL();
    } catch (const RequestError& e) {
      EXPECT_EQ(e.field(), "negative_prompt");
      EXPECT_NE(std::string(e.what()).find("16 chunks of 75 tokens"), std::string::npos);
    }
  }
  // A megabyte of text costs what the first 1,201 tokens do.
  EXPECT_THROW(chunks(std::string(1 << 20, 'x')), RequestError);
}

}  // namespace
}  // namespace sdserve::pipeline
