// A request's peak memory, estimated from the model's real shapes (its UNet's and VAE's configs),
// and the memory a model's device has for requests. Torch-free.
//
// Without fused attention (the CPU; Debian's torch 1.13 everywhere) attention builds the whole
// score matrix: rows x heads x N x N for N latent tokens at a level, twice at its peak (the
// scaled scores and their softmax are alive together). That term grows with the fourth power of
// the side and decides what fits: SD 1.5 at 2048x2048 has 65,536 tokens at its first level, 17 GB
// per head and row. The rest is bounded from above by simple counts (below), so the estimate is a
// little more than what a call really holds, never much less.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sdserve::pipeline {

class Model;

// What the estimate needs of a model, from its configs (memory_shape()).
struct MemoryShape {
  int vae_scale = 8;  // pixels per latent pixel
  struct Level {
    int channels = 0;      // block_out_channels[i]
    int heads = 0;         // attention heads (0: no attention at this level)
    int layers = 1;        // layers_per_block
    int transformers = 1;  // transformer_layers_per_block
  };
  std::vector<Level> levels;        // the UNet's resolutions, the full latent size first
  int mid_heads = 0;                // the mid block's attention heads (0: none)
  int unet_element_bytes = 4;       // the compute dtype
  int attention_element_bytes = 4;  // float32 where attention is upcast
  bool fused_attention = false;     // no score matrix (CUDA with torch >= 2)
  std::vector<int> vae_channels;    // the VAE's block_out_channels
  bool vae_mid_attention = true;    // one head over every latent pixel
  int vae_element_bytes = 4;
  // Images the VAE decodes at once (Model::decode: chunks on a GPU, one by one on the CPU): a
  // decode of more holds no more than this many at its peak.
  int decode_chunk = 1;
};

struct MemoryEstimate {
  uint64_t unet = 0;            // one UNet call, its attention scores included
  uint64_t unet_attention = 0;  // of which the largest attention's scores (twice: see above)
  uint64_t vae = 0;             // one VAE decode (it runs beside the UNet, on its own thread)
  uint64_t total() const { return unet + vae; }
};

// One UNet call of `unet_rows` rows at width x height (one per image, two with classifier-free
// guidance), plus a VAE decode of `decode_images` (as many at once as decode_chunk allows):
//   UNet = sum over levels of the down path's outputs kept for the up path ((layers + 1) x rows x
//          C x N) + the largest level's working set (16 x rows x C x N: GEGLU's 8C projection,
//          its 4C product, q/k/v, norms, residuals) + twice its attention scores (rows x heads x
//          N x N; 0 with fused attention), and the cross-attention scores (77 x 16 tokens);
//   VAE  = the largest level's working set (4 x images x C x pixels, C the larger of its own and
//          the level above's channels) + twice its mid-block attention (images x N^2).
// Bytes: each tensor's element size from the shape.
MemoryEstimate estimate_memory(const MemoryShape& shape, int width, int height, int unet_rows,
                               int decode_images);

// The model's shape for estimate_memory(), from the configs it loaded and its device.
MemoryShape memory_shape(const Model& model);

// Bytes free for requests on the model's device now: on the CPU the kernel's MemAvailable (capped
// by the cgroup's memory.max less its usage, where one is set); on a GPU the driver's free memory
// plus what torch's cache holds unused. 0 when it cannot be read.
uint64_t available_memory(const Model& model);

// "17.2 GB" (decimal units), for messages.
std::string bytes_text(uint64_t bytes);

}  // namespace sdserve::pipeline
