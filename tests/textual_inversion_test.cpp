// Textual-inversion embeddings in prompts, as A1111 reads them (modules/sd_hijack_clip.py
// tokenize_line, textual_inversion.py find_embedding_at_position, sd_hijack.py
// EmbeddingsWithFixes): where the vectors go, that the encoder reads them there, weights, chunks,
// both SDXL encoders; against diffusers' load_textual_inversion where its reference was made.
//
// The independent path: a copy of the text encoder whose vocabulary gained the embedding's rows
// as new token ids (what diffusers' load_textual_inversion does to transformers' CLIP), fed the
// same ids through the plain token lookup, must give the same numbers as the model's own
// encode_text(); the CLIP forward itself is checked against transformers by the parity suites.
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "family_parity.h"
#include "pipeline/errors.h"
#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"
#include "pipeline/prompt_syntax.h"
#include "pipeline/textual_inversion.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace ti_test {

TextualInversionPtr embedding(const std::string& rel) {
  return TextualInversion::load(test::fixture("embeddings/" + rel));
}
TextualInversionPtr tiemb() {
  return embedding("tiny-sd15/tiemb.safetensors");  // emb_params, 3 vectors
}
TextualInversionPtr tistp() {
  return embedding("tiny-sd15/tistp.safetensors");  // string_to_param.*, 2 vectors
}
TextualInversionPtr ticoncept() {
  return embedding("tiny-sd15/ticoncept/learned_embeds.safetensors");  // 1 vector
}
TextualInversionPtr tixl() {
  return embedding("tiny-sdxl/tixl.safetensors");  // clip_l + clip_g, 2 vectors
}

// Models of these tests' own: set_textual_inversions() changes a model for every later prompt.
Model& sd15() {
  static const auto m = test::load_cpu(test::model_dir());
  return *m;
}
Model& sdxl() {
  static const auto m = test::load_cpu(test::family_dir("tiny-sdxl"));
  return *m;
}

torch::Tensor ids_tensor(const std::vector<int32_t>& ids) {
  return torch::tensor(std::vector<int64_t>(ids.begin(), ids.end()), torch::kLong).view({1, -1});
}

// Encoder k's vectors of the embeddings `in` uses, in its rows' order.
torch::Tensor rows_of(const TextInput& in, const std::vector<TextualInversionPtr>& known,
                      size_t k) {
  std::vector<torch::Tensor> rows;
  for (const auto& used : in.embeddings)
    for (const auto& ti : known)
      if (ti->info().name == used.name) {
        EXPECT_EQ(ti->info().sha256, used.sha256);
        auto v = ti->vectors(k);
        rows.push_back(torch::tensor(v).view({ti->info().vectors, ti->info().dims[k]}));
      }
  return torch::cat(rows);
}

// A copy of `encoder` whose vocabulary gained `rows` as the ids vocab_size, vocab_size + 1, ...
ClipTextModel with_rows(const ClipTextModel& encoder, const torch::Tensor& rows) {
  auto config = encoder->config();
  config.vocab_size += rows.size(0);
  ClipTextModel copy(config);
  torch::NoGradGuard no_grad;
  const auto params = encoder->named_parameters();
  for (auto& p : copy->named_parameters()) {
    const auto& from = params[p.key()];
    p.value().copy_(p.key() == "embeddings.token_embedding.weight"
                        ? torch::cat({from, rows.to(from.scalar_type())})
                        : from);
  }
  copy->eval();
  return copy;
}

// The ids a prompt reads without any embedding set.
std::vector<int32_t> plain_ids(Model& model, const std::string& prompt) {
  model.set_textual_inversions({});
  return model.text_input(prompt, PromptSyntax::kA1111).ids;
}

constexpr int32_t kSd15Vocab = 49408;

// --- Chunks, torch-free: chunk_prompt with a stand-in lookup -------------------------------------

// Tokens 7 7 call embedding 0 (3 vectors), 9 embedding 1 (1 vector), 8 8 embedding 2 (1
// vector); 5 is the comma.
EmbeddingMatch find_fake(const std::vector<int32_t>& tokens, size_t position) {
  const auto twice = [&](int32_t t) {
    return tokens[position] == t && position + 1 < tokens.size() && tokens[position + 1] == t;
  };
  if (twice(7)) return {0, 2, 3};
  if (tokens[position] == 9) return {1, 1, 1};
  if (twice(8)) return {2, 2, 1};
  return {};
}
std::vector<int32_t> fake_tokens(const std::string& text, size_t max_tokens) {
  std::vector<int32_t> out;
  for (const char c : text)
    if (c != ' ' && out.size() < max_tokens) out.push_back(c - '0');
  return out;
}
ChunkRules fake_rules(size_t length = 6) {
  ChunkRules rules;
  rules.length = length;
  rules.comma_token = 5;
  rules.comma_backtrack = 3;
  rules.find_embedding = find_fake;
  rules.longest_name = 2;
  return rules;
}
std::vector<TokenChunk> chunks_of(const std::vector<PromptPiece>& pieces, size_t length = 6) {
  return chunk_prompt(pieces, fake_tokens, fake_rules(length), "prompt");
}
constexpr int32_t E = kEmbeddingToken;

TEST(TextualInversionChunks, NamesBecomeTheirVectorsWithTheirPiecesWeight) {
  const auto chunks = chunks_of({{"1 77 2", 1.0}, {"9", 1.5}});
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].tokens, (std::vector<int32_t>{1, E, E, E, 2, E}));
  EXPECT_EQ(chunks[0].weights, (std::vector<float>{1, 1, 1, 1, 1, 1.5f}));
  ASSERT_EQ(chunks[0].embeddings.size(), 2u);
  EXPECT_EQ(chunks[0].embeddings[0].offset, 1u);
  EXPECT_EQ(chunks[0].embeddings[0].index, 0u);
  EXPECT_EQ(chunks[0].embeddings[1].offset, 5u);
  EXPECT_EQ(chunks[0].embeddings[1].index, 1u);
  // A name split between pieces of different weights is two pieces' tokens: no embedding.
  const auto split = chunks_of({{"7", 1.0}, {"7", 1.1}});
  EXPECT_TRUE(split[0].embeddings.empty());
  EXPECT_EQ(split[0].tokens, (std::vector<int32_t>{7, 7}));
}

TEST(TextualInversionChunks, AnEmbeddingNeverSpansTwoChunks) {
  // 4 tokens, then 3 vectors: 7 places, past the chunk's 6; the chunk closes at 4 (padded by
  // the framing) and the vectors start the next one, as A1111's tokenize_line does.
  const auto chunks = chunks_of({{"1234 77 1", 1.0}});
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(chunks[0].tokens, (std::vector<int32_t>{1, 2, 3, 4}));
  EXPECT_TRUE(chunks[0].embeddings.empty());
  EXPECT_EQ(chunks[1].tokens, (std::vector<int32_t>{E, E, E, 1}));
  ASSERT_EQ(chunks[1].embeddings.size(), 1u);
  EXPECT_EQ(chunks[1].embeddings[0].offset, 0u);
  // Exactly filling a chunk is fine.
  const auto fit = chunks_of({{"123 77 1", 1.0}});
  ASSERT_EQ(fit.size(), 2u);
  EXPECT_EQ(fit[0].tokens, (std::vector<int32_t>{1, 2, 3, E, E, E}));
  EXPECT_EQ(fit[1].tokens, (std::vector<int32_t>{1}));
}

TEST(TextualInversionChunks, WordsMovedPastACommaTakeTheirEmbeddingsAlong) {
  // 1 2 3 , 9 (1 place) 4 fill the chunk; 6 finds the comma 3 places back (the backtrack): the
  // words after it move to the next chunk, the embedding with them. (A1111 leaves an embedding's
  // vectors behind, at the padding of the chunk it closes: docs/PROMPTS.md.)
  const auto moves = chunks_of({{"12359 46", 1.0}});
  ASSERT_EQ(moves.size(), 2u);
  EXPECT_EQ(moves[0].tokens, (std::vector<int32_t>{1, 2, 3, 5}));
  EXPECT_TRUE(moves[0].embeddings.empty());
  EXPECT_EQ(moves[1].tokens, (std::vector<int32_t>{E, 4, 6}));
  ASSERT_EQ(moves[1].embeddings.size(), 1u);
  EXPECT_EQ(moves[1].embeddings[0].offset, 0u);
  EXPECT_EQ(moves[1].embeddings[0].index, 1u);
  // With the comma 4 places back nothing moves ...
  const auto stays = chunks_of({{"12577 34", 1.0}});
  ASSERT_EQ(stays.size(), 2u);
  EXPECT_EQ(stays[0].tokens, (std::vector<int32_t>{1, 2, 5, E, E, E}));
  EXPECT_EQ(stays[1].tokens, (std::vector<int32_t>{3, 4}));
  // ... unless the backtrack reaches it: then all 3 vectors move.
  auto rules = fake_rules();
  rules.comma_backtrack = 4;
  const auto all = chunk_prompt({{"12577 34", 1.0}}, fake_tokens, rules, "prompt");
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].tokens, (std::vector<int32_t>{1, 2, 5}));
  EXPECT_EQ(all[1].tokens, (std::vector<int32_t>{E, E, E, 3, 4}));
  ASSERT_EQ(all[1].embeddings.size(), 1u);
  EXPECT_EQ(all[1].embeddings[0].offset, 0u);
}

TEST(TextualInversionChunks, PromptLengthCountsPlacesAndLiteralReadingsCutThroughEmbeddings) {
  ChunkRules rules = fake_rules();
  rules.max_chunks = 2;
  // Long names, few places: 12 names of 2 tokens and 1 vector are 24 tokens but 12 places, two
  // full chunks; one more is too many.
  const std::string twelve = "888888888888888888888888";
  EXPECT_EQ(chunk_prompt({{twelve, 1.0}}, fake_tokens, rules, "prompt").size(), 2u);
  EXPECT_THROW(chunk_prompt({{twelve + "88", 1.0}}, fake_tokens, rules, "prompt"), RequestError);
  EXPECT_THROW(chunk_prompt({{twelve + "1", 1.0}}, fake_tokens, rules, "prompt"), RequestError);
  // prompt_syntax "none": one run, cut at the context like diffusers' tokenizer.
  const auto cut = literal_chunk({1, 2, 3, 4, 7, 7, 1}, find_fake, 6);
  EXPECT_EQ(cut.tokens, (std::vector<int32_t>{1, 2, 3, 4, E, E}));
  ASSERT_EQ(cut.embeddings.size(), 1u);
  EXPECT_EQ(cut.weights, std::vector<float>(6, 1.0f));
}

// --- The model -----------------------------------------------------------------------------------

TEST(TextualInversion, EmbeddingsOfAnotherFamilyOrAClashingNameAreSkippedSayingWhy) {
  sd15().set_textual_inversions({tiemb(), tixl(), nullptr});
  ASSERT_EQ(sd15().textual_inversions().size(), 1u);
  EXPECT_EQ(sd15().textual_inversions()[0].name, "tiemb");
  ASSERT_EQ(sd15().skipped_textual_inversions().size(), 1u);
  EXPECT_EQ(sd15().skipped_textual_inversions()[0].info.name, "tixl");
  EXPECT_NE(sd15().skipped_textual_inversions()[0].reason.find("SDXL embedding"),
            std::string::npos);
  sdxl().set_textual_inversions({tiemb(), tixl()});
  ASSERT_EQ(sdxl().textual_inversions().size(), 1u);
  EXPECT_EQ(sdxl().textual_inversions()[0].name, "tixl");
  EXPECT_NE(sdxl().skipped_textual_inversions().at(0).reason.find("clip_l and clip_g"),
            std::string::npos);
  // A1111 compares lower-cased tokens: "TIEMB" is called by the same word as "tiemb".
  const auto dir = std::filesystem::temp_directory_path() / "sdserve-ti-clash";
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(test::fixture("embeddings/tiny-sd15/tiemb.safetensors"),
                             dir / "TIEMB.safetensors",
                             std::filesystem::copy_options::overwrite_existing);
  const auto upper = TextualInversion::load((dir / "TIEMB.safetensors").string());
  std::filesystem::remove_all(dir);
  // Names are taken in sorted order ("TIEMB" first); a second file of one name is skipped too.
  sd15().set_textual_inversions({tiemb(), upper, tiemb()});
  ASSERT_EQ(sd15().textual_inversions().size(), 1u);
  EXPECT_EQ(sd15().textual_inversions()[0].name, "TIEMB");
  const auto skipped = sd15().skipped_textual_inversions();
  ASSERT_EQ(skipped.size(), 2u);
  EXPECT_EQ(skipped[0].info.name, "tiemb");
  EXPECT_NE(skipped[0].reason.find("same tokens as the name of 'TIEMB'"), std::string::npos)
      << skipped[0].reason;
  EXPECT_NE(skipped[1].reason.find("another embedding has the name 'tiemb'"), std::string::npos)
      << skipped[1].reason;
  // Either spelling in a prompt calls it.
  EXPECT_EQ(sd15().text_input("Tiemb", PromptSyntax::kA1111).embeddings.at(0).name, "TIEMB");
  sd15().set_textual_inversions({});
  EXPECT_TRUE(sd15().textual_inversions().empty());
  EXPECT_TRUE(sd15().skipped_textual_inversions().empty());
}

TEST(TextualInversion, VectorsTakeThePlacesOfTheNamesTokens) {
  const std::string prompt = "a photo of tiemb on a table";
  const auto plain = plain_ids(sd15(), prompt);
  const auto name = sd15().tokenize("tiemb");
  const auto before = sd15().tokenize("a photo of");
  sd15().set_textual_inversions({tiemb(), tistp()});
  const auto in = sd15().text_input(prompt, PromptSyntax::kA1111);
  ASSERT_EQ(in.embeddings.size(), 1u);
  EXPECT_EQ(in.embeddings[0].name, "tiemb");
  EXPECT_EQ(in.embeddings[0].sha256, tiemb()->info().sha256);
  // start, "a photo of", the name's tokens -> 3 vectors, the rest shifted by 3 - name tokens.
  std::vector<int32_t> want(plain.begin(), plain.begin() + 1 + static_cast<long>(before.size()));
  for (int32_t r = 0; r < 3; ++r) want.push_back(kSd15Vocab + r);
  want.insert(want.end(), plain.begin() + 1 + static_cast<long>(before.size() + name.size()),
              plain.end());
  want.resize(77, plain.back());
  EXPECT_EQ(in.ids, want);
  EXPECT_EQ(in.weights, std::vector<float>(77, 1.0f));
  // The same with prompt_syntax "none".
  EXPECT_EQ(sd15().text_input(prompt, PromptSyntax::kNone).ids, want);

  // The encoder's input there is the file's vectors (plus the position embedding, as any token's).
  torch::NoGradGuard no_grad;
  auto& encoder = sd15().impl().text_encoder;
  const auto rows = rows_of(in, {tiemb()}, 0);
  const auto embeddings = encoder->named_children()["embeddings"]->as<ClipEmbeddingsImpl>();
  const auto input = embeddings->forward(ids_tensor(in.ids), rows)[0];
  const auto params = encoder->named_parameters();
  const auto positions = params["embeddings.position_embedding.weight"];
  const auto vocabulary = params["embeddings.token_embedding.weight"];
  for (int64_t p = 0; p < 77; ++p) {
    const int32_t id = in.ids[static_cast<size_t>(p)];
    const auto token = id >= kSd15Vocab ? rows[id - kSd15Vocab] : vocabulary[id];
    ASSERT_TRUE(torch::equal(input[p], token + positions[p])) << p;
  }
}

TEST(TextualInversion, EncodesAsACopyOfTheEncoderWhoseVocabularyGainedTheRows) {
  sd15().set_textual_inversions({tiemb(), tistp(), ticoncept()});
  torch::NoGradGuard no_grad;
  for (const std::string prompt : {"a photo of tiemb on a table", "tistp a red cube tistp",
                                   "a ticoncept, tiemb and tistp in the snow"}) {
    for (const int clip_skip : {1, 2}) {
      SCOPED_TRACE(prompt + " clip_skip " + std::to_string(clip_skip));
      const auto in = sd15().text_input(prompt, PromptSyntax::kA1111);
      ASSERT_FALSE(in.embeddings.empty());
      auto copy =
          with_rows(sd15().impl().text_encoder, rows_of(in, {tiemb(), tistp(), ticoncept()}, 0));
      const auto want = copy->forward(ids_tensor(in.ids), clip_skip - 1);
      const auto got = sd15().encode_text(prompt, clip_skip)->hidden();
      test::expect_close(got, want, 1e-6, "grown vocabulary: " + prompt);
      // And the embedding matters: the prompt read without it is another embedding.
      sd15().set_textual_inversions({});
      EXPECT_GT(test::max_abs_diff(sd15().encode_text(prompt, clip_skip)->hidden(), got), 1e-3);
      sd15().set_textual_inversions({tiemb(), tistp(), ticoncept()});
    }
  }
  // A batch of prompts, each with its own rows, encodes as each alone.
  const std::vector<std::string> prompts = {"tistp", "a cube", "tiemb, tiemb", "ticoncept tistp"};
  const auto together = sd15().encode_texts(prompts);
  for (size_t i = 0; i < prompts.size(); ++i)
    test::expect_close(together[i]->hidden(), sd15().encode_text(prompts[i])->hidden(), 1e-5,
                       "batched: " + prompts[i]);
}

// A1111's "Original" emphasis, written out (as prompt_weighting_test.cpp).
torch::Tensor emphasised(torch::Tensor z, const std::vector<float>& weights) {
  const auto w = torch::tensor(weights).view({1, -1, 1});
  const auto mean = z.mean();
  z = z * w;
  return z * (mean / z.mean());
}

TEST(TextualInversion, WeightsApplyToAnEmbeddingsVectorsAsToItsWord) {
  sd15().set_textual_inversions({tiemb()});
  const auto in = sd15().text_input("a (tiemb:1.2) [cube]", PromptSyntax::kA1111);
  ASSERT_EQ(in.embeddings.size(), 1u);
  EXPECT_EQ(in.ids, sd15().text_input("a tiemb cube", PromptSyntax::kA1111).ids);
  std::vector<float> weights(77, 1.0f);
  weights[2] = weights[3] = weights[4] = 1.2f;  // start, a, the 3 vectors
  weights[5] = static_cast<float>(1 / 1.1);     // cube
  EXPECT_EQ(in.weights, weights);
  const auto plain = sd15().encode_text("a tiemb cube")->hidden();
  const auto got = sd15().encode_text("a (tiemb:1.2) [cube]")->hidden();
  test::expect_close(got, emphasised(plain, weights), 1e-6, "weighted embedding");
  EXPECT_GT(test::max_abs_diff(got, plain), 1e-3);
  // Half the name in brackets is two runs of text: no embedding (A1111 matches within a run).
  EXPECT_TRUE(sd15().text_input("a ti(emb:1.1)", PromptSyntax::kA1111).embeddings.empty());
}

TEST(TextualInversion, ChunksCloseBeforeAnEmbeddingThatWouldNotFit) {
  sd15().set_textual_inversions({tiemb()});
  ASSERT_EQ(sd15().tokenize("cat cat").size(), 2u);
  const auto cats = [](int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += "cat ";
    return s;
  };
  const int32_t cat = sd15().tokenize("cat")[0];
  const auto& t = *sd15().impl().tokenizer;
  // 72 words and 3 vectors fill one chunk exactly ...
  const auto fits = sd15().text_input(cats(72) + "tiemb", PromptSyntax::kA1111);
  ASSERT_EQ(fits.ids.size(), 77u);
  EXPECT_EQ(fits.ids[72], cat);
  EXPECT_EQ(fits.ids[73], kSd15Vocab);
  EXPECT_EQ(fits.ids[75], kSd15Vocab + 2);
  EXPECT_EQ(fits.ids[76], t.eos_id());
  // ... 73 do not: the first chunk ends after them, the vectors open the second.
  const auto spills = sd15().text_input(cats(73) + "tiemb dog", PromptSyntax::kA1111);
  ASSERT_EQ(spills.ids.size(), 154u);
  EXPECT_EQ(spills.ids[73], cat);
  EXPECT_EQ(spills.ids[74], t.eos_id());  // end, then padding
  EXPECT_EQ(spills.ids[77], t.bos_id());
  EXPECT_EQ(spills.ids[78], kSd15Vocab);
  EXPECT_EQ(spills.ids[80], kSd15Vocab + 2);
  EXPECT_EQ(spills.ids[81], sd15().tokenize("dog")[0]);
  // Words after a comma move to the next chunk with their embedding: 70 words, a comma, the
  // 3 vectors and "dog" fill the chunk; "cow" finds the comma 5 places back.
  const auto moved = sd15().text_input(cats(70) + ", tiemb dog cow", PromptSyntax::kA1111);
  ASSERT_EQ(moved.ids.size(), 154u);
  EXPECT_EQ(moved.ids[71], t.find_token(",</w>"));
  EXPECT_EQ(moved.ids[72], t.eos_id());
  EXPECT_EQ(
      std::vector<int32_t>(moved.ids.begin() + 77, moved.ids.begin() + 84),
      (std::vector<int32_t>{t.bos_id(), kSd15Vocab, kSd15Vocab + 1, kSd15Vocab + 2,
                            sd15().tokenize("dog")[0], sd15().tokenize("cow")[0], t.eos_id()}));
  // The encoder reads the second chunk's vectors where they are.
  torch::NoGradGuard no_grad;
  auto copy = with_rows(sd15().impl().text_encoder, rows_of(moved, {tiemb()}, 0));
  const auto ids = ids_tensor(moved.ids).view({2, 77});
  test::expect_close(sd15().encode_text(cats(70) + ", tiemb dog cow")->hidden(),
                     copy->forward(ids).reshape({1, 154, -1}), 1e-5, "second chunk");
  // prompt_syntax "none" cuts at 75 tokens, through the embedding.
  const auto cut = sd15().text_input(cats(73) + "tiemb", PromptSyntax::kNone);
  ASSERT_EQ(cut.ids.size(), 77u);
  EXPECT_EQ(cut.ids[74], kSd15Vocab);
  EXPECT_EQ(cut.ids[75], kSd15Vocab + 1);
  EXPECT_EQ(cut.ids[76], t.eos_id());
}

TEST(TextualInversion, SdxlFeedsClipLToTheFirstEncoderAndClipGToTheSecond) {
  sdxl().set_textual_inversions({tixl()});
  auto& impl = sdxl().impl();
  torch::NoGradGuard no_grad;
  for (const auto role : {TextRole::kPrompt, TextRole::kNegative}) {
    const std::string prompt = "a photo of tixl";
    const auto in1 = impl.text_input(*impl.tokenizer, prompt, PromptSyntax::kA1111, role);
    const auto in2 = impl.text_input(*impl.tokenizer_2, prompt, PromptSyntax::kA1111, role);
    ASSERT_EQ(in1.embeddings.size(), 1u);
    ASSERT_EQ(in2.embeddings.size(), 1u);
    const auto first = with_rows(impl.text_encoder, rows_of(in1, {tixl()}, 0))
                           ->encode_unnormed(ids_tensor(in1.ids), 1);
    const auto second = with_rows(impl.text_encoder_2, rows_of(in2, {tixl()}, 1))
                            ->encode_unnormed(ids_tensor(in2.ids), 1);
    const auto got = sdxl().encode_text(prompt, 1, role);
    test::expect_close(got->hidden(), torch::cat({first.hidden, second.hidden}, -1), 1e-6,
                       "sdxl hidden");
    test::expect_close(got->pooled(), second.pooled, 1e-6, "sdxl pooled");
  }
}

TEST(TextualInversion, SettingEmbeddingsWhileEncodingIsSafe) {
  const std::string prompt = "a photo of tiemb";
  sd15().set_textual_inversions({});
  const auto without = sd15().encode_text(prompt)->hidden();
  sd15().set_textual_inversions({tiemb()});
  const auto with = sd15().encode_text(prompt)->hidden();
  std::atomic<bool> stop{false};
  std::thread setter([&] {
    const auto ti = tiemb();
    const std::vector<TextualInversionPtr> on{ti}, off;
    for (int i = 0; !stop; ++i) sd15().set_textual_inversions(i % 2 ? on : off);
  });
  int saw_with = 0, saw_without = 0;
  for (int i = 0; i < 40; ++i) {
    const auto h = sd15().encode_text(prompt)->hidden();
    if (torch::equal(h, with))
      ++saw_with;
    else if (torch::equal(h, without))
      ++saw_without;
    else
      ADD_FAILURE() << "an encode mixed two sets of embeddings";
    sd15().text_input(prompt, PromptSyntax::kA1111);
  }
  stop = true;
  setter.join();
  EXPECT_EQ(saw_with + saw_without, 40);
}

// --- diffusers' load_textual_inversion (tests/fixtures/ti-reference.safetensors) ---------------

TEST(TextualInversion, MatchesDiffusersLoadTextualInversion) {
  const auto reference = test::fixture("ti-reference.safetensors");
  if (!std::filesystem::exists(reference))
    GTEST_SKIP() << "no diffusers reference (tests/fixtures/ti-reference.safetensors): it is made "
                    "where transformers is installed (the GPU machine); "
                    "tests/fixtures/make/README.md says how";
  const auto refs = load_all(reference);
  std::ifstream in(test::fixture("ti-cases.json"));
  const auto cases = nlohmann::json::parse(in).at("cases");
  int compared = 0;
  for (const auto& c : cases) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    std::vector<TextualInversionPtr> list;
    for (const auto& rel : c["embeddings"]) list.push_back(embedding(rel.get<std::string>()));
    const bool xl = c["family"] == "sdxl";
    Model& model = xl ? sdxl() : sd15();
    model.set_textual_inversions(list);
    const std::string prompt = c["prompt"];
    // Token for token: diffusers adds each vector as a token after the vocabulary, in the order
    // it loads them, which the cases use them in.
    const auto ids = ids_tensor(model.text_input(prompt, PromptSyntax::kA1111).ids);
    EXPECT_TRUE(torch::equal(ids.to(torch::kFloat32), refs.at(name + "_tokens")));
    if (!xl) {
      const int clip_skip = c.value("clip_skip", 1);
      test::expect_close(model.encode_text(prompt, clip_skip)->hidden(), refs.at(name),
                         test::kModuleTolerance, name);
    } else {
      const auto e = model.encode_text(prompt);
      test::expect_close(e->hidden(), refs.at(name + "_prompt_embeds"), test::kModuleTolerance,
                         name);
      test::expect_close(e->pooled(), refs.at(name + "_pooled"), test::kModuleTolerance, name);
      if (c.contains("negative_prompt")) {
        const auto n = model.encode_text(c["negative_prompt"], 1, TextRole::kNegative);
        test::expect_close(n->hidden(), refs.at(name + "_negative_embeds"), test::kModuleTolerance,
                           name + " negative");
        test::expect_close(n->pooled(), refs.at(name + "_negative_pooled"), test::kModuleTolerance,
                           name + " negative");
      }
    }
    ++compared;
  }
  EXPECT_EQ(compared, 7);
  sd15().set_textual_inversions({});
  sdxl().set_textual_inversions({});
}

}  // namespace ti_test
}  // namespace sdserve::pipeline
