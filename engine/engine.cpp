#include "engine/engine.h"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <random>
#include <sstream>

#include "engine/engine_impl.h"
#include "engine/memory_plan.h"
#include "pipeline/errors.h"
#include "pipeline/log.h"
#include "pipeline/memory.h"
#include "pipeline/validate.h"

namespace sdserve::engine {
namespace {

// Finished jobs keep their request for GET /v1/jobs/{id}; prompts beyond this are cut there, so
// the job table stays small whatever prompts clients send (the PNG keeps the full text).
constexpr size_t kKeptPromptBytes = 2048;
// Finished jobs remembered at most (oldest forgotten first), besides the time limit.
constexpr size_t kMaxFinishedJobs = 10000;

void cut_utf8(std::string& s, size_t max_bytes) {
  if (s.size() <= max_bytes) return;
  size_t cut = max_bytes;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
  s.resize(cut);
  s += "...";
  s.shrink_to_fit();
}

}  // namespace

std::string public_error(const std::string& what) {
  std::string out = what.substr(0, what.find('\n'));
  const auto raised = out.find("Exception raised from");
  if (raised != std::string::npos) out.resize(raised);
  while (!out.empty() && (out.back() == ' ' || out.back() == '\r')) out.pop_back();
  cut_utf8(out, 500);
  return out.empty() ? std::string("internal error") : out;
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<Engine> Engine::create(const EngineOptions& options,
                                       std::vector<std::shared_ptr<ModelRunner>> models,
                                       std::shared_ptr<cache::EmbeddingCache> cache) {
  if (models.empty()) throw std::invalid_argument("the engine needs at least one model");
  if (options.max_queue < 1) throw std::invalid_argument("max_queue must be at least 1");
  if (options.max_batch < 1) throw std::invalid_argument("max_batch must be at least 1");
  if (!(options.light_load_efficiency >= 0 && options.light_load_efficiency <= 1))
    throw std::invalid_argument("light_load_efficiency must be between 0 and 1");
  if (options.decode_batch < 1) throw std::invalid_argument("decode_batch must be at least 1");
  if (!(options.light_load_max_wait_s >= 0))
    throw std::invalid_argument("light_load_max_wait_s must be at least 0");
  // Checked once here rather than with every job that takes the default.
  if (!(options.default_timeout_s > 0 && options.default_timeout_s <= options.max_timeout_s))
    throw std::invalid_argument(
        "default_timeout_s must be greater than 0 and at most max_timeout_s");
  if (!(options.max_run_s > 0)) throw std::invalid_argument("max_run_s must be greater than 0");
  auto impl = std::make_unique<Impl>(options);
  impl->options = options;
  impl->models = std::move(models);
  if (options.max_memory_bytes > 0) {
    impl->memory_budget = options.max_memory_bytes;
    impl->memory_budget_source = "max_memory_mb";
  } else {
    for (const auto& m : impl->models) {
      const uint64_t free = m->available_memory();
      if (free > 0 && (impl->memory_budget == 0 || free < impl->memory_budget))
        impl->memory_budget = free;
    }
    impl->memory_budget_source =
        "max_memory_mb 0: free on " + impl->models.front()->info().device + " at start-up";
  }
  if (impl->memory_budget > 0) {
    const int native = impl->models.front()->info().native_size;
    int images = 0;  // of the native size in one UNet call, with guidance
    while (images < options.max_batch &&
           impl->estimate_memory(native, native, 2 * (images + 1), 1).total() <=
               impl->memory_budget)
      ++images;
    const int side = impl->largest_square(2);
    pipeline::log(pipeline::LogLevel::kInfo,
                  "memory for requests: " + pipeline::bytes_text(impl->memory_budget) + " (" +
                      impl->memory_budget_source + "); one image with guidance fits up to " +
                      std::to_string(side) + "x" + std::to_string(side) + "; a UNet call at " +
                      std::to_string(native) + "x" + std::to_string(native) + " holds " +
                      std::to_string(images) + " of max_batch " +
                      std::to_string(options.max_batch) + " images");
  }
  impl->cache = cache ? std::move(cache) : std::make_shared<cache::PassThroughCache>();
  impl->queue = std::make_unique<BoundedPriorityQueue>(static_cast<size_t>(options.max_queue));
  for (const auto& m : impl->models)
    impl->worker_status.push_back({m->info().device, "warming_up", "", 0, {}});
  if (!options.model_hash)
    impl->model_hash = std::make_unique<ModelHash>(impl->models.front()->info().path);
  Impl* raw = impl.get();
  for (const auto& m : impl->models) {
    ModelLoader loader = options.load_model;
    if (!loader)
      loader = [](const std::string& name, const std::string&) -> std::shared_ptr<ModelRunner> {
        throw std::invalid_argument("no model named '" + name + "' is served here");
      };
    impl->model_sets.push_back(std::make_unique<ModelSet>(
        m->info().device, options.model_memory_bytes, std::move(loader), [raw] {
          std::lock_guard<std::mutex> lock(raw->mutex);
          ++raw->models_changed;
          raw->work_cv.notify_all();
        }));
    impl->model_sets.back()->add_pinned(options.default_model, m);
  }
  impl->dispatcher = std::thread([raw] { raw->dispatcher_loop(); });
  // PNG encoding takes ~30 ms per 512x512 image: two threads keep it off the critical path up to
  // ~60 images/s per process.
  constexpr int kEncoderThreads = 2;
  for (int i = 0; i < kEncoderThreads; ++i)
    impl->encoders.emplace_back([raw] { raw->encoder_loop(); });
  for (size_t i = 0; i < impl->models.size(); ++i)
    impl->workers.emplace_back([raw, i] { raw->worker_loop(i); });
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Engine::~Engine() {
  shutdown(SteadyClock::now());
}

std::string Engine::Impl::hash_of(const std::string& model) const {
  if (options.model_hash) return options.model_hash(model);
  return model == options.default_model && model_hash ? model_hash->autov2() : std::string();
}

void Engine::set_textual_inversions(std::vector<pipeline::TextualInversionPtr> list) {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->textual_inversions = list;
  }
  for (const auto& set : impl_->model_sets) set->set_textual_inversions(list);
}

std::vector<LoadedModel> Engine::loaded_models() const {
  std::vector<LoadedModel> out;
  for (const auto& set : impl_->model_sets)
    for (auto& m : set->loaded()) out.push_back(std::move(m));
  return out;
}

std::string Engine::model_sha256() const {
  return impl_->model_hash ? impl_->model_hash->sha256() : std::string();
}

JobSnapshot Engine::submit(JobRequest request) {
  if (request.model == impl_->options.default_model) request.model.clear();
  RequestBounds bounds;
  bounds.text_layers = impl_->models.front()->info().text_layers;
  bounds.max_timeout_s = impl_->options.max_timeout_s;
  bounds.max_run_s = impl_->options.max_run_s;
  if (!request.model.empty()) {
    if (!impl_->options.describe_model)
      throw pipeline::RequestError("model", "no model named '" + request.model +
                                                "' is served here; this service has one model");
    bounds.text_layers = impl_->options.describe_model(request.model).text_layers;
  }
  validate(request, bounds);
  impl_->check_memory(request);
  // LoRA files are read now (the application's loader keeps them in a bounded cache), so a
  // broken one is a 400, and checked against the model when it is loaded (else when the job
  // starts).
  for (auto& l : request.loras) {
    if (l.file) continue;
    try {
      if (!impl_->options.load_lora)
        throw pipeline::RequestError("loras", "this service reads no LoRAs (no models folder)");
      auto loaded = impl_->options.load_lora(l.path);
      l.file = std::move(loaded.file);
      l.text_encoder = loaded.text_encoder;
    } catch (const pipeline::ModelError& e) {
      throw pipeline::RequestError("loras", "LoRA " + l.name + ": " + e.what());
    }
    // Embedding cache keys (shared through Redis) name a LoRA by its hash: where the models
    // folder has not computed it yet, it is computed here.
    if (l.sha256.empty()) l.sha256 = sha256_of_file(l.path, true);
    if (l.sha256.empty())
      throw pipeline::RequestError("loras", "LoRA " + l.name + ": its file cannot be read");
  }
  if (request.model.empty() && !request.loras.empty())
    impl_->models.front()->check_loras(lora_uses(request));
  // A prompt the text encoder cannot take (its syntax, its length) is refused now, not when it
  // would run. (Another model's tokenizer is not loaded yet: its prompts are checked when its
  // job runs, and a prompt it cannot take fails the job.)
  const auto& model = *impl_->models.front();
  if (request.model.empty()) {
    model.text_input(request.prompt, request.prompt_syntax, pipeline::TextRole::kPrompt);
    if (request.guidance_scale > 1.0)
      model.text_input(request.negative_prompt, request.prompt_syntax,
                       pipeline::TextRole::kNegative);
  }
  const double timeout = request.timeout_s.value_or(impl_->options.default_timeout_s);
  const int evals_per_image = impl_->models.front()->evals_total(image_spec(request));

  auto job = std::make_shared<JobState>();
  job->id = random_id();
  job->seed = request.seed.value_or(pipeline::random_seed());
  job->request = std::move(request);
  job->request.seed = job->seed;
  job->times.queued_at = WallClock::now();
  job->queued_steady = SteadyClock::now();
  job->queue_deadline = job->queued_steady + std::chrono::duration_cast<SteadyClock::duration>(
                                                 std::chrono::duration<double>(timeout));
  job->run_limit = std::chrono::duration_cast<SteadyClock::duration>(
      std::chrono::duration<double>(job->request.max_run_s.value_or(impl_->options.max_run_s)));
  job->evals_done.assign(job->request.num_images, 0);
  job->last_preview.assign(job->request.num_images, 0);
  job->evals_per_image = evals_per_image;
  job->steps_total = pipeline::steps_in_all_passes(image_spec(job->request));

  std::unique_lock<std::mutex> lock(impl_->mutex);
  if (impl_->stopping) {
    ++impl_->stats.jobs_rejected_unavailable;
    throw ShuttingDown("the service is shutting down and accepts no new jobs");
  }
  if (impl_->workers_in("failed") == static_cast<int>(impl_->models.size())) {
    ++impl_->stats.jobs_rejected_unavailable;
    throw Unavailable("no worker can run jobs: warm-up failed (" + impl_->warm_up_error() + ")");
  }
  if (!impl_->queue->push(job->id, job->request.priority)) {
    ++impl_->stats.jobs_rejected_queue_full;
    // A rough hint: how long until a slot frees, from the work queued ahead.
    throw QueueFull(
        "the queue is full (" + std::to_string(impl_->queue->capacity()) + " jobs); retry later",
        5.0);
  }
  impl_->jobs.emplace(job->id, job);
  ++impl_->stats.jobs_submitted;
  ++impl_->queue_changes;
  JobSnapshot snap = impl_->snapshot(*job);
  lock.unlock();
  impl_->work_cv.notify_all();
  return snap;
}

std::optional<JobSnapshot> Engine::get(const std::string& id) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  auto it = impl_->jobs.find(id);
  if (it == impl_->jobs.end()) return std::nullopt;
  return impl_->snapshot(*it->second);
}

bool Engine::cancel(const std::string& id) {
  std::unique_lock<std::mutex> lock(impl_->mutex);
  auto it = impl_->jobs.find(id);
  if (it == impl_->jobs.end() || is_final(it->second->status)) return false;
  JobState& job = *it->second;
  job.cancel_requested = true;
  impl_->queue->remove(id);
  // Images already in a worker's batch leave at its next step; the worker finishes the job then.
  if (job.images_in_flight == 0) impl_->finish(job, JobStatus::kCancelled);
  lock.unlock();
  impl_->work_cv.notify_all();
  return true;
}

ImageResult Engine::image(const std::string& id, int index) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  auto it = impl_->jobs.find(id);
  if (it == impl_->jobs.end()) return {ImageLookup::kUnknownJob, nullptr};
  const JobState& job = *it->second;
  if (index < 0 || index >= job.request.num_images) return {ImageLookup::kNoSuchImage, nullptr};
  if (job.results_evicted) return {ImageLookup::kEvicted, nullptr};
  auto png = impl_->results.get(id, index);
  if (!png) return {ImageLookup::kNotReady, nullptr};
  return {ImageLookup::kOk, png};
}

uint64_t Engine::subscribe(const std::string& id, EventCallback callback) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  auto it = impl_->jobs.find(id);
  if (it == impl_->jobs.end()) return 0;
  const uint64_t token = impl_->next_token++;
  JobState& job = *it->second;
  // The catch-up event goes through the same FIFO as live ones, so it is never overtaken.
  {
    std::lock_guard<std::mutex> events_lock(impl_->event_mutex);
    impl_->events.emplace_back(impl_->state_event(job), std::vector<EventCallback>{callback});
  }
  impl_->event_cv.notify_one();
  job.subscribers.emplace(token, std::move(callback));
  return token;
}

void Engine::unsubscribe(const std::string& id, uint64_t token) {
  std::unique_lock<std::mutex> lock(impl_->mutex);
  auto it = impl_->jobs.find(id);
  if (it == impl_->jobs.end()) return;
  JobState& job = *it->second;
  if (job.subscribers.erase(token) == 0) return;
  if (job.subscribers.empty() && job.request.cancel_on_disconnect && !is_final(job.status)) {
    lock.unlock();
    cancel(id);
  }
}

EngineStats Engine::stats() const {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    s = impl_->stats;
    s.queued = static_cast<int>(impl_->queue->size());
    s.running_jobs = 0;
    s.active_images = 0;
    const auto now = SteadyClock::now();
    for (const auto& [id, job] : impl_->jobs) {
      if (job->status == JobStatus::kRunning) ++s.running_jobs;
      if (job->status == JobStatus::kQueued) {
        const int level = static_cast<int>(job->request.priority);
        if (level >= 0 && level < 3) ++s.queued_by_priority[level];
        s.oldest_queued_s = std::max(
            s.oldest_queued_s, std::chrono::duration<double>(now - job->queued_steady).count());
      }
      s.active_images += job->images_in_flight;
    }
    s.result_bytes = impl_->results.bytes();
  }
  s.previews_dropped += impl_->previews_dropped_behind.load();
  s.embedding_cache = impl_->cache->stats();  // the cache's own lock, outside the engine's
  for (const auto& set : impl_->model_sets) {
    const auto m = set->stats();
    s.models.loads += m.loads;
    s.models.load_failures += m.load_failures;
    s.models.evictions += m.evictions;
    s.models.load_seconds += m.load_seconds;
  }
  return s;
}

bool Engine::ready() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->workers_in("ready") > 0 && !impl_->stopping;
}

std::vector<WorkerStatus> Engine::workers() const {
  std::vector<WorkerStatus> out;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    out = impl_->worker_status;
  }
  const auto now = SteadyClock::now();
  for (auto& w : out)
    if (!w.warm_up.over && w.warm_up.started != SteadyClock::time_point{})
      w.warm_up.elapsed_s = std::chrono::duration<double>(now - w.warm_up.started).count();
  return out;
}

std::vector<DeviceMemory> Engine::device_memory() const {
  std::vector<DeviceMemory> out;
  for (const auto& m : impl_->models) {  // set at creation, never changed
    const auto mem = m->memory();
    out.push_back({m->info().device, mem.allocated, mem.reserved});
  }
  return out;
}

std::string Engine::warm_up_error() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->warm_up_error();
}

bool Engine::warm_up_done() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->workers_in("warming_up") == 0;
}

void Engine::shutdown(SteadyClock::time_point deadline) {
  {
    std::unique_lock<std::mutex> lock(impl_->mutex);
    impl_->stopping = true;
    impl_->work_cv.notify_all();
    // Let queued and running work finish until the deadline.
    while (!impl_->workers.empty()) {
      bool busy = impl_->queue->size() > 0;
      for (const auto& [id, job] : impl_->jobs) busy = busy || job->images_in_flight > 0;
      if (!busy) break;
      if (impl_->work_cv.wait_until(lock, deadline) == std::cv_status::timeout) break;
    }
    impl_->cancel_all = true;
    for (auto& [id, job] : impl_->jobs)
      if (!is_final(job->status)) {
        job->cancel_requested = true;
        impl_->queue->remove(id);
        if (job->images_in_flight == 0)
          impl_->finish(*job, JobStatus::kCancelled, "the service shut down");
      }
    impl_->threads_exit = true;
  }
  impl_->work_cv.notify_all();
  for (auto& w : impl_->workers)
    if (w.joinable()) w.join();
  impl_->workers.clear();
  {
    std::lock_guard<std::mutex> lock(impl_->encode_mutex);
    impl_->encode_exit = true;
  }
  impl_->encode_cv.notify_all();
  for (auto& t : impl_->encoders)
    if (t.joinable()) t.join();
  {
    std::lock_guard<std::mutex> lock(impl_->event_mutex);
    impl_->events_exit = true;
  }
  impl_->event_cv.notify_all();
  if (impl_->dispatcher.joinable()) impl_->dispatcher.join();
}

pipeline::MemoryEstimate Engine::Impl::estimate_memory(int width, int height, int unet_rows,
                                                       int decode_images) const {
  pipeline::MemoryEstimate most;
  for (const auto& m : models) {
    const auto e = m->estimate_memory(width, height, unet_rows, decode_images);
    if (e.total() > most.total()) most = e;
  }
  return most;
}

int Engine::Impl::largest_square(int rows) const {
  int largest = 0;
  for (int side = pipeline::Limits::kMinSide; side <= pipeline::Limits::kMaxSide; side += 8)
    if (estimate_memory(side, side, rows, 1).total() <= memory_budget) largest = side;
  return largest;
}

// A request is refused only when one of its images cannot fit alone: the worker runs images that
// do not fit together in successive UNet calls (memory_plan.h), so neither its num_images nor
// max_batch raises what it needs.
void Engine::Impl::check_memory(const JobRequest& r) const {
  if (memory_budget == 0) return;
  const int rows = unet_rows_of(r);
  // Every size the image runs at (a hires image's second pass is larger); each estimate holds a
  // decode of that size, so the first pass's is on the safe side.
  const auto sizes = pass_sizes(r);
  for (size_t pass = 0; pass < sizes.size(); ++pass) {
    const auto [width, height] = sizes[pass];
    const auto e = estimate_memory(width, height, rows, 1);
    if (e.total() <= memory_budget) continue;
    using pipeline::bytes_text;
    const std::string size = std::to_string(width) + "x" + std::to_string(height);
    const int side = largest_square(rows);
    const std::string fits = side > 0 ? "the largest square size that fits is " +
                                            std::to_string(side) + "x" + std::to_string(side)
                                      : "no size fits";
    // The field that chose the size: the first pass's, or the hires fix's scale / resize.
    const bool second = pass > 0;
    const std::string field = !second                                       ? "width"
                              : r.hires->width == 0 && r.hires->height == 0 ? "hires.scale"
                              : r.hires->width != 0                         ? "hires.width"
                                                                            : "hires.height";
    throw pipeline::RequestError(
        field, (second ? "the hires fix's second pass at " : "width x height ") + size +
                   " needs an estimated " + bytes_text(e.total()) +
                   " of memory at its peak for one image, more than the " +
                   bytes_text(memory_budget) + " available (" + memory_budget_source +
                   "): its UNet call " + (rows == 2 ? "with" : "without") + " guidance " +
                   bytes_text(e.unet) + " (attention scores " + bytes_text(e.unet_attention) +
                   "), its VAE decode " + bytes_text(e.vae) + "; num_images (" +
                   std::to_string(r.num_images) +
                   ") does not raise it, since images that do not fit together run one call "
                   "after another; " +
                   fits + ": ask for fewer pixels" + (second ? " (" + field + ")" : ""));
  }
}

// ---------------------------------------------------------------------------------------------
// State helpers (mutex held)

int Engine::Impl::workers_in(const std::string& state) const {
  return static_cast<int>(std::count_if(worker_status.begin(), worker_status.end(),
                                        [&](const WorkerStatus& w) { return w.state == state; }));
}

std::string Engine::Impl::warm_up_error() const {
  for (const auto& w : worker_status)
    if (w.state == "failed") return w.device + ": " + w.error;
  return "";
}

JobSnapshot Engine::Impl::snapshot(const JobState& job) const {
  JobSnapshot s;
  s.id = job.id;
  s.status = job.status;
  s.queue_position = job.status == JobStatus::kQueued ? queue->position(job.id) : -1;
  s.steps = job.steps_total;
  s.evaluations = mean_evals(job);
  s.evaluations_total = job.evals_per_image;
  s.seed = job.seed;
  s.images_ready = job.images_finished;
  s.times = job.times;
  s.error = job.error;
  s.results_evicted = job.results_evicted;
  s.request = job.request;
  return s;
}

int Engine::Impl::mean_evals(const JobState& job) {
  int total = 0;
  for (int e : job.evals_done) total += e;
  return job.evals_done.empty() ? 0 : total / static_cast<int>(job.evals_done.size());
}

JobEvent Engine::Impl::state_event(const JobState& job) const {
  JobEvent e;
  e.job_id = job.id;
  e.times = job.times;
  switch (job.status) {
    case JobStatus::kQueued:
      e.type = EventType::kQueued;
      e.queue_position = queue->position(job.id);
      break;
    case JobStatus::kRunning:
      e.type = EventType::kStarted;
      e.steps = job.steps_total;
      e.evaluations = mean_evals(job);
      e.evaluations_total = job.evals_per_image;
      break;
    case JobStatus::kSucceeded:
      e.type = EventType::kSucceeded;
      e.seed = job.seed;
      e.num_images = job.request.num_images;
      break;
    case JobStatus::kFailed:
      e.type = EventType::kFailed;
      e.error = job.error;
      break;
    case JobStatus::kCancelled:
      e.type = EventType::kCancelled;
      e.error = job.error;
      break;
    case JobStatus::kExpired:
      e.type = EventType::kExpired;
      e.error = job.error;
      break;
    case JobStatus::kTimedOut:
      e.type = EventType::kTimedOut;
      e.error = job.error;
      break;
  }
  return e;
}

void Engine::Impl::emit(JobState& job, JobEvent event) {
  if (job.subscribers.empty()) return;
  std::vector<EventCallback> targets;
  for (const auto& [token, cb] : job.subscribers) targets.push_back(cb);
  {
    std::lock_guard<std::mutex> lock(event_mutex);
    events.emplace_back(std::move(event), std::move(targets));
  }
  event_cv.notify_one();
}

void Engine::Impl::finish(JobState& job, JobStatus status, const std::string& error) {
  if (is_final(job.status)) return;
  job.status = status;
  job.error = error;
  job.times.finished_at = WallClock::now();
  // Images not yet admitted never run now (a failed job's other images are not retried).
  queue->remove(job.id);
  cut_utf8(job.request.prompt, kKeptPromptBytes);
  cut_utf8(job.request.negative_prompt, kKeptPromptBytes);
  switch (status) {
    case JobStatus::kSucceeded: {
      ++stats.jobs_succeeded;
      const auto now = SteadyClock::now();
      stats.latency.observe(std::chrono::duration<double>(now - job.queued_steady).count());
      stats.run_time.observe(std::chrono::duration<double>(now - job.started_steady).count());
      break;
    }
    case JobStatus::kFailed:
      ++stats.jobs_failed;
      break;
    case JobStatus::kCancelled:
      ++stats.jobs_cancelled;
      break;
    case JobStatus::kExpired:
      ++stats.jobs_expired;
      break;
    case JobStatus::kTimedOut:
      ++stats.jobs_timed_out;
      break;
    default:
      break;
  }
  if (status != JobStatus::kSucceeded) results.erase(job.id);
  {
    // One line per job at its end, with fields (the server's log sink splits them at \x1f:
    // separate members in JSON logs): what a user's report is checked against.
    const auto now = SteadyClock::now();
    const bool started = job.images_admitted > 0;
    const auto secs = [](SteadyClock::duration d) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%.3f", std::chrono::duration<double>(d).count());
      return std::string(buf);
    };
    std::string line = "job " + job.id + " " + to_string(status);
    const auto field = [&line](const std::string& key, const std::string& value) {
      line += '\x1f' + key + '=' + value;
    };
    field("req", job.request.request_id);
    field("queue_wait_s", secs((started ? job.started_steady : now) - job.queued_steady));
    field("run_s", secs(started ? now - job.started_steady : SteadyClock::duration{}));
    field("images", std::to_string(job.images_finished));
    field("images_requested", std::to_string(job.request.num_images));
    if (!error.empty()) field("error", error);
    pipeline::log(status == JobStatus::kFailed || status == JobStatus::kTimedOut
                      ? pipeline::LogLevel::kWarn
                      : pipeline::LogLevel::kInfo,
                  line);
  }
  emit(job, state_event(job));
  work_cv.notify_all();  // shutdown() waits on it for the last job
}

void Engine::Impl::expire_queued(SteadyClock::time_point now) {
  for (auto& [id, job] : jobs) {
    if (job->status != JobStatus::kQueued || job->images_admitted > 0 || now < job->queue_deadline)
      continue;
    queue->remove(id);
    finish(*job, JobStatus::kExpired, "the job waited in the queue longer than its timeout");
  }
}

bool Engine::Impl::stop_overrun(JobState& job, SteadyClock::time_point now) {
  if (job.status == JobStatus::kTimedOut) return true;
  if (job.status != JobStatus::kRunning || now - job.started_steady < job.run_limit) return false;
  // Its images leave the workers at their next turn (between UNet steps), as a cancelled job's;
  // images already finished are discarded with the rest (finish() erases the job's results).
  job.cancel_requested = true;
  finish(job, JobStatus::kTimedOut,
         "the job ran longer than its max_run_s (" +
             seconds_text(std::chrono::duration<double>(job.run_limit).count()) +
             " s) and was stopped; ask for fewer steps, images or pixels");
  return true;
}

void Engine::Impl::stop_overruns(SteadyClock::time_point now) {
  for (auto& [id, job] : jobs) stop_overrun(*job, now);
}

void Engine::Impl::forget_old_jobs() {
  // Finished jobs are forgotten well after their results are gone, and the oldest first when
  // there are too many of them.
  const auto forget_after = std::chrono::duration<double>(options.result_ttl_s + 3600);
  const auto now = WallClock::now();
  std::vector<std::pair<WallClock::time_point, std::string>> finished;
  for (auto it = jobs.begin(); it != jobs.end();) {
    const auto& j = *it->second;
    if (!is_final(j.status) || !j.times.finished_at || j.images_in_flight > 0) {
      ++it;
    } else if (now - *j.times.finished_at > forget_after) {
      results.erase(j.id);
      it = jobs.erase(it);
    } else {
      finished.emplace_back(*j.times.finished_at, j.id);
      ++it;
    }
  }
  if (finished.size() <= kMaxFinishedJobs) return;
  std::sort(finished.begin(), finished.end());
  for (size_t i = 0; i + kMaxFinishedJobs < finished.size(); ++i) {
    results.erase(finished[i].second);
    jobs.erase(finished[i].second);
  }
}

}  // namespace sdserve::engine
