// The memory budget at work on one worker (issue #23). A request is admitted when one of its
// images fits the budget alone (Engine::Impl::check_memory); the worker then merges images of a
// size into a UNet call only up to the rows whose estimated peak fits beside a one-image decode of
// that size (unet_rows), and a UNet call and a decode on the decoder thread run together only
// while their estimates fit together (hold_unet, hold_decode): what does not fit waits for the
// next call. So an image that fits alone always runs, and nothing the worker builds is estimated
// past the budget. Estimates come from the model (ModelRunner::estimate_memory).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "engine/job.h"
#include "engine/model_runner.h"

namespace sdserve::engine {

// Rows an image takes in a UNet call: two with classifier-free guidance, else one.
inline int unet_rows_of(const JobRequest& request) {
  return request.guidance_scale > 1.0 ? 2 : 1;
}

// Thread safety: unet_rows() on one thread (the worker's); the rest on any.
class MemoryPlan {
 public:
  // `budget` 0: no limit (the caps are max_rows, and nothing waits).
  // Estimates come from each call's model (a worker may hold several checkpoints).
  MemoryPlan(uint64_t budget, int max_rows);

  uint64_t budget() const { return budget_; }
  // The most rows one UNet call at width x height holds beside a decode of one image of that
  // size, at most max_rows; 0 when not even one row fits (an image that alone does not fit still
  // runs alone: check_memory refused it unless no budget is known). Cached per size.
  int unet_rows(const ModelRunner& model, int width, int height);
  static uint64_t unet_bytes(const ModelRunner& model, int width, int height, int rows);
  static uint64_t decode_bytes(const ModelRunner& model, int width, int height, int images);

  // What a UNet call or a decode in flight holds of the budget, until it is destroyed.
  class Hold {
   public:
    Hold() = default;
    Hold(Hold&& other) noexcept : plan_(std::exchange(other.plan_, nullptr)), unet_(other.unet_) {}
    Hold& operator=(Hold&&) = delete;
    ~Hold();

   private:
    friend class MemoryPlan;
    Hold(MemoryPlan* plan, bool unet) : plan_(plan), unet_(unet) {}
    MemoryPlan* plan_ = nullptr;
    bool unet_ = false;
  };
  // Waits while a decode holds too much for `bytes` to fit beside it, and while a decode waits
  // (it goes first, so neither side starves: each waits for at most one call of the other).
  Hold hold_unet(uint64_t bytes);
  // `bytes[i]`: decoding the first i + 1 images. Takes the most images that fit beside the UNet
  // call in flight (into *images); when not even the first does, waits for that call to end,
  // then takes what fits alone (at least one).
  Hold hold_decode(const std::vector<uint64_t>& bytes, size_t* images);

 private:
  const uint64_t budget_;
  const int max_rows_;
  // unet_rows() per (model path, width, height), on the worker's thread.
  std::map<std::tuple<std::string, int, int>, int> rows_;

  std::mutex mutex_;
  std::condition_variable changed_;
  bool unet_running_ = false, decode_running_ = false;  // guarded by mutex_
  uint64_t unet_held_ = 0, decode_held_ = 0;            // guarded by mutex_: while running
  uint64_t unet_last_ = 0;       // guarded by mutex_: the latest UNet call's bytes
  bool decode_waiting_ = false;  // guarded by mutex_
};

}  // namespace sdserve::engine
