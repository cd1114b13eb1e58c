// LoRAs in a loaded model (internal header: torch).
//
// Two ways to run a call whose rows carry LoRAs:
//  - per row (S-LoRA / Punica): base weights shared, each adaptable module adds its rows' low-rank
//    terms in the batched forward (nn/lora_hook.h), so rows with different LoRA sets (or none)
//    share one UNet call. pack_lora_call() builds a call's factors: per set, its LoRAs
//    concatenated along the rank with weight x alpha / rank folded into the up factor, padded to
//    the call's largest rank, gathered per row. Such a call runs eagerly (no CUDA graph).
//  - merged: W += weight x scale x up @ down for every LoRA of the one set all rows share (in
//    float32, then cast: as peft's merge, which diffusers' fuse_lora calls), keeping a copy of the
//    original weights of the modules touched and copying them back to restore (never
//    subtracting, so restoring is exact). The weights change in place, so CUDA graphs captured
//    before still apply. The merge stays until a call with another set (or none) restores it.
// LoraMode says which (LoadOptions::lora_mode).
//
// Each LoRA is converted once per model to its device and dtype (BoundLora), in a cache bounded
// in bytes (LoraCache: least recently used entries go first; entries of LoRAs no one holds any
// more go at the next bind), freed with the model.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "pipeline/io/lora_convert.h"
#include "pipeline/lora.h"
#include "pipeline/nn/lora_hook.h"
#include "pipeline/pipeline.h"

namespace sdserve::pipeline {

// kAuto: merged when every row of a UNet call uses one set, per row otherwise; the text encoders
// per row (a call's prompts share one set, and merging a whole encoder costs more than its
// low-rank terms). kPerRow: always per row. kMerged: always merged; a UNet call whose rows use
// different sets runs once per set (what tools without per-row LoRAs do).
enum class LoraMode { kAuto, kPerRow, kMerged };
LoraMode parse_lora_mode(const std::string& name);  // "auto" | "per-row" | "merged"; ModelError
std::string lora_mode_name(LoraMode mode);

// A module a LoRA may adapt: each Linear and Conv2d of the UNet and the text encoders.
struct LoraTarget {
  lora_names::Component component = lora_names::Component::kUnet;
  std::string name;  // as registered ("down_blocks.0.attentions.0.proj_in")
  const torch::nn::Module* module = nullptr;
  torch::Tensor weight;  // the module's weight parameter itself (merging writes into it)
  bool conv = false;
  std::vector<int64_t> stride{1, 1}, padding{0, 0}, dilation{1, 1};
};

class LoraTargets {
 public:
  // Adds `root`'s Linear and Conv2d modules (after the UNet runner has fused and re-laid them).
  void add(lora_names::Component component, torch::nn::Module& root);
  bool has(lora_names::Component component) const;
  // The module an adapter names (kohya's underscored spelling, or our dotted name), or null.
  const LoraTarget* find(lora_names::Component component, const std::string& module,
                         bool kohya) const;
  size_t size() const;

 private:
  std::map<std::string, LoraTarget> targets_[3];
  std::map<std::string, std::string> kohya_[3];
};

// Each adapter's target, checked: the LoRA's family against the model's, every module it names,
// every factor's shape. Throws RequestError("loras") naming the LoRA and what does not fit.
std::vector<const LoraTarget*> resolve_lora(const Lora& lora, const LoraTargets& targets,
                                            const ModelInfo& model);

// A LoRA on a model's device, in its dtype.
struct BoundLora {
  struct Entry {
    const LoraTarget* target = nullptr;
    torch::Tensor down;  // (rank, in x kh x kw)
    torch::Tensor up;    // (out, rank)
    double scale = 1.0;  // alpha / rank
  };
  std::vector<Entry> entries;
  uint64_t lora_id = 0;
  size_t bytes = 0;
};

// Thread-safe (the worker and text threads bind concurrently).
class LoraCache {
 public:
  LoraCache(size_t max_bytes, torch::Device device, torch::Dtype dtype);
  std::shared_ptr<const BoundLora> bind(const std::shared_ptr<const Lora>& lora,
                                        const LoraTargets& targets, const ModelInfo& model);
  size_t bytes() const;
  size_t entries() const;

 private:
  struct Entry {
    std::weak_ptr<const Lora> lora;
    std::shared_ptr<const BoundLora> bound;
    uint64_t last_use = 0;
  };
  const size_t max_bytes_;
  const torch::Device device_;
  const torch::Dtype dtype_;
  mutable std::mutex mutex_;
  std::map<uint64_t, Entry> entries_;  // by Lora::id(); guarded by mutex_
  uint64_t tick_ = 0;                  // guarded by mutex_
  size_t bytes_ = 0;                   // guarded by mutex_
};

// The LoRAs one UNet row (with their unet weights) or one text-encoder call (te weights) uses.
struct LoraSet {
  std::vector<std::pair<std::shared_ptr<const BoundLora>, double>> items;
  std::string key;  // equal keys, equal sets; "" for none
  bool empty() const { return items.empty(); }
};

// Which side of the model a set or a call adapts.
enum class LoraSide { kUnet, kText };

// `uses` bound through `cache`, with the weights of `side`; LoRAs with a zero weight or without
// adapters on that side left out. Throws RequestError("loras") for a LoRA that does not fit.
LoraSet make_lora_set(const std::vector<LoraUse>& uses, LoraSide side, LoraCache& cache,
                      const LoraTargets& targets, const ModelInfo& model);

// The per-row form of one forward call: row n adds rows[n]'s terms (null or empty: none).
std::shared_ptr<const LoraCall> pack_lora_call(const std::vector<const LoraSet*>& rows,
                                               LoraSide side, torch::Device device);
// A key that is equal for calls pack_lora_call() packs alike.
std::string lora_call_key(const std::vector<const LoraSet*>& rows);

// The last packing of one side, reused while consecutive calls' rows carry the same sets (a
// batch keeps its rows for many steps). Used from that side's thread only.
class LoraPacking {
 public:
  std::shared_ptr<const LoraCall> get(const std::vector<const LoraSet*>& rows, LoraSide side,
                                      torch::Device device);

 private:
  std::string key_;
  std::shared_ptr<const LoraCall> call_;
};

// The merged form. One per side, used from that side's thread only.
class MergedLoras {
 public:
  // Makes the weights of the modules `set` adapts carry its deltas, restoring first what another
  // set merged; nothing to do when `set` is merged already. An empty set restores.
  void apply(const LoraSet& set, LoraSide side);
  // Copies the saved originals back.
  void restore();
  const std::string& key() const { return key_; }

 private:
  std::vector<std::pair<torch::Tensor, torch::Tensor>> saved_;  // (weight, original)
  std::string key_;
};

}  // namespace sdserve::pipeline
