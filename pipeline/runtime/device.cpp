#include "pipeline/runtime/device.h"

#ifdef SDSERVE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace sdserve::pipeline {

void synchronize(torch::Device device) {
#ifdef SDSERVE_WITH_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)device;
#endif
}

bench_support::DeviceMemory device_memory(torch::Device device, bool reset_peak) {
  bench_support::DeviceMemory m;
#ifdef SDSERVE_WITH_CUDA
  if (device.is_cuda()) {
    namespace alloc = c10::cuda::CUDACachingAllocator;
    const auto stats = alloc::getDeviceStats(device.index());
    constexpr size_t agg = 0;  // StatType::AGGREGATE, whose namespace moved between torch versions
    m.allocated = stats.allocated_bytes[agg].current;
    m.peak_allocated = stats.allocated_bytes[agg].peak;
    m.reserved = stats.reserved_bytes[agg].current;
    m.peak_reserved = stats.reserved_bytes[agg].peak;
    if (reset_peak) alloc::resetPeakStats(device.index());
  }
#else
  (void)device;
  (void)reset_peak;
#endif
  return m;
}

void configure_cuda_for_inference(bool allow_tf32) {
#ifdef SDSERVE_WITH_CUDA
  at::globalContext().setBenchmarkCuDNN(true);
  at::globalContext().setAllowTF32CuDNN(allow_tf32);
  at::globalContext().setAllowTF32CuBLAS(allow_tf32);
#else
  (void)allow_tf32;
#endif
}

void to_channels_last(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters()) {
    if (p.dim() == 4) p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
  }
}

}  // namespace sdserve::pipeline
