#include "pipeline/runtime/unet_runner.h"

#include <algorithm>
#include <chrono>
#include <mutex>

#include "pipeline/log.h"
#include "pipeline/nn/lora_hook.h"
#include "pipeline/runtime/device.h"

#ifdef SDSERVE_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sdserve::pipeline {

#ifdef SDSERVE_WITH_CUDA
struct UNetRunner::Graphs {
  struct Entry {
    std::unique_ptr<at::cuda::CUDAGraph> graph;
    torch::Tensor x, t, ctx, out;         // static buffers the graph reads and writes
    torch::Tensor text_embeds, time_ids;  // SDXL's added conditioning (undefined otherwise)
  };
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, Entry> entries;  // rows, h, w, L
  // Shared by all graphs: only one replays at a time. (The pool id's type moved between torch
  // versions; take it from the API.)
  decltype(std::declval<at::cuda::CUDAGraph&>().pool()) pool{0, 0};
};
#else
struct UNetRunner::Graphs {
  size_t size() const { return 0; }
};
#endif

UNetRunner::UNetRunner(UNet unet, torch::Device device, torch::Dtype dtype,
                       UNetRunnerOptions options)
    : unet_(std::move(unet)),
      device_(device),
      dtype_(dtype),
      options_(std::move(options)),
      graphs_(std::make_unique<Graphs>()) {
  std::sort(options_.buckets.begin(), options_.buckets.end());
  if (device_.is_cuda() && options_.fuse_projections)
    for (auto& m : unet_->modules(/*include_self=*/false))
      if (auto* attention = m->as<AttentionImpl>()) attention->fuse_projections();
  if (device_.is_cuda() && options_.channels_last) to_channels_last(*unet_);
}

UNetRunner::~UNetRunner() = default;

int64_t UNetRunner::bucket_for(int64_t rows) const {
  for (int64_t b : options_.buckets)
    if (b >= rows) return b;
  return rows;
}

size_t UNetRunner::graphs_captured() const {
#ifdef SDSERVE_WITH_CUDA
  return graphs_->entries.size();
#else
  return 0;
#endif
}

torch::Tensor UNetRunner::forward(const torch::Tensor& x_in, const torch::Tensor& t_in,
                                  const torch::Tensor& ctx_in, const torch::Tensor& text_embeds,
                                  const torch::Tensor& time_ids) {
#ifdef SDSERVE_WITH_CUDA
  // Padded rows of a graph's static buffers stay zero, as for the other inputs.
  auto padded_like = [](const torch::Tensor& v, int64_t padded) {
    if (!v.defined()) return torch::Tensor();
    auto sizes = v.sizes().vec();
    sizes[0] = padded;
    return torch::zeros(sizes, v.options());
  };
  auto fill = [](torch::Tensor& buffer, const torch::Tensor& v, int64_t rows) {
    if (v.defined()) buffer.narrow(0, 0, rows).copy_(v);
  };
#endif
  torch::NoGradGuard no_grad;
  last_padding_ = 0;
  const bool cuda = device_.is_cuda();
  auto x = x_in;
  if (cuda && options_.channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
#ifdef SDSERVE_WITH_CUDA
  const bool graph_context =
      options_.max_graph_context == 0 || ctx_in.size(1) <= options_.max_graph_context;
  // A call whose rows carry per-row LoRA terms (nn/lora_hook.h) runs eagerly: its factors and row
  // groups change with the batch's sets, which a captured graph would not see. Batches without
  // LoRAs (and merged LoRAs, which change the weights in place) keep the graphs.
  if (cuda && options_.cuda_graphs && graph_context && !active_lora_call()) {
    const int64_t rows = x.size(0);
    const int64_t padded = bucket_for(rows);
    const auto key = std::make_tuple(padded, x.size(2), x.size(3), ctx_in.size(1));
    auto it = graphs_->entries.find(key);
    if (it == graphs_->entries.end()) {
      Graphs::Entry e;
      e.x = torch::zeros({padded, x.size(1), x.size(2), x.size(3)}, x.options());
      if (options_.channels_last) e.x = e.x.contiguous(torch::MemoryFormat::ChannelsLast);
      e.t = torch::zeros({padded}, t_in.options());
      e.ctx = torch::zeros({padded, ctx_in.size(1), ctx_in.size(2)}, ctx_in.options());
      e.text_embeds = padded_like(text_embeds, padded);
      e.time_ids = padded_like(time_ids, padded);
      e.x.narrow(0, 0, rows).copy_(x);
      e.t.narrow(0, 0, rows).copy_(t_in);
      e.ctx.narrow(0, 0, rows).copy_(ctx_in);
      fill(e.text_embeds, text_embeds, rows);
      fill(e.time_ids, time_ids, rows);
      // Warm up on a side stream (cuDNN picks its algorithms here), then capture.
      const auto t0 = std::chrono::steady_clock::now();
      auto stream = c10::cuda::getStreamFromPool(false, device_.index());
      {
        c10::cuda::CUDAStreamGuard guard(stream);
        for (int i = 0; i < 2; ++i) unet_->forward(e.x, e.t, e.ctx, e.text_embeds, e.time_ids);
        stream.synchronize();
        // With one worker per GPU, another thread may allocate or synchronise while this one
        // captures: thread-local capture mode keeps their calls from invalidating this capture
        // (global mode failed every job on two GPUs), and one capture at a time in the process
        // keeps library handles (cuBLAS workspaces) from being created inside two captures.
        static std::mutex capture_mutex;
        std::lock_guard<std::mutex> lock(capture_mutex);
        e.graph = std::make_unique<at::cuda::CUDAGraph>();
        e.graph->capture_begin(graphs_->pool, cudaStreamCaptureModeThreadLocal);
        e.out = unet_->forward(e.x, e.t, e.ctx, e.text_embeds, e.time_ids);
        e.graph->capture_end();
        graphs_->pool = e.graph->pool();
      }
      stream.synchronize();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      log(LogLevel::kInfo, "captured a CUDA graph for UNet batch " + std::to_string(padded) +
                               " at " + std::to_string(x.size(3) * 8) + "x" +
                               std::to_string(x.size(2) * 8) + " in " +
                               std::to_string(static_cast<int>(ms)) + " ms");
      it = graphs_->entries.emplace(key, std::move(e)).first;
    }
    auto& e = it->second;
    e.x.narrow(0, 0, rows).copy_(x);
    e.t.narrow(0, 0, rows).copy_(t_in);
    e.ctx.narrow(0, 0, rows).copy_(ctx_in);
    fill(e.text_embeds, text_embeds, rows);
    fill(e.time_ids, time_ids, rows);
    e.graph->replay();
    last_padding_ = padded - rows;
    // The graph overwrites `out` on its next replay, so hand the caller its own copy.
    return e.out.narrow(0, 0, rows).clone();
  }
#endif
  return unet_->forward(x, t_in, ctx_in, text_embeds, time_ids);
}

}  // namespace sdserve::pipeline
