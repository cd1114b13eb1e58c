// One worker per device: a thread running step-level continuous batching over an active set of
// images. Each turn: retire() images of cancelled jobs, admit() queued images up to max_batch
// (one resolution per set), prepare() them (prompt embeddings, one ImageRun each), step() them
// all in one model call, publish() progress and previews, finish() the images that are done
// (decode here, PNG encoding on the engine's encoder thread). A failure in any phase ends the jobs
// it touched, never the thread.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/engine_impl.h"
#include "engine/model_runner.h"

namespace sdserve::engine {

class Worker {
 public:
  Worker(Engine::Impl& engine, ModelRunner& model);
  // The thread body: warm-up, then turns until the engine says exit.
  void run();

 private:
  struct Active {
    std::shared_ptr<JobState> job;
    int index = 0;  // image k of the job
    std::unique_ptr<ImageRun> run;
    pipeline::EmbeddingPtr cond, uncond;  // shared by the job's images on this worker
  };
  using Admission = std::pair<std::shared_ptr<JobState>, int>;  // (job, image index)

  bool warm_up();
  // With the engine's mutex held: drops images of cancelled or failed jobs, waits for work, and
  // takes queued images. False when the thread should exit.
  bool retire_and_admit(std::vector<Admission>* admitted);
  void admit(std::unique_lock<std::mutex>& lock, std::vector<Admission>* admitted);
  void prepare(const std::vector<Admission>& admitted);
  bool step();
  void publish();
  void send_previews();
  void finish();
  void fail(const std::vector<std::shared_ptr<JobState>>& jobs, const std::string& error);
  pipeline::EmbeddingPtr embed(const std::string& prompt, int clip_skip);

  Engine::Impl& engine_;
  ModelRunner& model_;
  const std::string device_;
  std::vector<Active> active_;
};

}  // namespace sdserve::engine
