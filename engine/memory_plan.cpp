#include "engine/memory_plan.h"

#include <algorithm>

namespace sdserve::engine {

MemoryPlan::MemoryPlan(uint64_t budget, int max_rows) : budget_(budget), max_rows_(max_rows) {}

uint64_t MemoryPlan::unet_bytes(const ModelRunner& model, int width, int height, int rows) {
  return model.estimate_memory(width, height, rows, 0).unet;
}

uint64_t MemoryPlan::decode_bytes(const ModelRunner& model, int width, int height, int images) {
  return model.estimate_memory(width, height, 0, images).vae;
}

int MemoryPlan::unet_rows(const ModelRunner& model, int width, int height) {
  if (budget_ == 0) return max_rows_;
  const auto [it, added] = rows_.try_emplace({model.info().path, width, height}, 0);
  if (!added) return it->second;
  // Beside the smallest decode of this size: a call at this cap never has to wait for one.
  const uint64_t decode = decode_bytes(model, width, height, 1);
  int rows = 0;
  while (rows < max_rows_ && unet_bytes(model, width, height, rows + 1) + decode <= budget_) ++rows;
  return it->second = rows;
}

MemoryPlan::Hold::~Hold() {
  if (!plan_) return;
  {
    std::lock_guard<std::mutex> lock(plan_->mutex_);
    (unet_ ? plan_->unet_running_ : plan_->decode_running_) = false;
    (unet_ ? plan_->unet_held_ : plan_->decode_held_) = 0;
  }
  plan_->changed_.notify_all();
}

MemoryPlan::Hold MemoryPlan::hold_unet(uint64_t bytes) {
  if (budget_ == 0) return {};
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] {
    return !decode_waiting_ && (!decode_running_ || decode_held_ + bytes <= budget_);
  });
  unet_running_ = true;
  unet_held_ = unet_last_ = bytes;
  return Hold(this, true);
}

MemoryPlan::Hold MemoryPlan::hold_decode(const std::vector<uint64_t>& bytes, size_t* images) {
  if (budget_ == 0 || bytes.empty()) {
    *images = bytes.size();
    return {};
  }
  std::unique_lock<std::mutex> lock(mutex_);
  const auto fitting = [&](uint64_t beside) {
    size_t n = 0;
    while (n < bytes.size() && beside + bytes[n] <= budget_) ++n;
    return n;
  };
  // Between UNet calls, sized as if the last one were running: the next call can start beside
  // it instead of waiting for the whole decode.
  size_t n = fitting(unet_running_ ? unet_held_ : unet_last_);
  if (n == 0) {
    decode_waiting_ = true;
    changed_.wait(lock, [&] { return !unet_running_; });
    decode_waiting_ = false;
    n = 1;  // between two UNet calls, which wait for it
  }
  decode_running_ = true;
  decode_held_ = bytes[n - 1];
  *images = n;
  lock.unlock();
  changed_.notify_all();  // a UNet call waiting for the decode to go first may fit beside it
  return Hold(this, false);
}

}  // namespace sdserve::engine
