// A models folder as AUTOMATIC1111 and ComfyUI keep one: checkpoints, LoRAs, VAEs and textual-
// inversion embeddings, each kind in a sub-folder under either tool's name:
//
//   MODELS_DIR/Stable-diffusion/ or checkpoints/   single .safetensors files, diffusers folders
//   MODELS_DIR/Lora/ or loras/                     .safetensors
//   MODELS_DIR/VAE/ or vae/                        .safetensors, diffusers VAE folders
//   MODELS_DIR/embeddings/ and EMBEDDINGS_DIR      .safetensors
//
// Sub-folders are searched too. Every file of a known kind is listed; one that cannot be used (a
// pickle, a broken or hostile file, an architecture we do not run) is listed with the reason,
// and never stops the service. The listing changes only on refresh().
//
// Hashes are A1111's: the SHA-256 of the file (AutoV2 = its first 10 hex digits); for a LoRA,
// the SHA-256 of the file after its safetensors header (A1111's and kohya's "addnet" hash, so
// editing its metadata does not change it; A1111 writes its first 12 digits). A diffusers
// folder has no one file; its hash is the SHA-256 of the lines "RELATIVE_PATH SHA256\n" of its
// .safetensors weight files, sorted by path. Hashing reads the whole file, so it runs on a thread
// of its own and its results are kept in a cache file keyed by path, size and modification time
// (A1111's cache.json does the same): a refresh re-reads only what changed.
//
// Thread safety: every member may be called from any thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/model_hash.h"
#include "pipeline/pipeline.h"

namespace sdserve::engine {

enum class ModelKind { kCheckpoint, kLora, kVae, kEmbedding };
std::string to_string(ModelKind kind);  // "checkpoint", "lora", "vae", "embedding"

struct CatalogEntry {
  ModelKind kind = ModelKind::kCheckpoint;
  // The path below its kind's folder, without the extension, '/' between folders: what
  // requests name ("sd15/dreamshaper_8"). A1111's `name` is file_name: with the extension.
  std::string name;
  std::string file_name;
  std::string path;     // absolute
  bool folder = false;  // a diffusers folder
  uint64_t bytes = 0;   // the file's size; a folder's weight files together
  int64_t mtime = 0;    // nanoseconds since the epoch, for the hash cache
  std::string sha256;   // "" until hashed (or when it cannot be read)
  // Non-empty: the entry cannot be used, and why ("a pickled checkpoint: ...").
  std::string error;
  // Checkpoints: what the model is (pipeline::inspect_model), without its weights.
  pipeline::ModelInfo info;

  std::string autov2() const { return sha256.substr(0, sha256.empty() ? 0 : 10); }
  // A1111's short hash of a LoRA (its "Lora hashes" in PNG parameters): 12 digits.
  std::string lora_shorthash() const { return sha256.substr(0, sha256.empty() ? 0 : 12); }
  // A1111's title: "file_name [autov2]", or the file name until it is hashed.
  std::string title() const;
};

struct CatalogOptions {
  std::string models_dir;      // "": no folder (only `extra_checkpoints`)
  std::string embeddings_dir;  // A1111 keeps embeddings/ beside models/; "": none beyond it
  // Checkpoints outside the folder (--model): listed first, under their own names.
  std::vector<std::string> extra_checkpoints;
  // Where hashes are kept between runs; "": MODELS_DIR/.sdserve-hashes.json (none without a
  // models folder). A cache that cannot be written is kept in memory, with one warning.
  std::string hash_cache;
  pipeline::LoadOptions load;  // how checkpoints would load (their precision, for their size)
  // Checks a LoRA, VAE or embedding file; "" when usable, else why not. Unset: the file must be
  // a readable .safetensors file (pickles are refused by name).
  std::function<std::string(ModelKind, const std::string& path)> check;
  bool hash_in_background = true;  // false: refresh() hashes before it returns (tests)
};

class ModelCatalog {
 public:
  explicit ModelCatalog(CatalogOptions options);  // scans once
  ~ModelCatalog();                                // stops hashing
  ModelCatalog(const ModelCatalog&) = delete;
  ModelCatalog& operator=(const ModelCatalog&) = delete;

  // Scans again: new files appear, changed ones are inspected again, removed ones go. Returns
  // the entries of `kind` after the scan.
  void refresh();
  void refresh(ModelKind kind);

  std::vector<CatalogEntry> list(ModelKind kind) const;  // sorted by name; usable or not
  // By name (with or without the extension), A1111's title ("name.safetensors [hash]") or
  // model_name, or hash (AutoV2, or a longer prefix of the SHA-256). Unusable entries are
  // found too (callers say why they cannot be used).
  std::optional<CatalogEntry> find(ModelKind kind, const std::string& name_or_hash) const;
  // The first usable checkpoint by name, or `preferred` when it names one; nullopt: none.
  std::optional<CatalogEntry> default_checkpoint(const std::string& preferred = "") const;
  // Waits until every entry is hashed (tests, and `sdserve models`); false on timeout.
  bool wait_for_hashes(double timeout_s) const;

 private:
  void scan(ModelKind kind, std::vector<CatalogEntry>* out) const;
  void inspect(CatalogEntry* entry) const;
  void hash_loop();
  std::string hash(const CatalogEntry& entry);  // "" when stopped or unreadable
  // `after_header`: from the end of the safetensors header on (LoRAs); cached apart.
  std::string file_sha256(const std::string& path, uint64_t bytes, int64_t mtime,
                          bool after_header = false);
  void load_hash_cache();
  void save_hash_cache();

  const CatalogOptions options_;
  std::string hash_cache_path_;

  mutable std::mutex mutex_;
  mutable std::condition_variable hashed_cv_;
  std::map<ModelKind, std::vector<CatalogEntry>> entries_;  // guarded by mutex_
  // path -> (bytes, mtime, sha256); guarded by mutex_.
  struct CachedHash {
    uint64_t bytes = 0;
    int64_t mtime = 0;
    std::string sha256;
  };
  std::map<std::string, CachedHash> hash_cache_;
  bool cache_write_warned_ = false;
  std::deque<std::string> to_hash_;  // entry paths; guarded by mutex_
  bool stop_ = false;                // guarded by mutex_
  std::condition_variable hash_cv_;
  std::thread hasher_;
};

}  // namespace sdserve::engine
