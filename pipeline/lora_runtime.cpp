#include "pipeline/lora_runtime.h"
#include "pipeline/nn/options.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>
#include <variant>

#include "pipeline/errors.h"
#include "pipeline/io/tensor_io.h"
#include "pipeline/lora_impl.h"
#include "pipeline/runtime/device.h"

namespace sdserve::pipeline {
namespace {

using lora_names::Component;

size_t index_of(Component c) {
  return static_cast<size_t>(c);
}

bool on_side(Component c, LoraSide side) {
  return (c == Component::kUnet) == (side == LoraSide::kUnet);
}

std::vector<int64_t> two(const torch::ExpandingArray<2>& a) {
  return {(*a)[0], (*a)[1]};
}

std::string weight_text(double w) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", w);
  return buf;
}

[[noreturn]] void misfit(const Lora& lora, const ModelInfo& model, const std::string& why) {
  throw RequestError(
      "loras", "LoRA '" + lora.info().name + "' does not fit model '" + model.name + "': " + why);
}

// Down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]) against the module's weight.
bool fits(const LoraTarget& t, const torch::Tensor& down, const torch::Tensor& up) {
  const auto w = t.weight.sizes();
  const int64_t kh = t.conv ? w[2] : 1, kw = t.conv ? w[3] : 1;
  const auto d = down.sizes();
  const bool down_ok =
      d[1] == w[1] && (d.size() == 2 ? kh == 1 && kw == 1 : d[2] == kh && d[3] == kw);
  return down_ok && up.size(0) == w[0];
}

}  // namespace

LoraMode parse_lora_mode(const std::string& name) {
  if (name == "auto") return LoraMode::kAuto;
  if (name == "per-row" || name == "per_row") return LoraMode::kPerRow;
  if (name == "merged") return LoraMode::kMerged;
  throw ModelError("lora_mode '" + name + "' is unknown; use auto, per-row or merged");
}

std::string lora_mode_name(LoraMode mode) {
  switch (mode) {
    case LoraMode::kPerRow:
      return "per-row";
    case LoraMode::kMerged:
      return "merged";
    case LoraMode::kAuto:
      break;
  }
  return "auto";
}

// ---------------------------------------------------------------------------------------------
void LoraTargets::add(Component component, torch::nn::Module& root) {
  auto& targets = targets_[index_of(component)];
  std::vector<std::string> names;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    LoraTarget t;
    t.component = component;
    t.name = item.key();
    t.module = item.value().get();
    if (const auto* linear = item.value()->as<torch::nn::LinearImpl>()) {
      t.weight = linear->weight;
    } else if (const auto* conv = item.value()->as<torch::nn::Conv2dImpl>()) {
      const auto& o = conv->options;
      const auto* padding = variant_get_if<torch::ExpandingArray<2>>(o.padding());
      if (!padding || o.groups() != 1) continue;  // the models' convolutions are all plain
      t.weight = conv->weight;
      t.conv = true;
      t.stride = two(o.stride());
      t.padding = two(*padding);
      t.dilation = two(o.dilation());
    } else {
      continue;
    }
    names.push_back(t.name);
    targets.emplace(t.name, std::move(t));
  }
  kohya_[index_of(component)] = lora_names::kohya_module_names(component, names);
}

bool LoraTargets::has(Component component) const {
  return !targets_[index_of(component)].empty();
}

size_t LoraTargets::size() const {
  return targets_[0].size() + targets_[1].size() + targets_[2].size();
}

const LoraTarget* LoraTargets::find(Component component, const std::string& module,
                                    bool kohya) const {
  const auto& targets = targets_[index_of(component)];
  std::string name = module;
  if (kohya) {
    const auto& spellings = kohya_[index_of(component)];
    const auto it = spellings.find(module);
    if (it == spellings.end()) return nullptr;
    name = it->second;
  }
  const auto it = targets.find(name);
  return it == targets.end() ? nullptr : &it->second;
}

std::vector<const LoraTarget*> resolve_lora(const Lora& lora, const LoraTargets& targets,
                                            const ModelInfo& model) {
  const auto& info = lora.info();
  if (!info.family.empty() && info.family != model.family)
    misfit(lora, model,
           "the LoRA is for " + family_display_name(info.family) + " and the model is " +
               family_display_name(model.family));
  std::vector<const LoraTarget*> out;
  for (const auto& a : lora.impl().adapters) {
    if (!targets.has(a.component))
      misfit(lora, model,
             std::string("it adapts a ") +
                 (a.component == Component::kTextEncoder2 ? "second text encoder (SDXL's)"
                                                          : "text encoder") +
                 ", which the model lacks (tensor '" + a.key + "')");
    const auto* target = targets.find(a.component, a.module, a.kohya);
    if (!target)
      misfit(lora, model,
             "its tensor '" + a.key + "' adapts " + lora_names::component_name(a.component) +
                 " module '" + a.module + "', which the model does not have (a LoRA for " +
                 "another architecture?)");
    if (!fits(*target, a.down, a.up))
      misfit(lora, model,
             "its factors for " + std::string(lora_names::component_name(a.component)) + " '" +
                 target->name + "' are down " + shape_string(a.down.sizes()) + " and up " +
                 shape_string(a.up.sizes()) + ", but the model's weight there is " +
                 shape_string(target->weight.sizes()));
    out.push_back(target);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
LoraCache::LoraCache(size_t max_bytes, torch::Device device, torch::Dtype dtype)
    : max_bytes_(max_bytes), device_(device), dtype_(dtype) {}

size_t LoraCache::bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return bytes_;
}

size_t LoraCache::entries() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.size();
}

std::shared_ptr<const BoundLora> LoraCache::bind(const std::shared_ptr<const Lora>& lora,
                                                 const LoraTargets& targets,
                                                 const ModelInfo& model) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(lora->id());
    if (it != entries_.end()) {
      it->second.last_use = ++tick_;
      return it->second.bound;
    }
  }
  // Converted outside the lock: another thread's hit need not wait for this copy.
  const auto resolved = resolve_lora(*lora, targets, model);
  auto bound = std::make_shared<BoundLora>();
  bound->lora_id = lora->id();
  {
    torch::NoGradGuard no_grad;
    const auto& adapters = lora->impl().adapters;
    for (size_t i = 0; i < adapters.size(); ++i) {
      const auto& a = adapters[i];
      BoundLora::Entry e;
      e.target = resolved[i];
      e.down = a.down.reshape({a.rank(), -1}).to(device_, dtype_).contiguous();
      e.up = a.up.reshape({a.up.size(0), a.rank()}).to(device_, dtype_).contiguous();
      e.scale = a.scale;
      bound->bytes += (e.down.numel() + e.up.numel()) * e.down.element_size();
      bound->entries.push_back(std::move(e));
    }
  }
  // Other threads (the text thread's stream, the worker's) read these: the copies are complete
  // before any does. Binding is rare.
  synchronize(device_);
  std::vector<std::shared_ptr<const BoundLora>> dropped;
  std::shared_ptr<const BoundLora> result;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto [it, inserted] = entries_.try_emplace(lora->id());
    if (inserted) {
      it->second.lora = lora;
      it->second.bound = bound;
      bytes_ += bound->bytes;
    }
    it->second.last_use = ++tick_;
    result = it->second.bound;
    // Entries whose LoRA no one holds go first, then the least recently used, down to the bound
    // (the entry just used always stays).
    for (auto e = entries_.begin(); e != entries_.end();) {
      if (e->first != lora->id() && e->second.lora.expired()) {
        bytes_ -= e->second.bound->bytes;
        dropped.push_back(std::move(e->second.bound));
        e = entries_.erase(e);
      } else {
        ++e;
      }
    }
    while (bytes_ > max_bytes_ && entries_.size() > 1) {
      auto oldest = entries_.end();
      for (auto e = entries_.begin(); e != entries_.end(); ++e)
        if (e->first != lora->id() &&
            (oldest == entries_.end() || e->second.last_use < oldest->second.last_use))
          oldest = e;
      bytes_ -= oldest->second.bound->bytes;
      dropped.push_back(std::move(oldest->second.bound));
      entries_.erase(oldest);
    }
  }
  if (!dropped.empty()) {
    // A step queued on the device may still read an entry dropped here.
    synchronize(device_);
    dropped.clear();
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
LoraSet make_lora_set(const std::vector<LoraUse>& uses, LoraSide side, LoraCache& cache,
                      const LoraTargets& targets, const ModelInfo& model) {
  LoraSet set;
  for (const auto& use : uses) {
    if (!use.lora) throw RequestError("loras", "a LoRA of the list is missing (null)");
    const double weight = side == LoraSide::kUnet ? use.unet_weight : use.te_weight;
    if (!std::isfinite(weight))
      throw RequestError("loras", "LoRA '" + use.lora->info().name + "': its weight is not finite");
    if (weight == 0) continue;
    auto bound = cache.bind(use.lora, targets, model);
    const bool adapts_side = std::any_of(
        bound->entries.begin(), bound->entries.end(),
        [side](const BoundLora::Entry& e) { return on_side(e.target->component, side); });
    if (!adapts_side) continue;
    set.key += std::to_string(bound->lora_id) + ":" + weight_text(weight) + ";";
    set.items.emplace_back(std::move(bound), weight);
  }
  return set;
}

std::string lora_call_key(const std::vector<const LoraSet*>& rows) {
  std::string key;
  for (const auto* r : rows) key += (r ? r->key : std::string()) + "|";
  return key;
}

std::shared_ptr<const LoraCall> pack_lora_call(const std::vector<const LoraSet*>& rows,
                                               LoraSide side, torch::Device device) {
  torch::NoGradGuard no_grad;
  // Groups: the distinct sets among the rows (none is a group too).
  std::map<std::string, int64_t> group_of;
  std::vector<const LoraSet*> groups;
  std::vector<int64_t> row_group;
  bool any = false;
  for (const auto* r : rows) {
    const bool empty = !r || r->empty();
    any = any || !empty;
    const std::string key = empty ? std::string() : r->key;
    auto [it, inserted] = group_of.try_emplace(key, static_cast<int64_t>(groups.size()));
    if (inserted) groups.push_back(empty ? nullptr : r);
    row_group.push_back(it->second);
  }
  if (!any) return nullptr;
  const auto g_count = static_cast<int64_t>(groups.size());
  // Per module, per group: its LoRAs' down and scaled up factors, in the set's order.
  struct Parts {
    const LoraTarget* target = nullptr;
    std::vector<std::vector<std::pair<torch::Tensor, torch::Tensor>>> groups;
  };
  std::map<const torch::nn::Module*, Parts> modules;
  for (int64_t g = 0; g < g_count; ++g) {
    if (!groups[g]) continue;
    for (const auto& [bound, weight] : groups[g]->items)
      for (const auto& e : bound->entries) {
        if (!on_side(e.target->component, side)) continue;
        auto& parts = modules[e.target->module];
        parts.target = e.target;
        parts.groups.resize(g_count);
        parts.groups[g].emplace_back(e.down, e.up * (e.scale * weight));
      }
  }
  auto call = std::make_shared<LoraCall>();
  torch::Tensor group_index;
  if (g_count > 1) group_index = torch::tensor(row_group, torch::kInt64).to(device);
  for (auto& [module, parts] : modules) {
    int64_t rank = 0;
    for (const auto& g : parts.groups) {
      int64_t r = 0;
      for (const auto& [down, up] : g) r += down.size(0);
      rank = std::max(rank, r);
    }
    const auto& first = [&]() -> const std::pair<torch::Tensor, torch::Tensor>& {
      for (const auto& g : parts.groups)
        if (!g.empty()) return g.front();
      throw std::logic_error("LoRA packing: a module without factors");
    }();
    const int64_t in = first.first.size(1), out = first.second.size(0);
    LoraDelta d;
    d.down = torch::zeros({g_count, rank, in}, first.first.options());
    d.up = torch::zeros({g_count, out, rank}, first.second.options());
    for (int64_t g = 0; g < g_count; ++g) {
      int64_t at = 0;
      for (const auto& [down, up] : parts.groups[g]) {
        const int64_t r = down.size(0);
        d.down[g].narrow(0, at, r).copy_(down);
        d.up[g].narrow(1, at, r).copy_(up);
        at += r;
      }
    }
    d.rows = group_index;
    const auto* t = parts.target;
    d.conv = t->conv;
    if (t->conv) {
      d.in = t->weight.size(1);
      d.kh = t->weight.size(2);
      d.kw = t->weight.size(3);
      d.stride = t->stride;
      d.padding = t->padding;
      d.dilation = t->dilation;
    }
    call->deltas.emplace(module, std::move(d));
  }
  return call;
}

std::shared_ptr<const LoraCall> LoraPacking::get(const std::vector<const LoraSet*>& rows,
                                                 LoraSide side, torch::Device device) {
  auto key = lora_call_key(rows);
  if (!call_ || key != key_) {
    call_ = pack_lora_call(rows, side, device);
    key_ = std::move(key);
  }
  return call_;
}

// ---------------------------------------------------------------------------------------------
void MergedLoras::apply(const LoraSet& set, LoraSide side) {
  if (set.key == key_) return;
  restore();
  if (set.empty()) return;
  torch::NoGradGuard no_grad;
  std::set<const void*> saved;
  for (const auto& [bound, weight] : set.items)
    for (const auto& e : bound->entries) {
      if (!on_side(e.target->component, side)) continue;
      auto w = e.target->weight;
      if (saved.insert(w.unsafeGetTensorImpl()).second) saved_.emplace_back(w, w.clone());
      // As peft's merge: (up @ down) x scale in float32, cast to the weight's dtype, added.
      const auto delta =
          torch::matmul(e.up.to(torch::kFloat32), e.down.to(torch::kFloat32)) * (e.scale * weight);
      w.add_(delta.view(w.sizes()).to(w.scalar_type()));
    }
  key_ = set.key;
}

void MergedLoras::restore() {
  if (saved_.empty() && key_.empty()) return;
  torch::NoGradGuard no_grad;
  for (auto& [weight, original] : saved_) weight.copy_(original);
  saved_.clear();
  key_.clear();
}

}  // namespace sdserve::pipeline
