#include "engine/worker.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <future>
#include <map>
#include <optional>
#include <tuple>

#include "cache/sha256.h"
#include "pipeline/errors.h"
#include "pipeline/log.h"

namespace sdserve::engine {
namespace {

pipeline::GenerateRequest generate_request_of(const JobState& job) {
  pipeline::GenerateRequest r;
  r.prompt = job.request.prompt;
  r.negative_prompt = job.request.negative_prompt;
  r.clip_skip = job.request.clip_skip;
  r.prompt_syntax = job.request.prompt_syntax;
  r.num_images = job.request.num_images;
  r.image = image_spec(job.request, 0);
  return r;
}

void log_error(const std::string& what) {
  pipeline::log(pipeline::LogLevel::kError, what);
}

}  // namespace

void Engine::Impl::worker_loop(size_t index) {
  Worker(*this, *models[index], index).run();
}

Worker::Worker(Engine::Impl& engine, ModelRunner& model, size_t index)
    : engine_(engine), model_(model), index_(index), device_(model.info().device) {
  // The cache may call these on its own thread after this worker is gone: they hold the model.
  std::shared_ptr<ModelRunner> runner = engine.models[index];
  codec_.to_bytes = [runner](const void* value) {
    return runner->embedding_to_bytes(*static_cast<const pipeline::Embedding*>(value));
  };
  codec_.from_bytes = [runner](std::string_view bytes) -> std::shared_ptr<const void> {
    return runner->embedding_from_bytes(bytes);
  };
}

void Worker::run() {
  if (warm_up()) {
    text_ = std::thread([this] { text_loop(); });
    for (;;) {
      std::vector<Admission> admitted;
      if (!retire_and_admit(&admitted)) break;
      if (!admitted.empty()) {
        preparing_ += admitted.size();
        {
          std::lock_guard<std::mutex> lock(text_mutex_);
          for (auto& a : admitted) to_prepare_.push_back(std::move(a));
        }
        text_cv_.notify_one();
      }
      activate();
      if (active_.empty() || !step()) continue;
      publish();
      send_previews();
      finish();
    }
    {
      std::lock_guard<std::mutex> lock(text_mutex_);
      text_exit_ = true;  // nothing is left to prepare: the loop ends only then
    }
    text_cv_.notify_all();
    text_.join();
  }
  if (!decoder_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(decode_mutex_);
    decode_exit_ = true;  // after what is queued: the decoder drains first
  }
  decode_cv_.notify_all();
  decoder_.join();
}

bool Worker::warm_up() {
  std::vector<int> sizes;
  for (int bucket : engine_.options.batch_buckets)
    if (bucket <= engine_.options.max_batch) sizes.push_back(bucket);
  std::vector<double> seconds;
  try {
    seconds = model_.warm_up(sizes);
    // The decoder thread warms up too: PyTorch keeps cuDNN's autotuned convolution plans per
    // thread, and the first decode of each batch size on a thread autotunes (~2 s at 512x512
    // on an H200, which made the first minute of serving slow).
    auto decoder_warm = std::make_shared<std::promise<void>>();
    auto warmed = decoder_warm->get_future();
    decoder_ = std::thread([this, decoder_warm] { decoder_loop(decoder_warm); });
    warmed.get();  // rethrows what the decoder's warm-up threw
  } catch (const std::exception& e) {
    // A worker that cannot run a two-step generation would fail every job: it takes none, and
    // the service does not report ready.
    log_error("warm-up failed on " + device_ + ", which takes no jobs: " + e.what());
    std::lock_guard<std::mutex> lock(engine_.mutex);
    engine_.worker_status[index_] = {device_, "failed", public_error(e.what()), 0};
    engine_.work_cv.notify_all();
    return false;
  }
  const auto& o = engine_.options;
  const int light = light_load_batch(sizes, seconds, o.light_load_efficiency, o.max_batch);
  admission_ =
      AdmissionPolicy({o.max_batch, o.light_load_efficiency, o.light_load_max_wait_s}, light);
  std::string times;
  for (size_t i = 0; i < sizes.size() && i < seconds.size(); ++i)
    times += (i ? ", " : "") + std::to_string(sizes[i]) + ": " +
             std::to_string(static_cast<int>(seconds[i] * 1e4) / 10.0).substr(0, 6) + " ms";
  pipeline::log(pipeline::LogLevel::kInfo, device_ + " ready; UNet step by batch size {" + times +
                                               "}; light-load batch " + std::to_string(light) +
                                               " of max_batch " + std::to_string(o.max_batch));
  std::lock_guard<std::mutex> lock(engine_.mutex);
  engine_.worker_status[index_].state = "ready";
  engine_.worker_status[index_].light_load_batch = light;
  return true;
}

bool Worker::retire_and_admit(std::vector<Admission>* admitted) {
  std::unique_lock<std::mutex> lock(engine_.mutex);
  for (auto it = active_.begin(); it != active_.end();) {
    JobState& job = *it->job;
    if (job.cancel_requested || is_final(job.status)) {
      --job.images_in_flight;
      if (job.images_in_flight == 0)
        engine_.finish(job, JobStatus::kCancelled,
                       engine_.cancel_all ? "the service shut down" : "");
      it = active_.erase(it);
    } else {
      ++it;
    }
  }
  // Images with the text thread keep the worker alive; it wakes when they are ready.
  engine_.work_cv.wait(lock, [&] {
    return (engine_.threads_exit && preparing_ == 0) || !active_.empty() ||
           prepared_count_.load() > 0 ||
           (engine_.queue->front().has_value() && !engine_.cancel_all);
  });
  if (engine_.threads_exit && active_.empty() && preparing_ == 0) return false;
  admit(lock, admitted);
  return true;
}

void Worker::admit(std::unique_lock<std::mutex>&, std::vector<Admission>* admitted) {
  auto& e = engine_;
  int cap = e.options.max_batch;
  if (const auto front = e.queue->front(); front && admission_) {
    // Images waiting: the next job's not yet admitted, and at least one per other queued job.
    const JobState& next = *e.jobs.at(*front);
    const int queued =
        next.request.num_images - next.images_admitted + static_cast<int>(e.queue->size()) - 1;
    const double waited =
        std::chrono::duration<double>(SteadyClock::now() - next.queued_steady).count();
    cap = admission_->cap(queued, waited);
  }
  // Image by image: a job's images may start at different steps.
  while (!e.cancel_all && static_cast<int>(active_.size() + preparing_ + admitted->size()) < cap) {
    const auto front = e.queue->front();
    if (!front) break;
    auto job = e.jobs.at(*front);
    if (job->cancel_requested || is_final(job->status)) {  // never run a dead job's images
      e.queue->remove(job->id);
      continue;
    }
    const int k = job->images_admitted++;
    ++job->images_in_flight;
    if (job->images_admitted == job->request.num_images) e.queue->remove(job->id);
    if (job->status == JobStatus::kQueued) {
      job->status = JobStatus::kRunning;
      job->times.started_at = WallClock::now();
      job->started_steady = SteadyClock::now();
      e.stats.queue_wait.observe(
          std::chrono::duration<double>(job->started_steady - job->queued_steady).count());
      e.emit(*job, e.state_event(*job));
    }
    admitted->emplace_back(std::move(job), k);
  }
  if (admission_ && e.queue->size() == 0) admission_->queue_drained();
}

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

void Worker::activate() {
  if (prepared_count_.load() == 0) return;
  std::vector<Prepared> ready;
  {
    std::lock_guard<std::mutex> lock(text_mutex_);
    ready.swap(prepared_);
    prepared_count_ = 0;
  }
  preparing_ -= ready.size();
  for (auto& p : ready) {
    const auto& [job, k] = p.admission;
    {
      std::lock_guard<std::mutex> lock(engine_.mutex);
      if (job->cancel_requested || is_final(job->status)) {  // as retire() does
        --job->images_in_flight;
        if (job->images_in_flight == 0)
          engine_.finish(*job, JobStatus::kCancelled,
                         engine_.cancel_all ? "the service shut down" : "");
        continue;
      }
    }
    try {
      pipeline::EmbeddingPtr cond = p.cond, uncond = p.uncond;
      const auto sibling = std::find_if(active_.begin(), active_.end(),
                                        [&job = job](const Active& a) { return a.job == job; });
      if (sibling != active_.end()) {
        cond = sibling->cond;
        uncond = sibling->uncond;
      } else if (!p.error.empty()) {
        throw std::runtime_error(p.error);
      }
      Active a{job, k, model_.begin(image_spec(job->request, k), cond, uncond), cond, uncond};
      {
        std::lock_guard<std::mutex> lock(engine_.mutex);
        job->evals_per_image = a.run->evals_total();
      }
      active_.push_back(std::move(a));
    } catch (const std::exception& e) {
      log_error("job " + job->id + ": preparing image " + std::to_string(k) +
                " failed: " + e.what());
      std::lock_guard<std::mutex> lock(engine_.mutex);
      --job->images_in_flight;
      job->cancel_requested = true;
      engine_.finish(*job, JobStatus::kFailed, public_error(e.what()));
    }
  }
}

// One UNet call holds one resolution. With several in the active set, turns go round the
// resolutions (each gets every G-th call), so a short job of another size runs beside a long one
// instead of waiting for it, and none starves.
std::pair<int, int> Worker::next_resolution() {
  // The smallest size after the one stepped last, else the smallest: a stable order as sets
  // change.
  std::optional<std::pair<int, int>> smallest, after;
  for (const auto& a : active_) {
    const std::pair<int, int> size{a.job->request.width, a.job->request.height};
    if (!smallest || size < *smallest) smallest = size;
    if (size > last_resolution_ && (!after || size < *after)) after = size;
  }
  last_resolution_ = after ? *after : *smallest;
  return last_resolution_;
}

bool Worker::step() {
  const auto size = next_resolution();
  std::vector<ImageRun*> batch;
  for (auto& a : active_) {
    a.stepped = a.job->request.width == size.first && a.job->request.height == size.second;
    if (a.stepped) batch.push_back(a.run.get());
  }
  try {
    const auto start = SteadyClock::now();
    model_.step(batch);
    // A step call returns once the previous step is done on the device, so the time between
    // returns is the device's step time while the worker is busy.
    const auto now = SteadyClock::now();
    const auto rows = model_.last_step_rows();
    {
      std::lock_guard<std::mutex> lock(engine_.mutex);
      engine_.stats.unet_batch_images.observe(static_cast<double>(batch.size()));
      engine_.stats.unet_padded_rows.observe(static_cast<double>(rows.padding));
      engine_.stats.unet_rows += static_cast<uint64_t>(rows.rows);
      int bucket = 0;
      for (int b : engine_.options.batch_buckets) {
        if (b >= static_cast<int>(batch.size())) {
          bucket = b;
          break;
        }
      }
      engine_.stats.unet_step.try_emplace(bucket, cache::fast_latency_buckets())
          .first->second.observe(std::chrono::duration<double>(now - start).count());
    }
    pipeline::log(
        pipeline::LogLevel::kDebug,
        device_ + " step: " + std::to_string(batch.size()) + " images at " +
            std::to_string(size.first) + "x" + std::to_string(size.second) + ", " +
            std::to_string(active_.size()) + " active, " +
            std::to_string(std::chrono::duration<double, std::milli>(now - last_step_).count()) +
            " ms since the last");
    last_step_ = now;
    return true;
  } catch (const std::exception& e) {
    log_error("model step failed on " + device_ + ": " + e.what());
    std::vector<std::shared_ptr<JobState>> jobs;
    for (auto& a : active_)
      if (a.stepped) jobs.push_back(a.job);
    fail(jobs, "generation failed: " + public_error(e.what()));
    active_.erase(
        std::remove_if(active_.begin(), active_.end(), [](const Active& a) { return a.stepped; }),
        active_.end());
    return false;
  }
}

// Ends `jobs` as failed; each entry stands for one of its images that leaves the worker.
void Worker::fail(const std::vector<std::shared_ptr<JobState>>& jobs, const std::string& error) {
  std::lock_guard<std::mutex> lock(engine_.mutex);
  for (const auto& job : jobs) {
    --job->images_in_flight;
    job->cancel_requested = true;
    engine_.finish(*job, JobStatus::kFailed, error);
  }
}

void Worker::publish() {
  std::lock_guard<std::mutex> lock(engine_.mutex);
  ++engine_.stats.unet_steps;
  std::vector<JobState*> progressed;
  for (auto& a : active_) {
    if (!a.stepped) continue;
    ++engine_.stats.image_steps;
    a.job->evals_done[a.index] = a.run->evals_done();
    if (std::find(progressed.begin(), progressed.end(), a.job.get()) == progressed.end())
      progressed.push_back(a.job.get());
  }
  for (JobState* job : progressed) {
    if (!job->first_step_seen) {
      job->first_step_seen = true;
      engine_.stats.first_step.observe(
          std::chrono::duration<double>(SteadyClock::now() - job->queued_steady).count());
    }
    const double secs =
        std::chrono::duration<double>(SteadyClock::now() - job->started_steady).count();
    JobEvent e;
    e.job_id = job->id;
    e.type = EventType::kProgress;
    e.droppable = true;
    e.steps = job->request.steps;
    e.evaluations = Engine::Impl::mean_evals(*job);
    e.evaluations_total = job->evals_per_image;
    e.it_per_s = secs > 0 ? e.evaluations / secs : 0.0;  // model evaluations per second
    engine_.emit(*job, std::move(e));
  }
}

// The projection runs here (on the device, cheap); encoding on the encoder thread.
void Worker::send_previews() {
  for (auto& a : active_) {
    const auto& p = a.job->request.preview;
    const int done = a.run->evals_done();
    if (!a.stepped || !p || a.run->done() || done % std::max(1, p->every) != 0) continue;
    pipeline::RgbImage rgb;
    try {
      rgb = model_.preview(*a.run, *p);
    } catch (const std::exception& e) {
      pipeline::log(pipeline::LogLevel::kWarn, std::string("preview failed: ") + e.what());
      continue;
    }
    auto job = a.job;
    const int k = a.index;
    const PreviewOptions opts = *p;
    Engine::Impl* e = &engine_;
    e->post_encode({[e, job, k, done, opts, rgb = std::move(rgb)] {
                      auto bytes = std::make_shared<std::vector<uint8_t>>(
                          opts.format == "png" ? pipeline::encode_png(rgb)
                                               : pipeline::encode_jpeg(rgb, 80));
                      std::lock_guard<std::mutex> lock(e->mutex);
                      // Encoder threads may finish previews out of order: never send an older
                      // one after a newer.
                      if (is_final(job->status) || done <= job->last_preview[k]) {
                        ++e->stats.previews_dropped;
                        return;
                      }
                      job->last_preview[k] = done;
                      if (!job->subscribers.empty()) ++e->stats.previews_sent;
                      JobEvent ev;
                      ev.job_id = job->id;
                      ev.type = EventType::kPreview;
                      ev.droppable = true;
                      ev.binary = std::move(bytes);
                      ev.image = k;
                      ev.steps = job->request.steps;
                      ev.evaluations = done;
                      ev.evaluations_total = job->evals_per_image;
                      ev.format = opts.format;
                      ev.width = rgb.width;
                      ev.height = rgb.height;
                      e->emit(*job, std::move(ev));
                    },
                    true,
                    {}});
  }
}

// Finished images leave the active set for the decoder thread, so the next UNet call does not
// wait for the VAE (19 ms per 512x512 image in fp32 on an H200).
void Worker::finish() {
  bool any = false;
  {
    std::lock_guard<std::mutex> lock(decode_mutex_);
    for (auto it = active_.begin(); it != active_.end();) {
      if (it->run->done()) {
        to_decode_.push_back(std::move(*it));
        it = active_.erase(it);
        any = true;
      } else {
        ++it;
      }
    }
  }
  if (any) decode_cv_.notify_one();
}

// One decode of each batch size the decoder uses, at the native size.
void Worker::warm_up_decoder() {
  pipeline::ImageSpec spec;
  spec.width = spec.height = model_.info().native_size;
  spec.steps = 1;
  spec.guidance_scale = 1.0;  // no unconditional embedding needed
  const auto cond = model_.encode_text("", 1);
  for (int n = 1; n <= engine_.options.decode_batch; ++n) {
    std::vector<std::unique_ptr<ImageRun>> owned;
    std::vector<ImageRun*> batch;
    for (int k = 0; k < n; ++k) {
      owned.push_back(model_.begin(spec, cond, nullptr));
      batch.push_back(owned.back().get());
    }
    model_.decode(batch);
  }
}

void Worker::decoder_loop(std::shared_ptr<std::promise<void>> warmed) {
  try {
    warm_up_decoder();
    warmed->set_value();
  } catch (...) {
    warmed->set_exception(std::current_exception());
    return;
  }
  for (;;) {
    std::vector<Active> finished;
    {
      std::unique_lock<std::mutex> lock(decode_mutex_);
      decode_cv_.wait(lock, [&] { return !to_decode_.empty() || decode_exit_; });
      if (to_decode_.empty()) return;
      // Up to decode_batch images per call, oldest first.
      const size_t n = std::min(to_decode_.size(),
                                static_cast<size_t>(std::max(1, engine_.options.decode_batch)));
      for (size_t i = 0; i < n; ++i) finished.push_back(std::move(to_decode_[i]));
      to_decode_.erase(to_decode_.begin(), to_decode_.begin() + static_cast<std::ptrdiff_t>(n));
    }
    decode(std::move(finished));
  }
}

// VAE decode on the decoder thread, PNG encoding (with A1111 parameters) on the encoder threads.
void Worker::decode(std::vector<Active> finished) {
  std::vector<ImageRun*> to_decode;
  for (auto& f : finished) to_decode.push_back(f.run.get());
  std::vector<pipeline::RgbImage> images;
  try {
    const auto start = SteadyClock::now();
    images = model_.decode(to_decode);
    {
      std::lock_guard<std::mutex> lock(engine_.mutex);
      engine_.stats.vae_decode.observe(
          std::chrono::duration<double>(SteadyClock::now() - start).count());
    }
    pipeline::log(
        pipeline::LogLevel::kDebug,
        device_ + " decoded " + std::to_string(to_decode.size()) + " images in " +
            std::to_string(
                std::chrono::duration<double, std::milli>(SteadyClock::now() - start).count()) +
            " ms");
  } catch (const std::exception& e) {
    log_error("decoding failed on " + device_ + ": " + e.what());
    std::vector<std::shared_ptr<JobState>> jobs;
    for (auto& f : finished) jobs.push_back(f.job);
    fail(jobs, "decoding failed: " + public_error(e.what()));
    return;
  }
  const auto info = model_.info();
  Engine::Impl* e = &engine_;
  for (size_t i = 0; i < finished.size(); ++i) {
    auto job = finished[i].job;
    const int k = finished[i].index;
    e->post_encode({[e, job, k, info, image = std::move(images[i])] {
                      std::string params;
                      {
                        std::lock_guard<std::mutex> lock(e->mutex);
                        // The hash may still be computing: then the PNG lacks it, as A1111's do for
                        // a model it has not hashed.
                        params = pipeline::a1111_parameters(
                            generate_request_of(*job), job->seed + k, info,
                            e->model_hash ? e->model_hash->autov2() : std::string());
                      }
                      auto png = std::make_shared<const std::vector<uint8_t>>(
                          pipeline::encode_png(image, {{"parameters", params}}));
                      std::lock_guard<std::mutex> lock(e->mutex);
                      --job->images_in_flight;
                      ++e->stats.images_done;
                      if (job->cancel_requested || is_final(job->status)) {
                        if (job->images_in_flight == 0) e->finish(*job, JobStatus::kCancelled);
                        return;
                      }
                      for (const auto& evicted :
                           e->results.add(job->id, k, std::move(png), SteadyClock::now())) {
                        auto it = e->jobs.find(evicted);
                        if (it != e->jobs.end()) it->second->results_evicted = true;
                      }
                      ++job->images_finished;
                      if (job->images_finished == job->request.num_images)
                        e->finish(*job, JobStatus::kSucceeded);
                    },
                    false,
                    [e, job](const std::string& error) {
                      std::lock_guard<std::mutex> lock(e->mutex);
                      --job->images_in_flight;
                      job->cancel_requested = true;
                      e->finish(*job, JobStatus::kFailed, "encoding the image failed: " + error);
                    }});
  }
}

}  // namespace sdserve::engine
