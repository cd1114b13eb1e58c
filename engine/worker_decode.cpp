// The worker's decoding side, on its decoder thread: VAE decodes of finished images, then PNG
// encoding (with A1111's parameters) handed to the engine's encoder threads.
#include <algorithm>
#include <chrono>

#include "engine/worker.h"
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
  for (const auto& l : job.request.loras)
    r.lora_hashes.emplace_back(l.name, l.sha256.substr(0, 12));
  return r;
}

}  // namespace

// One decode of each batch size the decoder uses, at the warm-up's size (the native size on a
// GPU, where each size autotunes its convolutions).
void Worker::warm_up_decoder() {
  pipeline::ImageSpec spec;
  spec.width = spec.height = warm_up_size_;
  spec.steps = 1;
  spec.guidance_scale = 1.0;  // no unconditional embedding needed
  const auto cond = model_.encode_text("", 1);
  for (int n = 1; n <= engine_.options.decode_batch && (n == 1 || !stop_requested()); ++n) {
    // Only the batches the decoder may run within the memory budget.
    if (n > 1 && memory_.budget() > 0 &&
        memory_.decode_bytes(model_, warm_up_size_, warm_up_size_, n) > memory_.budget())
      break;
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
      // The oldest image and the next of its model and size, up to decode_batch: a GPU decodes
      // a call's latents as one tensor.
      const auto size = to_decode_.front().run->size();  // the final one: the run is done
      const ModelRunner* model = to_decode_.front().model.get();
      const size_t most = static_cast<size_t>(std::max(1, engine_.options.decode_batch));
      for (auto it = to_decode_.begin(); it != to_decode_.end() && finished.size() < most;) {
        if (it->run->size() == size && it->model.get() == model) {
          finished.push_back(std::move(*it));
          it = to_decode_.erase(it);
        } else {
          ++it;
        }
      }
    }
    // As many as fit the memory budget beside the UNet call in flight; the rest go back first.
    const auto [width, height] = finished.front().run->size();
    std::vector<uint64_t> bytes;
    for (size_t n = 1; n <= finished.size(); ++n)
      bytes.push_back(
          memory_.decode_bytes(*finished.front().model, width, height, static_cast<int>(n)));
    size_t take = 0;
    const auto held = memory_.hold_decode(bytes, &take);
    if (take < finished.size()) {
      std::lock_guard<std::mutex> lock(decode_mutex_);
      to_decode_.insert(
          to_decode_.begin(),
          std::make_move_iterator(finished.begin() + static_cast<std::ptrdiff_t>(take)),
          std::make_move_iterator(finished.end()));
      finished.erase(finished.begin() + static_cast<std::ptrdiff_t>(take), finished.end());
    }
    decode(std::move(finished));
  }
}

// VAE decode on the decoder thread, PNG encoding (with A1111 parameters) on the encoder threads.
void Worker::decode(std::vector<Active> finished) {
  {
    // Images of jobs cancelled meanwhile (by a user, or by shutdown's deadline) are not decoded:
    // past the deadline the decoder runs no more VAE calls.
    std::lock_guard<std::mutex> lock(engine_.mutex);
    finished.erase(std::remove_if(finished.begin(), finished.end(),
                                  [&](const Active& f) {
                                    JobState& job = *f.job;
                                    if (!job.cancel_requested && !is_final(job.status))
                                      return false;
                                    if (--job.images_in_flight == 0)
                                      engine_.finish(
                                          job, JobStatus::kCancelled,
                                          engine_.cancel_all ? "the service shut down" : "");
                                    return true;
                                  }),
                   finished.end());
  }
  if (finished.empty()) return;
  std::vector<ImageRun*> to_decode;
  for (auto& f : finished) to_decode.push_back(f.run.get());
  std::vector<pipeline::RgbImage> images;
  try {
    const auto start = SteadyClock::now();
    images = finished.front().model->decode(to_decode);
    {
      std::lock_guard<std::mutex> lock(engine_.mutex);
      engine_.stats.vae_decode.observe(
          std::chrono::duration<double>(SteadyClock::now() - start).count());
      engine_.stats.vae_decode_images.observe(static_cast<double>(to_decode.size()));
    }
    pipeline::log(
        pipeline::LogLevel::kDebug,
        device_ + " decoded " + std::to_string(to_decode.size()) + " images in " +
            std::to_string(
                std::chrono::duration<double, std::milli>(SteadyClock::now() - start).count()) +
            " ms");
  } catch (const std::exception& e) {
    pipeline::log(pipeline::LogLevel::kError, "decoding failed on " + device_ + ": " + e.what());
    std::vector<std::shared_ptr<JobState>> jobs;
    for (auto& f : finished) jobs.push_back(f.job);
    fail(jobs, "decoding failed: " + public_error(e.what()));
    return;
  }
  const auto info = finished.front().model->info();
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
                            e->hash_of(e->model_name(job->request)));
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
