// One worker per device: a thread running step-level continuous batching over an active set of
// images. Each turn: retire() images of cancelled jobs, admit() queued images up to the
// admission policy's cap (admission.h; of any resolution) and hand them to this worker's text
// thread (prompt embeddings: cache lookups, then the misses encoded together), activate() the
// images whose embeddings are ready (one ImageRun each), step() the active set in one model call,
// publish() progress and previews, finish() the images that are done (VAE decode on this
// worker's decoder thread, PNG encoding on the engine's encoder threads). So the loop only
// denoises: text encoding and decoding overlap it. One UNet call holds one resolution: when the
// set holds several, the turns go round them. A failure in any phase ends the jobs it touched,
// never the thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "engine/admission.h"
#include "engine/engine_impl.h"
#include "engine/memory_plan.h"
#include "engine/model_runner.h"

namespace sdserve::engine {

class Worker {
 public:
  Worker(Engine::Impl& engine, ModelRunner& model, size_t index);
  // The thread body: warm-up, then turns until the engine says exit.
  void run();

 private:
  struct Active {
    std::shared_ptr<JobState> job;
    int index = 0;  // image k of the job
    std::unique_ptr<ImageRun> run;
    pipeline::EmbeddingPtr cond, uncond;  // shared by the job's images on this worker
    std::shared_ptr<ModelRunner> model;   // its checkpoint (held: not evicted while it runs)
    bool stepped = false;                 // in this turn's UNet call
  };
  struct Admission {
    std::shared_ptr<JobState> job;
    int index = 0;  // image k of the job
    std::shared_ptr<ModelRunner> model;
  };

  // worker_warm_up.cpp: false when the worker takes no jobs (warm-up failed, or shutdown
  // stopped it).
  bool warm_up();
  // Shutdown cancels work (its deadline passed, or nothing was left to finish). Without the
  // engine's mutex held.
  bool stop_requested();
  // With the engine's mutex not held: false (and the phase "stopped") once shutdown cancels
  // work, else enters `phase`.
  bool warm_up_phase(const char* phase);
  // UNet steps timed cheapest first while the next is predicted to end within the budget from
  // `start`; false when shutdown stopped it.
  bool time_steps(const std::vector<int>& batch_sizes, SteadyClock::time_point start,
                  std::vector<StepTiming>* measured);
  // With the engine's mutex held: drops images of cancelled or failed jobs, waits for work, and
  // takes queued images. False when the thread should exit.
  bool retire_and_admit(std::vector<Admission>* admitted);
  void admit(std::unique_lock<std::mutex>& lock, std::vector<Admission>* admitted);
  // Whether an image of `request` (on `model`) may join the UNet calls of its size beside the
  // images of that size already on this worker (active, with the text thread, or `admitted`
  // this turn).
  bool fits_in_memory(const JobRequest& request, const ModelRunner& model,
                      const std::vector<Admission>& admitted);
  // The next queued job (in run order) whose model is loaded here, with that model; jobs whose
  // model is loading are passed over (their load queued), jobs whose model failed to load end
  // failed. Null when none. With the engine's mutex held.
  std::pair<std::shared_ptr<JobState>, std::shared_ptr<ModelRunner>> next_runnable();
  // An admitted image with its job's prompt embeddings, or why they could not be made.
  struct Prepared {
    Admission admission;
    pipeline::EmbeddingPtr cond, uncond;
    std::string error;
  };
  std::vector<Prepared> prepare(const std::vector<Admission>& admitted);  // on the text thread
  void text_loop();
  void activate();  // the prepared images join the active set
  // This turn's UNet call: its model and (width, height). One call holds one model and size.
  std::pair<ModelRunner*, std::pair<int, int>> next_group();
  bool step();
  void publish();
  void send_previews();
  void finish();
  void decoder_loop(std::shared_ptr<std::promise<void>> warmed);
  void warm_up_decoder();
  void decode(std::vector<Active> finished);
  void fail(const std::vector<std::shared_ptr<JobState>>& jobs, const std::string& error);
  struct PromptKey {
    std::string prompt;
    int clip_skip = 1;
    pipeline::TextRole role = pipeline::TextRole::kPrompt;
    pipeline::PromptSyntax syntax = pipeline::PromptSyntax::kA1111;
    // The text encoders' LoRAs (at their te_weight) and what identifies them in a cache key:
    // "NAME SHA256 WEIGHT_BITS" per LoRA; "" without.
    std::vector<pipeline::LoraUse> loras;
    std::string lora_key;
  };
  std::string embedding_key(const ModelRunner& model, const PromptKey& prompt) const;
  std::vector<pipeline::EmbeddingPtr> embeddings(const std::shared_ptr<ModelRunner>& model,
                                                 const std::vector<PromptKey>& prompts,
                                                 std::vector<std::string>* errors);

  Engine::Impl& engine_;
  ModelRunner& model_;
  const size_t index_;  // in Engine::Impl::models and worker_status
  const std::string device_;
  const bool gpu_;        // a CUDA device
  int warm_up_size_ = 0;  // px of the warm-up generation and decodes
  ModelSet& models_;
  // (queue_changes, models_changed) when admit() last found queued jobs but none it could run
  // (their models loading, or a load waiting for room): the worker sleeps until they change.
  std::optional<std::pair<uint64_t, uint64_t>> blocked_at_;
  std::vector<Active> active_;
  std::tuple<std::string, int, int> last_group_;  // (model path, width, height) stepped last
  std::optional<AdmissionPolicy> admission_;      // from the step times measured at warm-up
  MemoryPlan memory_;                             // the memory budget's caps and ledger
  SteadyClock::time_point last_step_;

  // Finished images wait here for the decoder thread (VAE decode overlaps the next UNet calls).
  std::thread decoder_;
  std::mutex decode_mutex_;
  std::condition_variable decode_cv_;
  std::vector<Active> to_decode_;  // guarded by decode_mutex_
  bool decode_exit_ = false;       // guarded by decode_mutex_

  // Admitted images wait here for their prompt embeddings (the text thread), then in prepared_
  // for the worker to activate them.
  std::thread text_;
  std::mutex text_mutex_;
  std::condition_variable text_cv_;
  std::vector<Admission> to_prepare_;      // guarded by text_mutex_
  std::vector<Prepared> prepared_;         // guarded by text_mutex_
  bool text_exit_ = false;                 // guarded by text_mutex_
  std::atomic<size_t> prepared_count_{0};  // prepared_.size(), read under the engine's mutex
  size_t preparing_ = 0;  // images handed to the text thread and not yet activated (worker)
  std::map<std::pair<int, int>, int> preparing_rows_;  // their UNet rows by size (worker)
};

}  // namespace sdserve::engine
