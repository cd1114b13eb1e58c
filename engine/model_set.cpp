#include "engine/model_set.h"

#include <algorithm>
#include <chrono>

#include "pipeline/log.h"
#include "pipeline/memory.h"

namespace sdserve::engine {

ModelSet::ModelSet(std::string device, uint64_t budget, ModelLoader loader,
                   std::function<void()> changed)
    : device_(std::move(device)),
      budget_(budget),
      loader_(std::move(loader)),
      changed_(std::move(changed)) {
  thread_ = std::thread([this] { loader_loop(); });
}

ModelSet::~ModelSet() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void ModelSet::add_pinned(const std::string& name, std::shared_ptr<ModelRunner> runner) {
  std::lock_guard<std::mutex> lock(mutex_);
  Slot slot;
  slot.pinned = true;
  slot.bytes = runner->info().weight_bytes;
  slot.load_seconds = runner->info().load_seconds;
  slot.runner = std::move(runner);
  slot.last_used = ++clock_;
  slots_[name] = std::move(slot);
}

ModelSet::Lookup ModelSet::acquire(const std::string& name,
                                   const std::function<uint64_t()>& expected_bytes) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (const auto it = slots_.find(name); it != slots_.end()) {
    it->second.last_used = ++clock_;
    return {State::kReady, it->second.runner, ""};
  }
  if (const auto f = failures_.find(name); f != failures_.end()) {
    const double age =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - f->second.at).count();
    if (age < kRetryAfterS) return {State::kFailed, nullptr, f->second.error};
    failures_.erase(f);
  }
  const bool queued =
      loading_ == name ||
      std::any_of(pending_.begin(), pending_.end(), [&](const auto& p) { return p.first == name; });
  if (!queued) {
    lock.unlock();  // sizing a model may read its files
    const uint64_t bytes = expected_bytes ? expected_bytes() : 0;
    lock.lock();
    if (loading_ != name && std::none_of(pending_.begin(), pending_.end(),
                                         [&](const auto& p) { return p.first == name; }))
      pending_.emplace_back(name, bytes);
    lock.unlock();
    cv_.notify_all();
  }
  return {State::kLoading, nullptr, ""};
}

bool ModelSet::waiting_for_room() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return waiting_for_room_;
}

std::vector<LoadedModel> ModelSet::loaded() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<LoadedModel> out;
  for (const auto& [name, slot] : slots_)
    out.push_back({name, device_, slot.bytes, slot.pinned || slot.runner.use_count() > 1,
                   slot.pinned, slot.load_seconds});
  return out;
}

void ModelSet::set_textual_inversions(std::vector<pipeline::TextualInversionPtr> list) {
  std::vector<std::shared_ptr<ModelRunner>> runners;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    textual_inversions_ = list;
    for (const auto& [name, slot] : slots_) runners.push_back(slot.runner);
  }
  for (const auto& r : runners) r->set_textual_inversions(list);
}

ModelSetStats ModelSet::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

uint64_t ModelSet::used() const {
  uint64_t n = 0;
  for (const auto& [name, slot] : slots_) n += slot.bytes;
  return n;
}

bool ModelSet::make_room(uint64_t bytes) {
  if (budget_ == 0) return true;
  while (used() + bytes > budget_) {
    // Idle: nothing but this set holds the runner (images, embeddings' codecs and decodes hold
    // it while they last).
    auto victim = slots_.end();
    for (auto it = slots_.begin(); it != slots_.end(); ++it)
      if (!it->second.pinned && it->second.runner.use_count() == 1 &&
          (victim == slots_.end() || it->second.last_used < victim->second.last_used))
        victim = it;
    if (victim == slots_.end()) return false;
    pipeline::log(pipeline::LogLevel::kInfo, "model " + victim->first + " evicted from " + device_ +
                                                 " (" + pipeline::bytes_text(victim->second.bytes) +
                                                 ") to make room");
    slots_.erase(victim);
    ++stats_.evictions;
  }
  return true;
}

void ModelSet::loader_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || !pending_.empty(); });
    if (stop_) return;
    const auto [name, bytes] = pending_.front();
    uint64_t pinned = 0;
    for (const auto& [n, slot] : slots_)
      if (slot.pinned) pinned += slot.bytes;
    if (budget_ > 0 && bytes + pinned > budget_) {
      pending_.pop_front();
      failures_[name] = {"model " + name + " needs about " + pipeline::bytes_text(bytes) +
                             " for its weights, and model_memory_mb (" +
                             pipeline::bytes_text(budget_) + ") holds " +
                             pipeline::bytes_text(pinned) + " of the default model's: raise it",
                         std::chrono::steady_clock::now()};
      ++stats_.load_failures;
      lock.unlock();
      changed_();
      lock.lock();
      continue;
    }
    if (!make_room(bytes)) {
      // Models in use hold the room: the worker stops admitting until they drain. Look again
      // shortly (an image leaving does not signal this thread).
      waiting_for_room_ = true;
      cv_.wait_for(lock, std::chrono::milliseconds(20));
      continue;
    }
    waiting_for_room_ = false;
    pending_.pop_front();
    loading_ = name;
    lock.unlock();
    const auto start = std::chrono::steady_clock::now();
    std::shared_ptr<ModelRunner> runner;
    std::string error;
    try {
      runner = loader_(name, device_);
      std::vector<pipeline::TextualInversionPtr> list;
      {
        std::lock_guard<std::mutex> relock(mutex_);
        list = textual_inversions_;
      }
      runner->set_textual_inversions(std::move(list));
    } catch (const std::exception& e) {
      error = e.what();
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    lock.lock();
    loading_.clear();
    if (runner) {
      Slot slot;
      slot.bytes = runner->info().weight_bytes;
      slot.load_seconds = seconds;
      slot.runner = std::move(runner);
      slot.last_used = ++clock_;
      slots_[name] = std::move(slot);
      ++stats_.loads;
      stats_.load_seconds += seconds;
    } else {
      pipeline::log(pipeline::LogLevel::kError,
                    "loading model " + name + " on " + device_ + " failed: " + error);
      failures_[name] = {error, std::chrono::steady_clock::now()};
      ++stats_.load_failures;
    }
    lock.unlock();
    changed_();
    lock.lock();
  }
}

}  // namespace sdserve::engine
