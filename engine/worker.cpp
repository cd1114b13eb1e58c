#include "engine/worker.h"

#include <algorithm>
#include <chrono>
#include <future>
#include <map>
#include <optional>

#include "pipeline/errors.h"
#include "pipeline/log.h"

namespace sdserve::engine {
namespace {

void log_error(const std::string& what) {
  pipeline::log(pipeline::LogLevel::kError, what);
}

}  // namespace

void Engine::Impl::worker_loop(size_t index) {
  Worker(*this, *models[index], index).run();
}

Worker::Worker(Engine::Impl& engine, ModelRunner& model, size_t index)
    : engine_(engine),
      model_(model),
      index_(index),
      device_(model.info().device),
      gpu_(device_.rfind("cuda", 0) == 0),
      models_(*engine.model_sets[index]),
      memory_(engine.memory_budget, 2 * engine.options.max_batch) {}

void Worker::run() {
  if (warm_up()) {
    text_ = std::thread([this] { text_loop(); });
    for (;;) {
      std::vector<Admission> admitted;
      if (!retire_and_admit(&admitted)) break;
      if (!admitted.empty()) {
        preparing_ += admitted.size();
        for (const auto& a : admitted)
          for (const auto& size : pass_sizes(a.job->request))
            preparing_rows_[size] += unet_rows_of(a.job->request);
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

bool Worker::retire_and_admit(std::vector<Admission>* admitted) {
  std::unique_lock<std::mutex> lock(engine_.mutex);
  const auto now = SteadyClock::now();
  for (auto it = active_.begin(); it != active_.end();) {
    JobState& job = *it->job;
    // A job past its max_run_s ends timed_out here, between UNet steps, and its images leave.
    if (engine_.stop_overrun(job, now) || job.cancel_requested || is_final(job.status)) {
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
  const auto runnable_queued = [&] {
    if (!engine_.queue->front().has_value() || engine_.cancel_all) return false;
    return !blocked_at_ ||
           *blocked_at_ != std::make_pair(engine_.queue_changes, engine_.models_changed);
  };
  engine_.work_cv.wait(lock, [&] {
    return (engine_.threads_exit && preparing_ == 0) || !active_.empty() ||
           prepared_count_.load() > 0 || runnable_queued();
  });
  if (engine_.threads_exit && active_.empty() && preparing_ == 0) return false;
  admit(lock, admitted);
  return true;
}

std::pair<std::shared_ptr<JobState>, std::shared_ptr<ModelRunner>> Worker::next_runnable() {
  auto& e = engine_;
  // A queue of max_queue jobs is scanned at most: jobs for models not loaded wait there.
  for (const auto& id : e.queue->in_order(e.queue->capacity())) {
    auto job = e.jobs.at(id);
    if (job->cancel_requested || is_final(job->status)) {  // never run a dead job's images
      e.queue->remove(job->id);
      continue;
    }
    const std::string& name = e.model_name(job->request);
    auto found = models_.acquire(name, [&e, &name]() -> uint64_t {
      if (!e.options.describe_model) return 0;
      try {
        return e.options.describe_model(name).weight_bytes;
      } catch (const std::exception&) {  // the load says why
        return 0;
      }
    });
    if (found.state == ModelSet::State::kReady) return {std::move(job), std::move(found.runner)};
    if (found.state == ModelSet::State::kFailed && job->images_admitted == 0) {
      e.queue->remove(job->id);
      job->cancel_requested = true;
      e.finish(*job, JobStatus::kFailed,
               "model " + name + " could not be loaded: " + public_error(found.error));
    }
    // Loading: the job keeps its place; jobs behind it for loaded models go first.
  }
  return {nullptr, nullptr};
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
  // A load waits for the models in use to drain: nothing new starts until it has room.
  bool none_runnable = models_.waiting_for_room();
  if (none_runnable) cap = 0;
  // Image by image: a job's images may start at different steps.
  while (!e.cancel_all && static_cast<int>(active_.size() + preparing_ + admitted->size()) < cap) {
    auto [job, model] = next_runnable();
    if (!job) {
      none_runnable = true;
      break;
    }
    // The queue's order holds: the jobs behind one that must wait for memory wait too.
    if (!fits_in_memory(job->request, *model, *admitted)) break;
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
    admitted->push_back({std::move(job), k, std::move(model)});
  }
  if (admission_ && e.queue->size() == 0) admission_->queue_drained();
  blocked_at_.reset();
  if (none_runnable && e.queue->size() > 0)
    blocked_at_ = std::make_pair(e.queue_changes, e.models_changed);
}

// An image counts at every size it has yet to run at: a hires image's first pass ends without
// admission, and its rows join the calls of the second pass's size then.
bool Worker::fits_in_memory(const JobRequest& request, const ModelRunner& model,
                            const std::vector<Admission>& admitted) {
  const auto ahead = [](const Active& a) {
    auto sizes = pass_sizes(a.job->request);
    if (a.run->size() != sizes.front()) sizes = {a.run->size()};  // in its second pass
    return sizes;
  };
  const auto has = [](const std::vector<std::pair<int, int>>& sizes, std::pair<int, int> size) {
    return std::find(sizes.begin(), sizes.end(), size) != sizes.end();
  };
  for (const auto& size : pass_sizes(request)) {
    int rows = 0;
    for (const auto& a : active_)
      if (has(ahead(a), size)) rows += unet_rows_of(a.job->request);
    for (const auto& a : admitted)
      if (has(pass_sizes(a.job->request), size)) rows += unet_rows_of(a.job->request);
    if (const auto it = preparing_rows_.find(size); it != preparing_rows_.end()) rows += it->second;
    // Alone it always runs: submit() refused what cannot fit alone.
    if (rows > 0 &&
        rows + unet_rows_of(request) > memory_.unet_rows(model, size.first, size.second))
      return false;
  }
  return true;
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
  for (const auto& p : ready) {
    const JobRequest& r = p.admission.job->request;
    for (const auto& size : pass_sizes(r)) {
      const auto it = preparing_rows_.find(size);
      if ((it->second -= unet_rows_of(r)) == 0) preparing_rows_.erase(it);
    }
  }
  for (auto& p : ready) {
    const auto& job = p.admission.job;
    const int k = p.admission.index;
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
      const auto& model = p.admission.model;
      if (!job->request.loras.empty()) model->check_loras(lora_uses(job->request));
      Active a{job,  k,      model->begin(image_spec(job->request, k), cond, uncond),
               cond, uncond, model};
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

// One UNet call holds one model and one resolution. With several in the active set, turns go
// round them (each gets every G-th call), so a short job of another size or model runs beside a
// long one instead of waiting for it, and none starves.
std::pair<ModelRunner*, std::pair<int, int>> Worker::next_group() {
  // The smallest group after the one stepped last, else the smallest: a stable order as sets
  // change.
  using Key = std::tuple<std::string, int, int>;
  std::optional<Key> smallest, after;
  for (const auto& a : active_) {
    const auto [w, h] = a.run->size();
    const Key key{a.model->info().path, w, h};
    if (!smallest || key < *smallest) smallest = key;
    if (key > last_group_ && (!after || key < *after)) after = key;
  }
  last_group_ = after ? *after : *smallest;
  for (const auto& a : active_)
    if (a.model->info().path == std::get<0>(last_group_))
      return {a.model.get(), {std::get<1>(last_group_), std::get<2>(last_group_)}};
  return {nullptr, {0, 0}};  // not reached: the key came from the set
}

bool Worker::step() {
  const auto [model, size] = next_group();
  std::vector<ImageRun*> batch;
  int unet_rows = 0;
  for (auto& a : active_) {
    a.stepped = a.model.get() == model && a.run->size() == size;
    if (!a.stepped) continue;
    batch.push_back(a.run.get());
    unet_rows += unet_rows_of(a.job->request);
  }
  try {
    // Admission kept the call within the budget beside a one-image decode; a larger decode in
    // flight makes it wait.
    const auto held =
        memory_.hold_unet(memory_.unet_bytes(*model, size.first, size.second, unet_rows));
    const auto start = SteadyClock::now();
    model->step(batch);
    // A step call returns once the previous step is done on the device, so the time between
    // returns is the device's step time while the worker is busy.
    const auto now = SteadyClock::now();
    const auto rows = model->last_step_rows();
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
    e.steps = job->steps_total;
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
      rgb = a.model->preview(*a.run, *p);
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
                      ev.steps = job->steps_total;
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

}  // namespace sdserve::engine
