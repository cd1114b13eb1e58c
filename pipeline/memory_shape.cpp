// memory.h's shapes from a loaded model, and the memory its device has free (torch).
#include <algorithm>
#include <fstream>
#include <sstream>

#include "pipeline/memory.h"
#include "pipeline/model_impl.h"
#include "pipeline/nn/attention.h"
#include "pipeline/runtime/device.h"

#ifdef SDSERVE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace sdserve::pipeline {
namespace {

int dtype_bytes(torch::Dtype dtype) {
  return static_cast<int>(torch::elementSize(dtype));
}

// "MemAvailable:   20123456 kB" -> bytes; 0 when absent.
uint64_t meminfo_available() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream fields(line.substr(13));
    uint64_t kb = 0;
    fields >> kb;
    return kb * 1024;
  }
  return 0;
}

// A number in a cgroup file ("max" or absent: none).
uint64_t cgroup_value(const char* path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text == "max") return 0;
  try {
    return std::stoull(text);
  } catch (...) {
    return 0;
  }
}

}  // namespace

MemoryShape memory_shape(const Model& model) {
  const Model::Impl& impl = model.impl();
  const UNetConfig& c = impl.unet->config();
  const VaeConfig& vae = impl.vae->config();  // impl.vae_config is set only for fp16 retries
  MemoryShape s;
  s.vae_scale = 1 << std::max<int>(0, static_cast<int>(vae.block_out_channels.size()) - 1);
  const auto at = [](const std::vector<int64_t>& v, size_t i, int64_t fallback) {
    return v.empty() ? fallback : v[std::min(i, v.size() - 1)];
  };
  for (size_t i = 0; i < c.block_out_channels.size(); ++i) {
    MemoryShape::Level level;
    level.channels = static_cast<int>(c.block_out_channels[i]);
    const bool attention =
        i < c.down_block_types.size() && c.down_block_types[i] == "CrossAttnDownBlock2D";
    level.heads = attention ? static_cast<int>(at(c.num_attention_heads, i, 8)) : 0;
    level.layers = static_cast<int>(at(c.layers_per_block, i, 2));
    level.transformers = static_cast<int>(at(c.transformer_layers_per_block, i, 1));
    s.levels.push_back(level);
  }
  if (!c.mid_block_type.empty() && !c.block_out_channels.empty())
    s.mid_heads = static_cast<int>(at(c.num_attention_heads, c.block_out_channels.size() - 1, 8));
  s.unet_element_bytes = dtype_bytes(impl.dtype);
  const bool fused = has_fused_attention() && impl.device.is_cuda();
  s.fused_attention = fused;
  s.attention_element_bytes =
      c.upcast_attention && !fused ? 4 : s.unet_element_bytes;  // blocks.cpp's upcast
  for (int64_t ch : vae.block_out_channels) s.vae_channels.push_back(static_cast<int>(ch));
  s.vae_mid_attention = vae.mid_block_add_attention;
  // The VAE runs in float32 where its config asks for it (force_upcast) on the CPU, else in the
  // compute dtype; the larger of the two covers the float32 retry of an fp16 overflow.
  s.vae_element_bytes = std::max(4, s.unet_element_bytes);
  s.decode_chunk = impl.device.is_cuda() ? static_cast<int>(Model::Impl::kDecodeChunk) : 1;
  return s;
}

uint64_t available_memory(const Model& model) {
  const auto device = model.impl().device;
#ifdef SDSERVE_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDAGuard guard(device.index());
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return 0;
    const auto m = device_memory(device, false);
    return static_cast<uint64_t>(free) + (m.reserved > m.allocated ? m.reserved - m.allocated : 0);
  }
#else
  (void)device;
#endif
  uint64_t available = meminfo_available();
  const uint64_t limit = cgroup_value("/sys/fs/cgroup/memory.max");
  if (limit > 0) {
    const uint64_t used = cgroup_value("/sys/fs/cgroup/memory.current");
    const uint64_t left = limit > used ? limit - used : 0;
    available = available == 0 ? left : std::min(available, left);
  }
  return available;
}

}  // namespace sdserve::pipeline
