// The worker's text side, on its text thread: prompt embeddings for admitted images (cache
// lookups, the misses encoded together), handed to the loop as Prepared images.
#include <chrono>
#include <cstring>
#include <map>
#include <tuple>

#include "cache/sha256.h"
#include "engine/worker.h"
#include "pipeline/errors.h"
#include "pipeline/log.h"

namespace sdserve::engine {

// The key of a prompt's embedding in every cache tier: what decides the embedding (the text
// encoder's weights and config, the dtype, clip_skip, the token ids and their weights, the
// textual-inversion embeddings they call), never the raw prompt, so two models never share
// entries and two spellings that tokenise alike do.
std::string Worker::embedding_key(const ModelRunner& model, const PromptKey& p) const {
  const auto& info = model.info();
  const int clip_skip = pipeline::effective_clip_skip(info, p.clip_skip, p.role);
  std::string text = "sdserve embedding\n" + info.text_fingerprint + "\n" + info.family + "\n" +
                     info.precision + "\nclip_skip " + std::to_string(clip_skip);
  // SDXL: a negative's embedding differs from the same text's as a prompt.
  if (info.negatives_differ && p.role == pipeline::TextRole::kNegative) text += "\nnegative";
  // Text-encoder LoRAs change the embedding, not the tokens.
  if (!p.lora_key.empty()) text += "\nloras" + p.lora_key;
  const auto in = model.text_input(p.prompt, p.syntax, p.role);
  text += "\nids";
  for (int32_t id : in.ids) text += " " + std::to_string(id);
  // Weights as their bit patterns: exact, and short for the usual all-ones.
  text += "\nweights";
  for (float w : in.weights) {
    uint32_t bits = 0;
    std::memcpy(&bits, &w, sizeof bits);
    text += " " + (w == 1.0f ? std::string("1") : std::to_string(bits));
  }
  // Textual-inversion embeddings: their files decide what the ids past the vocabulary read.
  for (const auto& e : in.embeddings) text += "\nembedding " + e.sha256;
  return cache::sha256_hex(text);
}

// Embeddings for (prompt, clip_skip, role, syntax) keys: the cache's where it has them; the misses
// encoded together (one text-encoder call per clip_skip, role and syntax) and stored. A non-empty
// `errors` entry says why that prompt could not be encoded.
std::vector<pipeline::EmbeddingPtr> Worker::embeddings(const std::shared_ptr<ModelRunner>& model,
                                                       const std::vector<PromptKey>& prompts,
                                                       std::vector<std::string>* errors) {
  errors->assign(prompts.size(), "");
  // Embeddings to bytes and back for the cache's shared tier, by this model (the lambdas hold
  // it: the cache may call them on its own thread later).
  cache::ValueCodec codec;
  codec.to_bytes = [model](const void* value) {
    return model->embedding_to_bytes(*static_cast<const pipeline::Embedding*>(value));
  };
  codec.from_bytes = [model](std::string_view bytes) -> std::shared_ptr<const void> {
    return model->embedding_from_bytes(bytes);
  };
  std::vector<std::string> keys;
  for (size_t i = 0; i < prompts.size(); ++i) {
    try {
      keys.push_back(embedding_key(*model, prompts[i]));
    } catch (const std::exception& e) {  // checked at submission; kept from others' jobs anyway
      keys.push_back("unencodable\n" + std::to_string(i));
      (*errors)[i] = e.what();
    }
  }
  std::vector<pipeline::EmbeddingPtr> out;
  for (auto& v : engine_.cache->find_many(device_, keys, codec))
    out.push_back(std::static_pointer_cast<const pipeline::Embedding>(v));
  const auto key_now = [&](size_t i) {
    try {
      return embedding_key(*model, prompts[i]);
    } catch (const std::exception&) {
      return std::string();
    }
  };
  // By (clip_skip, role, syntax, text-encoder LoRAs); each distinct key once.
  std::map<std::tuple<int, pipeline::TextRole, pipeline::PromptSyntax, std::string>,
           std::vector<size_t>>
      misses;
  std::map<std::string, size_t> first;
  for (size_t i = 0; i < prompts.size(); ++i)
    if (!out[i] && (*errors)[i].empty() && first.emplace(keys[i], i).second)
      misses[{prompts[i].clip_skip, prompts[i].role, prompts[i].syntax, prompts[i].lora_key}]
          .push_back(i);
  for (const auto& [group, idx] : misses) {
    const auto& [clip_skip, role, syntax, lora_key] = group;
    const auto& loras = prompts[idx.front()].loras;  // the same set for the whole group
    std::vector<std::string> texts;
    for (size_t i : idx) texts.push_back(prompts[i].prompt);
    const auto start = SteadyClock::now();
    std::vector<pipeline::EmbeddingPtr> encoded;
    try {
      encoded = model->encode_for(texts, clip_skip, role, syntax, loras);
    } catch (const std::exception&) {
      // One bad prompt must not fail the others: encode each alone to find it.
      encoded.clear();
      for (size_t j = 0; j < idx.size(); ++j) {
        try {
          encoded.push_back(model->encode_for({texts[j]}, clip_skip, role, syntax, loras).at(0));
        } catch (const std::exception& e) {
          encoded.push_back(nullptr);
          (*errors)[idx[j]] = e.what();
        }
      }
    }
    {
      std::lock_guard<std::mutex> lock(engine_.mutex);
      engine_.stats.text_encode.observe(
          std::chrono::duration<double>(SteadyClock::now() - start).count());
    }
    for (size_t j = 0; j < idx.size(); ++j) {
      out[idx[j]] = encoded[j];
      // Stored only under the key it was made for: textual-inversion embeddings set meanwhile
      // (pipeline::Model::set_textual_inversions) change what a prompt reads, and its key.
      if (encoded[j] && (*errors)[idx[j]].empty() && key_now(idx[j]) == keys[idx[j]])
        engine_.cache->store(device_, keys[idx[j]], encoded[j], model->embedding_size(*encoded[j]),
                             codec);
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i) {  // repeats of a key encoded above
    const auto it = first.find(keys[i]);
    if (it == first.end() || it->second == i) continue;
    const size_t f = it->second;
    out[i] = out[f];
    (*errors)[i] = (*errors)[f];
  }
  return out;
}

std::vector<Worker::Prepared> Worker::prepare(const std::vector<Admission>& admitted) {
  // A job's images share its prompt embeddings: looked up (or encoded) once per job in a batch,
  // all of a model's together. (Its images in later batches hit the in-memory cache.)
  constexpr size_t kNone = static_cast<size_t>(-1);  // no unconditional prompt (no CFG)
  struct Group {
    std::shared_ptr<ModelRunner> model;
    std::vector<PromptKey> prompts;
    std::vector<std::string> errors;
    std::vector<pipeline::EmbeddingPtr> found;
  };
  std::map<const ModelRunner*, Group> groups;
  // job -> (cond, uncond) indices in its model's group
  std::map<const JobState*, std::pair<size_t, size_t>> slots;
  for (const auto& a : admitted) {
    if (slots.count(a.job.get())) continue;
    Group& g = groups[a.model.get()];
    g.model = a.model;
    std::pair<size_t, size_t> slot{g.prompts.size(), kNone};
    const auto& request = a.job->request;
    // The LoRAs that change the text encoders: those with text-encoder adapters and a weight.
    std::vector<pipeline::LoraUse> te;
    std::string lora_key;
    for (const auto& l : request.loras) {
      if (!l.file || !l.text_encoder || l.te_weight == 0) continue;
      te.push_back({l.file, l.unet_weight, l.te_weight});
      uint64_t bits = 0;
      std::memcpy(&bits, &l.te_weight, sizeof bits);
      lora_key += " " + l.name + " " + l.sha256 + " " + std::to_string(bits);  // submit() hashed
    }
    g.prompts.push_back({request.prompt, request.clip_skip, pipeline::TextRole::kPrompt,
                         request.prompt_syntax, te, lora_key});
    if (request.guidance_scale > 1.0) {
      slot.second = g.prompts.size();
      g.prompts.push_back({request.negative_prompt, request.clip_skip,
                           pipeline::TextRole::kNegative, request.prompt_syntax, te, lora_key});
    }
    slots[a.job.get()] = slot;
  }
  for (auto& [ptr, g] : groups) {
    try {
      g.found = embeddings(g.model, g.prompts, &g.errors);
    } catch (const std::exception& e) {  // the batch's jobs fail; the thread goes on
      g.found.assign(g.prompts.size(), nullptr);
      g.errors.assign(g.prompts.size(), std::string("prompt embeddings failed: ") + e.what());
    }
  }
  std::vector<Prepared> out;
  for (const auto& admission : admitted) {
    Prepared p{admission, nullptr, nullptr, {}};
    const Group& g = groups.at(admission.model.get());
    const auto [c, u] = slots.at(admission.job.get());
    p.error = g.errors[c];
    p.cond = g.found[c];
    if (u != kNone) {
      if (p.error.empty()) p.error = g.errors[u];
      p.uncond = g.found[u];
    }
    out.push_back(std::move(p));
  }
  return out;
}

void Worker::text_loop() {
  for (;;) {
    std::vector<Admission> batch;
    {
      std::unique_lock<std::mutex> lock(text_mutex_);
      text_cv_.wait(lock, [&] { return !to_prepare_.empty() || text_exit_; });
      if (to_prepare_.empty()) return;
      batch.swap(to_prepare_);
    }
    auto prepared = prepare(batch);
    {
      std::lock_guard<std::mutex> lock(text_mutex_);
      for (auto& p : prepared) prepared_.push_back(std::move(p));
      prepared_count_ = prepared_.size();
    }
    // The worker may be waiting for work with nothing active.
    std::lock_guard<std::mutex> lock(engine_.mutex);
    engine_.work_cv.notify_all();
  }
}

}  // namespace sdserve::engine
