// The GPU worker: step-level continuous batching. Each turn of the loop retires cancelled images,
// admits queued images up to max_batch (same resolution as the running set), runs ONE model
// evaluation for every active image together, emits progress and previews, and hands finished
// images to the VAE and then to the encoder thread.
#include <algorithm>
#include <nlohmann/json.hpp>

#include "engine/engine_impl.h"
#include "pipeline/errors.h"
#include "pipeline/log.h"

namespace sdserve::engine {
namespace {

using nlohmann::json;

struct Active {
  std::shared_ptr<JobState> job;
  int index = 0;  // image k of the job
  std::unique_ptr<ImageRun> trajectory;
  pipeline::EmbeddingPtr cond, uncond;  // shared by the job's images on this worker
};

// Image k of a job (the job's seed is always set once it is queued).
pipeline::ImageSpec spec_of(const JobState& job, int k) {
  return image_spec(job.request, k);
}

pipeline::GenerateRequest generate_request_of(const JobState& job) {
  pipeline::GenerateRequest r;
  r.prompt = job.request.prompt;
  r.negative_prompt = job.request.negative_prompt;
  r.clip_skip = job.request.clip_skip;
  r.num_images = job.request.num_images;
  r.image = spec_of(job, 0);
  return r;
}

}  // namespace

void Engine::Impl::worker_loop(size_t index) {
  ModelRunner& model = *models[index];
  const std::string device = model.info().device;

  // Warm-up before the first job; /readyz turns green after it has worked on every worker.
  try {
    std::vector<int> sizes;
    for (int bucket : options.batch_buckets)
      if (bucket <= options.max_batch) sizes.push_back(bucket);
    model.warm_up(sizes);
  } catch (const std::exception& e) {
    // A worker that cannot run a two-step generation would fail every job: it takes none, and
    // the service does not report ready.
    pipeline::log(pipeline::LogLevel::kError,
                  std::string("warm-up failed on ") + device + ": " + e.what());
    std::lock_guard<std::mutex> lock(mutex);
    ++workers_failed;
    if (warm_up_error.empty()) warm_up_error = device + ": " + public_error(e.what());
    work_cv.notify_all();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex);
    ++workers_warm;
  }

  auto embed = [&](const std::string& prompt, int clip_skip) -> pipeline::EmbeddingPtr {
    const std::string key =
        model.info().name + "|" + device + "|" + std::to_string(clip_skip) + "|" + prompt;
    if (auto hit = cache->find(key))
      return std::static_pointer_cast<const pipeline::Embedding>(hit);
    auto e = model.encode_text(prompt, clip_skip);
    cache->store(key, e);
    return e;
  };

  std::vector<Active> active;
  for (;;) {
    std::vector<std::pair<std::shared_ptr<JobState>, int>> admitted;
    {
      std::unique_lock<std::mutex> lock(mutex);
      // Retire images of cancelled (or failed) jobs; their slots are reused below.
      for (auto it = active.begin(); it != active.end();) {
        JobState& job = *it->job;
        if (job.cancel_requested || is_final(job.status)) {
          --job.images_active;
          if (job.images_active == 0)
            finish(job, JobStatus::kCancelled, cancel_all ? "the service shut down" : "");
          it = active.erase(it);
        } else {
          ++it;
        }
      }
      work_cv.wait(lock, [&] {
        return threads_exit || !active.empty() || (queue->front().has_value() && !cancel_all);
      });
      if (threads_exit && active.empty()) return;
      // Admission, image by image: a job's images may start at different steps.
      while (!cancel_all && static_cast<int>(active.size() + admitted.size()) < options.max_batch) {
        const auto front = queue->front();
        if (!front) break;
        auto job = jobs.at(*front);
        if (job->cancel_requested || is_final(job->status)) {  // never run a dead job's images
          queue->remove(job->id);
          continue;
        }
        const bool busy = !active.empty() || !admitted.empty();
        const auto& ref = !active.empty()    ? active.front().job->request
                          : admitted.empty() ? job->request
                                             : admitted.front().first->request;
        // One UNet batch has one resolution; a different one waits for this set to drain.
        if (busy && (job->request.width != ref.width || job->request.height != ref.height)) break;
        const int k = job->images_admitted++;
        ++job->images_active;
        if (job->images_admitted == job->request.num_images) queue->remove(job->id);
        if (job->status == JobStatus::kQueued) {
          job->status = JobStatus::kRunning;
          job->started_at = Clock::now();
          job->started_steady = SteadyClock::now();
          emit(*job, state_event(*job));
        }
        admitted.emplace_back(std::move(job), k);
      }
    }

    for (auto& admission : admitted) {
      // Named, not a structured binding: lambdas below capture them.
      const std::shared_ptr<JobState>& job = admission.first;
      const int k = admission.second;
      try {
        // A job's images share its prompt embeddings: encode once per job on this worker.
        pipeline::EmbeddingPtr cond, uncond;
        const auto sibling = std::find_if(active.begin(), active.end(),
                                          [&](const Active& a) { return a.job == job; });
        if (sibling != active.end()) {
          cond = sibling->cond;
          uncond = sibling->uncond;
        } else {
          cond = embed(job->request.prompt, job->request.clip_skip);
          if (job->request.guidance_scale > 1.0)
            uncond = embed(job->request.negative_prompt, job->request.clip_skip);
        }
        Active a{job, k, model.begin(spec_of(*job, k), cond, uncond), cond, uncond};
        {
          std::lock_guard<std::mutex> lock(mutex);
          job->evals_per_image = a.trajectory->evals_total();
        }
        active.push_back(std::move(a));
      } catch (const std::exception& e) {
        pipeline::log(pipeline::LogLevel::kError,
                      "job " + job->id + ": preparing image failed: " + e.what());
        std::lock_guard<std::mutex> lock(mutex);
        --job->images_active;
        job->cancel_requested = true;
        finish(*job, JobStatus::kFailed, public_error(e.what()));
      }
    }
    if (active.empty()) continue;

    std::vector<ImageRun*> batch;
    for (auto& a : active) batch.push_back(a.trajectory.get());
    try {
      model.step(batch);
    } catch (const std::exception& e) {
      pipeline::log(pipeline::LogLevel::kError, "model step failed on " + device + ": " + e.what());
      std::lock_guard<std::mutex> lock(mutex);
      for (auto& a : active) {
        --a.job->images_active;
        a.job->cancel_requested = true;
        finish(*a.job, JobStatus::kFailed, "generation failed: " + public_error(e.what()));
      }
      active.clear();
      continue;
    }

    {
      std::lock_guard<std::mutex> lock(mutex);
      ++stats.unet_steps;
      std::vector<JobState*> progressed;
      for (auto& a : active) {
        a.job->evals_done[a.index] = a.trajectory->evals_done();
        if (std::find(progressed.begin(), progressed.end(), a.job.get()) == progressed.end())
          progressed.push_back(a.job.get());
      }
      for (JobState* job : progressed) {
        const auto snap = snapshot(*job);
        const double secs =
            std::chrono::duration<double>(SteadyClock::now() - job->started_steady).count();
        JobEvent e;
        e.job_id = job->id;
        e.type = "progress";
        e.droppable = true;
        e.json = json{{"type", "progress"},
                      {"job_id", job->id},
                      {"step", snap.step},
                      {"steps", snap.steps},
                      {"it_per_s", secs > 0 ? snap.step / secs : 0.0}}
                     .dump();
        emit(*job, std::move(e));
      }
    }

    // Previews: the projection runs here (on the device, cheap); encoding on the encoder thread.
    for (auto& a : active) {
      const auto& p = a.job->request.preview;
      const int done = a.trajectory->evals_done();
      if (!p || a.trajectory->done() || done % std::max(1, p->every) != 0) continue;
      pipeline::RgbImage rgb;
      try {
        rgb = model.preview(*a.trajectory, *p);
      } catch (const std::exception& e) {
        pipeline::log(pipeline::LogLevel::kWarn, std::string("preview failed: ") + e.what());
        continue;
      }
      auto job = a.job;
      const int k = a.index;
      const PreviewOptions opts = *p;
      post_encode({[this, job, k, done, opts, rgb = std::move(rgb)] {
                     auto bytes = std::make_shared<std::vector<uint8_t>>(
                         opts.format == "png" ? pipeline::encode_png(rgb)
                                              : pipeline::encode_jpeg(rgb, 80));
                     std::lock_guard<std::mutex> lock(mutex);
                     if (is_final(job->status)) return;
                     JobEvent e;
                     e.job_id = job->id;
                     e.type = "preview";
                     e.droppable = true;
                     e.binary = std::move(bytes);
                     e.json = json{{"type", "preview"},
                                   {"job_id", job->id},
                                   {"image", k},
                                   {"step", done},
                                   {"steps", job->evals_per_image},
                                   {"format", opts.format},
                                   {"width", rgb.width},
                                   {"height", rgb.height}}
                                  .dump();
                     emit(*job, std::move(e));
                   },
                   true,
                   {}});
    }

    // Retire finished images: VAE decode here, PNG encoding on the encoder thread.
    std::vector<Active> finished;
    for (auto it = active.begin(); it != active.end();) {
      if (it->trajectory->done()) {
        finished.push_back(std::move(*it));
        it = active.erase(it);
      } else {
        ++it;
      }
    }
    if (finished.empty()) continue;
    std::vector<ImageRun*> to_decode;
    for (auto& f : finished) to_decode.push_back(f.trajectory.get());
    std::vector<pipeline::RgbImage> images;
    try {
      images = model.decode(to_decode);
    } catch (const std::exception& e) {
      pipeline::log(pipeline::LogLevel::kError, "decoding failed on " + device + ": " + e.what());
      std::lock_guard<std::mutex> lock(mutex);
      for (auto& f : finished) {
        --f.job->images_active;
        f.job->cancel_requested = true;
        finish(*f.job, JobStatus::kFailed, "decoding failed: " + public_error(e.what()));
      }
      continue;
    }
    const auto info = model.info();
    for (size_t i = 0; i < finished.size(); ++i) {
      auto job = finished[i].job;
      const int k = finished[i].index;
      post_encode({[this, job, k, info, image = std::move(images[i])] {
                     std::string params;
                     {
                       std::lock_guard<std::mutex> lock(mutex);
                       params = pipeline::a1111_parameters(generate_request_of(*job), job->seed + k,
                                                           info);
                     }
                     auto png = std::make_shared<const std::vector<uint8_t>>(
                         pipeline::encode_png(image, {{"parameters", params}}));
                     std::lock_guard<std::mutex> lock(mutex);
                     --job->images_active;
                     ++stats.images_done;
                     if (job->cancel_requested || is_final(job->status)) {
                       if (job->images_active == 0) finish(*job, JobStatus::kCancelled);
                       return;
                     }
                     for (const auto& evicted :
                          results.add(job->id, k, std::move(png), SteadyClock::now())) {
                       auto it = jobs.find(evicted);
                       if (it != jobs.end()) it->second->results_expired = true;
                     }
                     ++job->images_finished;
                     if (job->images_finished == job->request.num_images)
                       finish(*job, JobStatus::kSucceeded);
                   },
                   false,
                   [this, job](const std::string& error) {
                     std::lock_guard<std::mutex> lock(mutex);
                     --job->images_active;
                     job->cancel_requested = true;
                     finish(*job, JobStatus::kFailed, "encoding the image failed: " + error);
                   }});
    }
  }
}

}  // namespace sdserve::engine
