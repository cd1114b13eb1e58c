// Prompt embeddings as bytes for the shared (Redis) cache tier, and the text encoder's
// fingerprint that keys them (pipeline/embedding_io.cpp). Bytes from outside the process are
// never trusted: anything that is not exactly this model's embedding is refused.
#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <thread>

#include "cache/embedding_cache.h"
#include "pipeline/errors.h"
#include "pipeline/model_impl.h"
#include "test_util.h"
#include "tests/redis_server.h"

namespace sdserve::pipeline {
namespace {

// An embedding of the model's shape and dtype with arbitrary values (the CPU cannot run every
// dtype's text encoder; serialisation does not care where the values came from).
EmbeddingPtr embedding_like(const Model& model, uint64_t seed) {
  torch::manual_seed(seed);
  const int64_t context =
      static_cast<int64_t>(model.text_input("", PromptSyntax::kNone).ids.size());
  const int64_t hidden = model.impl().text_encoder->config().hidden_size;
  return std::make_shared<Embedding>(torch::randn({1, context, hidden}).to(model.impl().dtype));
}

// The tiny model on the CPU, set to compute in `dtype`. Only fp32 loads on the CPU; the byte
// format depends on nothing but the model's dtype and shape, so the others are set directly.
// The cache's view of the model's embeddings, as the engine's workers give it.
cache::ValueCodec codec_for(const std::shared_ptr<Model>& model) {
  cache::ValueCodec codec;
  codec.to_bytes = [model](const void* v) {
    return model->embedding_to_bytes(*static_cast<const Embedding*>(v));
  };
  codec.from_bytes = [model](std::string_view b) -> std::shared_ptr<const void> {
    return model->embedding_from_bytes(b);
  };
  return codec;
}

std::shared_ptr<Model> load(torch::Dtype dtype = torch::kFloat32) {
  LoadOptions o;
  o.device = "cpu";
  auto model = Model::load(test::model_dir(), o);
  model->impl().dtype = dtype;
  return model;
}

TEST(EmbeddingBytes, SdxlRoundTripKeepsThePooledEmbedding) {
  LoadOptions o;
  o.device = "cpu";
  const auto model = Model::load(test::fixture("tiny-sdxl"), o);
  const auto e = model->encode_text("a photo of a cat");
  ASSERT_TRUE(e->pooled().defined());
  const auto back = model->embedding_from_bytes(model->embedding_to_bytes(*e));
  EXPECT_TRUE(torch::equal(back->hidden(), e->hidden()));
  EXPECT_TRUE(torch::equal(back->pooled(), e->pooled()));
  EXPECT_EQ(Model::embedding_size(*back), Model::embedding_size(*e));
  // An SD 1.x embedding (no pooled part, format 1) is not this model's.
  const auto sd1 = load();
  EXPECT_THROW(model->embedding_from_bytes(sd1->embedding_to_bytes(*embedding_like(*sd1, 1))),
               ModelError);
}

TEST(EmbeddingBytes, RoundTripIsExactForEveryDtype) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    const auto model = load(dtype);
    const auto e = embedding_like(*model, 7);
    const std::string bytes = model->embedding_to_bytes(*e);
    const auto back = model->embedding_from_bytes(bytes);
    ASSERT_TRUE(back);
    EXPECT_EQ(back->hidden().scalar_type(), e->hidden().scalar_type());
    EXPECT_TRUE(torch::equal(back->hidden(), e->hidden()));  // bit for bit
    EXPECT_EQ(Model::embedding_size(*back), Model::embedding_size(*e));
    EXPECT_GT(bytes.size(), Model::embedding_size(*e));  // the header
  }
}

// Through a real redis-server: what one cache stores, a second (empty) cache reads back exactly.
TEST(EmbeddingBytes, RoundTripThroughRedisForEveryDtype) {
  if (!test::RedisServer::available()) GTEST_SKIP() << "redis-server is not installed";
  test::RedisServer redis;
  for (const auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    const auto model = load(dtype);
    const auto codec = codec_for(model);
    cache::TieredCacheOptions o;
    o.redis_url = redis.url();
    o.redis_timeout = std::chrono::milliseconds(2000);
    const auto e = embedding_like(*model, 11);
    const std::string key = "dtype-" + std::string(c10::toString(dtype));
    {
      cache::TieredEmbeddingCache writer(o);
      writer.store("cpu", key, e, Model::embedding_size(*e), codec);
      // The write is asynchronous; a reader without a memory tier sees it once it landed.
      o.memory_bytes = 0;
      cache::TieredEmbeddingCache reader(o);
      std::shared_ptr<const void> got;
      for (int i = 0; i < 200 && !got; ++i) {
        got = reader.find("cpu", key, codec);
        if (!got) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      ASSERT_TRUE(got);
      const auto& back = static_cast<const Embedding*>(got.get())->hidden();
      EXPECT_EQ(back.scalar_type(), dtype);
      EXPECT_TRUE(torch::equal(back, e->hidden()));
      EXPECT_EQ(reader.stats().redis_hits, 1u);
    }
  }
}

// embedding_cache_on_host: the memory tier keeps bytes in host memory (written by the cache's
// background thread) and a hit becomes a tensor on the model's device again, bit for bit.
TEST(EmbeddingBytes, HostMemoryTierRoundTrips) {
  const auto model = load();
  const auto codec = codec_for(model);
  cache::TieredCacheOptions o;
  o.memory_on_host = true;
  cache::TieredEmbeddingCache host(o);
  const auto e = embedding_like(*model, 5);
  host.store("cpu", "k", e, Model::embedding_size(*e), codec);
  std::shared_ptr<const void> got;
  for (int i = 0; i < 200 && !got; ++i) {
    got = host.find("cpu", "k", codec);
    if (!got) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(got);
  EXPECT_NE(got.get(), e.get());  // a new tensor made from the bytes
  EXPECT_TRUE(torch::equal(static_cast<const Embedding*>(got.get())->hidden(), e->hidden()));
  // Host bytes serve every device: another scope finds the same entry.
  EXPECT_TRUE(host.find("cuda:1", "k", codec));
  const auto stats = host.stats();
  EXPECT_EQ(stats.entries, 1u);
  EXPECT_GE(stats.bytes, model->embedding_to_bytes(*e).size());
}

TEST(EmbeddingBytes, AnythingElseIsRefused) {
  const auto model = load();
  const std::string good = model->embedding_to_bytes(*model->encode_text("a cat"));
  auto refused = [&](std::string bytes, const std::string& why) {
    try {
      model->embedding_from_bytes(bytes);
      ADD_FAILURE() << "accepted: " << why;
    } catch (const ModelError& e) {
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
  };
  refused("", "not an sdserve embedding");
  refused("garbage that is long enough to have a header and more", "not an sdserve embedding");
  refused(good.substr(0, 6), "truncated");
  std::string v = good;
  v[4] = 2;  // format version 2
  refused(v, "format version");
  std::string d = good;
  d[8] = 2;  // fp16 bytes for an fp32 model
  refused(d, "dtype");
  std::string shape = good;
  shape[18] ^= 1;  // the second dimension (context length)
  refused(shape, "shape");
  refused(good.substr(0, good.size() - 1), "data bytes");
  refused(good + "x", "data bytes");
  std::string nan = good;
  const float q = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&nan[nan.size() - sizeof q], &q, sizeof q);
  refused(nan, "not finite");
  // fp16 bytes are refused by an fp32 model and the other way round.
  const auto half = load(torch::kFloat16);
  refused(half->embedding_to_bytes(*embedding_like(*half, 3)), "dtype");
}

TEST(EmbeddingBytes, FingerprintFollowsTheWeights) {
  const auto a = load(), b = load();
  EXPECT_EQ(a->info().text_fingerprint.size(), 32u);
  EXPECT_EQ(a->info().text_fingerprint, b->info().text_fingerprint);  // same weights, same id
  // Changing one weight changes it.
  {
    torch::NoGradGuard g;
    a->impl().text_encoder->parameters()[0].view(-1)[0] += 1;
  }
  EXPECT_NE(text_encoder_fingerprint(a->impl().text_encoder, "{}"),
            text_encoder_fingerprint(b->impl().text_encoder, "{}"));
}

TEST(EmbeddingBytes, EqualTokenIdsMeanEqualInput) {
  const auto model = load();
  // CLIP's tokenizer lower-cases and folds whitespace: both spellings read the same ids, so
  // they share a cache key.
  EXPECT_EQ(model->text_input("A  Red   Fox", PromptSyntax::kNone).ids,
            model->text_input("a red fox", PromptSyntax::kNone).ids);
  EXPECT_NE(model->text_input("a red fox", PromptSyntax::kNone).ids,
            model->text_input("a red box", PromptSyntax::kNone).ids);
  EXPECT_EQ(model->text_input("", PromptSyntax::kNone).ids.size(),
            model->text_input("a red fox", PromptSyntax::kNone).ids.size());
}

}  // namespace
}  // namespace sdserve::pipeline
