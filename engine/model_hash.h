// A1111's "Model hash" of a single-file checkpoint: the first 10 hex digits of the file's SHA-256
// ("AutoV2", what civitai matches models on). Hashing a 2-7 GB file takes seconds, so a thread
// does it off the start-up path; until it is done, and for a diffusers folder (no one file),
// the hash is empty and the PNG's settings simply lack it.
//
// Thread-safe: the accessors may be called from any thread.
#pragma once

#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace sdserve::engine {

// The SHA-256 of a file as 64 hex digits: of all of it, or (after_header) of a .safetensors
// file's bytes after its header (A1111's "addnet" hash of a LoRA, which editing the file's
// metadata does not change). "" when it cannot be read, or when `stop` (asked between 4 MiB
// reads) says so.
std::string sha256_of_file(const std::string& path, bool after_header = false,
                           const std::function<bool()>& stop = {});

class ModelHash {
 public:
  // Starts hashing when `path` is a regular file; does nothing otherwise.
  explicit ModelHash(const std::string& path);
  ~ModelHash();  // stops a hash still in progress
  ModelHash(const ModelHash&) = delete;
  ModelHash& operator=(const ModelHash&) = delete;

  std::string sha256() const;  // 64 hex digits; "" until done or when there is no file
  std::string autov2() const;  // its first 10

 private:
  void run(const std::string& path);

  std::atomic<bool> stop_{false};
  mutable std::mutex mutex_;
  std::string sha256_;  // guarded by mutex_
  std::thread thread_;
};

}  // namespace sdserve::engine
