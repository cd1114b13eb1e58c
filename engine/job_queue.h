// The queue seam: which job gets the next free GPU slot. Strict priority between levels, FIFO
// within one, bounded. This in-process implementation is the default; a shared queue (many
// replicas on one Redis) can implement the same interface later.
//
// Thread safety: none; the engine guards its queue with its own mutex.
#pragma once

#include <cstddef>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "engine/job.h"

namespace sdserve::engine {

class JobQueue {
 public:
  virtual ~JobQueue() = default;
  // False when the queue is full.
  virtual bool push(const std::string& id, Priority priority) = 0;
  // The job that should run next, without removing it.
  virtual std::optional<std::string> front() const = 0;
  // The first `most` jobs in run order (a worker looks past jobs whose model is not loaded).
  virtual std::vector<std::string> in_order(std::size_t most) const = 0;
  // Removes a job wherever it is; false when it was not queued.
  virtual bool remove(const std::string& id) = 0;
  // 0-based position in run order, -1 when not queued.
  virtual int position(const std::string& id) const = 0;
  virtual std::size_t size() const = 0;
  virtual std::size_t capacity() const = 0;
};

class BoundedPriorityQueue final : public JobQueue {
 public:
  explicit BoundedPriorityQueue(std::size_t capacity) : capacity_(capacity) {}
  bool push(const std::string& id, Priority priority) override;
  std::optional<std::string> front() const override;
  std::vector<std::string> in_order(std::size_t most) const override;
  bool remove(const std::string& id) override;
  int position(const std::string& id) const override;
  std::size_t size() const override;
  std::size_t capacity() const override { return capacity_; }

 private:
  static constexpr int kLevels = 3;
  std::size_t capacity_;
  std::deque<std::string> levels_[kLevels];  // index = Priority value: high first
};

}  // namespace sdserve::engine
