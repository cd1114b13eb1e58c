// The estimate itself (torch-free: the engine's sanitizer build compiles it); memory_shape.cpp
// reads the shapes from a loaded model.
#include "pipeline/memory.h"

#include <algorithm>
#include <cstdio>

namespace sdserve::pipeline {
namespace {

uint64_t nonneg(int64_t v) {
  return v > 0 ? static_cast<uint64_t>(v) : 0;
}

// A stride-2 convolution with padding 1 halves a side, rounding up.
int64_t halve_side(int64_t n, int times) {
  for (int i = 0; i < times; ++i) n = (n + 1) / 2;
  return n;
}

// Up to 16 chunks of 77 tokens (prompt_syntax a1111): cross-attention keys at most.
constexpr int64_t kMaxCrossTokens = 77 * 16;

}  // namespace

MemoryEstimate estimate_memory(const MemoryShape& s, int width, int height, int unet_rows,
                               int decode_images) {
  MemoryEstimate e;
  const int64_t lh = std::max(1, height / std::max(1, s.vae_scale));
  const int64_t lw = std::max(1, width / std::max(1, s.vae_scale));
  const uint64_t rows = nonneg(unet_rows);
  const uint64_t eb = nonneg(s.unet_element_bytes), ab = nonneg(s.attention_element_bytes);
  uint64_t kept = 0, largest = 0;
  const int n_levels = static_cast<int>(s.levels.size());
  for (int i = 0; i < n_levels; ++i) {
    const auto& level = s.levels[i];
    const uint64_t n = nonneg(halve_side(lh, i) * halve_side(lw, i));
    const uint64_t c = nonneg(level.channels);
    kept += nonneg(level.layers + 1) * rows * c * n * eb;
    uint64_t work = 16 * rows * c * n * eb;
    const int heads = std::max(level.heads, i == n_levels - 1 ? s.mid_heads : 0);
    if (heads > 0) {
      const uint64_t keys = s.fused_attention ? 0 : n + nonneg(kMaxCrossTokens);
      const uint64_t scores = 2 * rows * nonneg(heads) * n * keys * ab;
      if (!s.fused_attention && n > 0)
        e.unet_attention = std::max(e.unet_attention, 2 * rows * nonneg(heads) * n * n * ab);
      work += scores;
    }
    largest = std::max(largest, work);
  }
  e.unet = kept + largest;

  // The VAE's decoder climbs from the latent size, doubling each level after the first.
  const uint64_t images = nonneg(std::min(decode_images, std::max(1, s.decode_chunk)));
  const uint64_t vb = nonneg(s.vae_element_bytes);
  std::vector<int> channels(s.vae_channels.rbegin(), s.vae_channels.rend());
  uint64_t vae = 0;
  for (size_t r = 0; r < channels.size(); ++r) {
    const uint64_t pixels = nonneg(lh << r) * nonneg(lw << r);
    const uint64_t c = nonneg(std::max(channels[r], r > 0 ? channels[r - 1] : channels[r]));
    vae = std::max(vae, 4 * images * c * pixels * vb);
  }
  if (s.vae_mid_attention && !s.fused_attention && !channels.empty()) {
    const uint64_t n = nonneg(lh * lw);
    vae = std::max(vae, 4 * images * nonneg(channels.front()) * n * vb + 2 * images * n * n * vb);
  }
  e.vae = vae;
  return e;
}

std::string bytes_text(uint64_t bytes) {
  char buf[32];
  const double b = static_cast<double>(bytes);
  if (b >= 1e12)
    std::snprintf(buf, sizeof buf, "%.1f TB", b / 1e12);
  else if (b >= 1e9)
    std::snprintf(buf, sizeof buf, "%.1f GB", b / 1e9);
  else
    std::snprintf(buf, sizeof buf, "%.0f MB", b / 1e6);
  return buf;
}

}  // namespace sdserve::pipeline
