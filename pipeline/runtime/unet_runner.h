// Runs the UNet for the step-level API, choosing how: eager, or (on CUDA) replaying a CUDA graph
// captured once per (padded batch, resolution). A graph removes the ~1,000 kernel launches of a
// UNet call from the CPU's critical path; padding the batch up to a bucket keeps the number of
// graphs small while the batching engine's batch size changes every step.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <tuple>
#include <vector>

#include "pipeline/nn/unet.h"

namespace sdserve::pipeline {

struct UNetRunnerOptions {
  bool cuda_graphs = true;       // ignored off CUDA
  bool channels_last = true;     // ignored off CUDA
  bool fuse_projections = true;  // fused q/k/v GEMMs; ignored off CUDA (CPU stays exact)
  std::vector<int64_t> buckets;  // UNet rows are padded up to one of these (CUDA only)
  // Graphs only for prompt embeddings up to this many tokens (one chunk): long prompts, rarer
  // and of many lengths, run eagerly instead of capturing a graph per length. 0: any length.
  int64_t max_graph_context = 0;
};

class UNetRunner {
 public:
  UNetRunner(UNet unet, torch::Device device, torch::Dtype dtype, UNetRunnerOptions options);
  ~UNetRunner();

  // x: (B, C, h, w) in the compute dtype; t: (B) float32; ctx: (B, L, D); text_embeds (B, P)
  // and time_ids (B, 6) for SDXL's UNet, undefined otherwise. Returns (B, C, h, w).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& ctx,
                        const torch::Tensor& text_embeds = {}, const torch::Tensor& time_ids = {});

  int64_t bucket_for(int64_t rows) const;  // rows itself when no bucket fits
  // Rows of padding the last forward() added (0 unless it replayed a CUDA graph).
  int64_t last_padding() const { return last_padding_; }
  size_t graphs_captured() const;

 private:
  struct Graphs;  // CUDA graph cache (defined only in CUDA builds)
  UNet unet_;
  torch::Device device_;
  torch::Dtype dtype_;
  UNetRunnerOptions options_;
  std::unique_ptr<Graphs> graphs_;
  int64_t last_padding_ = 0;
};

}  // namespace sdserve::pipeline
