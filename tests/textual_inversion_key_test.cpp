// The prompt-embedding cache knows textual-inversion embeddings (issue #25): its key is the text
// encoder's fingerprint plus the token ids and weights, and an embedding changes the embedding
// where the ids may not change (a file replaced by another of the same name), so the key holds
// the files' hashes too (engine/worker_text.cpp). Shown through the engine with the real tiny
// model and a cache that records the keys it is asked for.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "cache/embedding_cache.h"
#include "engine/engine.h"
#include "pipeline/io/safetensors.h"
#include "pipeline/pipeline.h"
#include "pipeline/textual_inversion.h"
#include "test_util.h"

namespace sdserve::engine {
namespace ti_key_test {

using namespace std::chrono_literals;

// Caches nothing and remembers every key looked up and stored. `on_find` runs once, at the next
// lookup: between the keys' making and the encoding.
class KeyRecorder final : public cache::EmbeddingCache {
 public:
  std::shared_ptr<const void> find(const std::string&, const std::string& key,
                                   const cache::ValueCodec&) override {
    std::function<void()> hook;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      keys_.push_back(key);
      hook = std::exchange(on_find, {});
    }
    if (hook) hook();
    return nullptr;
  }
  void store(const std::string&, const std::string& key, std::shared_ptr<const void>, uint64_t,
             const cache::ValueCodec&) override {
    std::lock_guard<std::mutex> lock(mutex_);
    stored_.push_back(key);
  }
  std::vector<std::string> take() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(keys_, {});
  }
  std::vector<std::string> take_stored() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(stored_, {});
  }
  void arm(std::function<void()> hook) {
    std::lock_guard<std::mutex> lock(mutex_);
    on_find = std::move(hook);
  }

 private:
  std::mutex mutex_;
  std::vector<std::string> keys_, stored_;
  std::function<void()> on_find;
};

// An embedding named `name` with 3 vectors of the tiny SD 1.x size, all `value`.
pipeline::TextualInversionPtr embedding(const std::string& dir, const std::string& name,
                                        float value) {
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/" + name + ".safetensors";
  pipeline::TensorData t{pipeline::DType::kF32, {3, 32}, std::vector<std::byte>(3 * 32 * 4)};
  for (size_t i = 0; i < 3 * 32; ++i) std::memcpy(t.bytes.data() + i * 4, &value, 4);
  pipeline::write_safetensors(path, {{"emb_params", t}});
  return pipeline::TextualInversion::load(path);
}

TEST(TextualInversionCacheKey, EmbeddingsAreInTheKeyAndEqualRequestsShareIt) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("sdserve-ti-key-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto first = embedding(dir.string() + "/a", "tiemb", 0.05f);
  const auto second = embedding(dir.string() + "/b", "tiemb", -0.05f);  // same name, other file
  std::filesystem::remove_all(dir);

  const auto model = pipeline::Model::load(test::model_dir(), {"cpu", "fp32", "", ""});
  const auto recorder = std::make_shared<KeyRecorder>();
  auto engine = Engine::create({}, {model}, recorder);
  for (int i = 0; i < 600 && !engine->ready(); ++i) std::this_thread::sleep_for(50ms);
  ASSERT_TRUE(engine->ready());
  recorder->take();  // the warm-up's

  // The prompt's key for one job (guidance 1: no negative prompt).
  const auto key = [&](const std::string& prompt) {
    JobRequest r;
    r.prompt = prompt;
    r.width = r.height = 64;
    r.steps = 1;
    r.guidance_scale = 1;
    const auto id = engine->submit(r).id;
    for (int i = 0; i < 1200; ++i) {
      const auto job = engine->get(id);
      if (job && is_final(job->status)) break;
      std::this_thread::sleep_for(50ms);
    }
    const auto keys = recorder->take();
    EXPECT_EQ(keys.size(), 1u);
    return keys.empty() ? std::string() : keys.front();
  };
  const std::string prompt = "a photo of tiemb";
  const auto without = key(prompt);
  EXPECT_EQ(key(prompt), without);  // two equal requests share the key

  model->set_textual_inversions({first});
  const auto with_first = key(prompt);
  EXPECT_NE(with_first, without);
  EXPECT_EQ(key(prompt), with_first);

  // The same name, another file: the ids are the same, the key is not.
  model->set_textual_inversions({second});
  ASSERT_EQ(model->text_input(prompt, pipeline::PromptSyntax::kA1111).ids, [&] {
    model->set_textual_inversions({first});
    auto ids = model->text_input(prompt, pipeline::PromptSyntax::kA1111).ids;
    model->set_textual_inversions({second});
    return ids;
  }());
  const auto with_second = key(prompt);
  EXPECT_NE(with_second, with_first);
  EXPECT_NE(with_second, without);
  EXPECT_EQ(key(prompt), with_second);

  // A prompt that calls no embedding keeps its key whatever is set.
  model->set_textual_inversions({});
  const auto plain = key("a red cube");
  model->set_textual_inversions({first});
  EXPECT_EQ(key("a red cube"), plain);

  // Embeddings set while a prompt is being encoded (the server refreshing its folder): what the
  // encoder made reads the new set, so it is not stored under the key made before.
  model->set_textual_inversions({});
  recorder->take_stored();
  recorder->arm([&] { model->set_textual_inversions({first}); });
  EXPECT_EQ(key(prompt), without);
  EXPECT_TRUE(recorder->take_stored().empty());
  EXPECT_EQ(key(prompt), with_first);  // and the next request makes and stores its own
  EXPECT_EQ(recorder->take_stored(), std::vector<std::string>{with_first});
}

}  // namespace ti_key_test
}  // namespace sdserve::engine
