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
// encoder's weights and config, the dtype, clip_skip, the token ids and their weights), never the
// raw prompt, so two models never share entries and two spellings that tokenise alike do.
std::string Worker::embedding_key(const PromptKey& p) const {
  const auto& info = model_.info();
  const int clip_skip = pipeline::effective_clip_skip(info, p.clip_skip, p.role);
  std::string text = "sdserve embedding\n" + info.text_fingerprint + "\n" + info.family + "\n" +
                     info.precision + "\nclip_skip " + std::to_string(clip_skip);
  // SDXL: a negative's embedding differs from the same text's as a prompt.
  if (info.negatives_differ && p.role == pipeline::TextRole::kNegative) text += "\nnegative";
  const auto in = model_.text_input(p.prompt, p.syntax, p.role);
  text += "\nids";
  for (int32_t id : in.ids) text += " " + std::to_string(id);
  // Weights as their bit patterns: exact, and short for the usual all-ones.
  text += "\nweights";
  for (float w : in.weights) {
    uint32_t bits = 0;
    std::memcpy(&bits, &w, sizeof bits);
    text += " " + (w == 1.0f ? std::string("1") : std::to_string(bits));
  }
  return cache::sha256_hex(text);
}

// Embeddings for (prompt, clip_skip, role, syntax) keys: the cache's where it has them; the misses
// encoded together (one text-encoder call per clip_skip, role and syntax) and stored. A non-empty
// `errors` entry says why that prompt could not be encoded.
std::vector<pipeline::EmbeddingPtr> Worker::embeddings(const std::vector<PromptKey>& prompts,
                                                       std::vector<std::string>* errors) {
  errors->assign(prompts.size(), "");
  std::vector<std::string> keys;
  for (size_t i = 0; i < prompts.size(); ++i) {
    try {
      keys.push_back(embedding_key(prompts[i]));
    } catch (const std::exception& e) {  // checked at submission; kept from others' jobs anyway
      keys.push_back("unencodable\n" + std::to_string(i));
      (*errors)[i] = e.what();
    }
  }
  std::vector<pipeline::EmbeddingPtr> out;
  for (auto& v : engine_.cache->find_many(device_, keys, codec_))
    out.push_back(std::static_pointer_cast<const pipeline::Embedding>(v));
  // By (clip_skip, role, syntax); each distinct key once.
  std::map<std::tuple<int, pipeline::TextRole, pipeline::PromptSyntax>, std::vector<size_t>> misses;
  std::map<std::string, size_t> first;
  for (size_t i = 0; i < prompts.size(); ++i)
    if (!out[i] && (*errors)[i].empty() && first.emplace(keys[i], i).second)
      misses[{prompts[i].clip_skip, prompts[i].role, prompts[i].syntax}].push_back(i);
  for (const auto& [group, idx] : misses) {
    const auto [clip_skip, role, syntax] = group;
    std::vector<std::string> texts;
    for (size_t i : idx) texts.push_back(prompts[i].prompt);
    const auto start = SteadyClock::now();
    std::vector<pipeline::EmbeddingPtr> encoded;
    try {
      encoded = model_.encode_for(texts, clip_skip, role, syntax);
    } catch (const std::exception&) {
      // One bad prompt must not fail the others: encode each alone to find it.
      encoded.clear();
      for (size_t j = 0; j < idx.size(); ++j) {
        try {
          encoded.push_back(model_.encode_for({texts[j]}, clip_skip, role, syntax).at(0));
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
      if (encoded[j] && (*errors)[idx[j]].empty())
        engine_.cache->store(device_, keys[idx[j]], encoded[j], model_.embedding_size(*encoded[j]),
                             codec_);
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
  // all of the batch's together. (Its images in later batches hit the in-memory cache.)
  constexpr size_t kNone = static_cast<size_t>(-1);  // no unconditional prompt (no CFG)
  std::vector<PromptKey> prompts;
  std::map<const JobState*, std::pair<size_t, size_t>> slots;  // job -> (cond, uncond) indices
  for (const auto& [job, k] : admitted) {
    if (slots.count(job.get())) continue;
    std::pair<size_t, size_t> slot{prompts.size(), kNone};
    const auto syntax = job->request.prompt_syntax;
    prompts.push_back(
        {job->request.prompt, job->request.clip_skip, pipeline::TextRole::kPrompt, syntax});
    if (job->request.guidance_scale > 1.0) {
      slot.second = prompts.size();
      prompts.push_back({job->request.negative_prompt, job->request.clip_skip,
                         pipeline::TextRole::kNegative, syntax});
    }
    slots[job.get()] = slot;
  }
  std::vector<std::string> errors;
  std::vector<pipeline::EmbeddingPtr> found;
  try {
    if (!prompts.empty()) found = embeddings(prompts, &errors);
  } catch (const std::exception& e) {  // the batch's jobs fail; the thread goes on
    found.assign(prompts.size(), nullptr);
    errors.assign(prompts.size(), std::string("prompt embeddings failed: ") + e.what());
  }
  std::vector<Prepared> out;
  for (const auto& admission : admitted) {
    Prepared p{admission, nullptr, nullptr, {}};
    const auto [c, u] = slots.at(admission.first.get());
    p.error = errors[c];
    p.cond = found[c];
    if (u != kNone) {
      if (p.error.empty()) p.error = errors[u];
      p.uncond = found[u];
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
