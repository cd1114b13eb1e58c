// pipeline/memory.h: a request's peak memory from the model's shapes, against computed figures
// (SD 1.5's attention at 2048x2048) and against the peak RSS of a real UNet call with the tiny
// model on the CPU.
#include <gtest/gtest.h>

#include <fstream>
#include <iostream>
#include <string>

#include "pipeline/memory.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

namespace sdserve {
namespace {

// SD 1.5's UNet and VAE configs, as memory_shape() reads them (unet/config.json: block_out_channels
// 320, 640, 1280, 1280; attention_head_dim 8 = heads; three CrossAttnDownBlock2D then a
// DownBlock2D; layers_per_block 2; vae block_out_channels 128, 256, 512, 512), in float32.
pipeline::MemoryShape sd15_shape() {
  pipeline::MemoryShape s;
  s.vae_scale = 8;
  s.levels = {{320, 8, 2, 1}, {640, 8, 2, 1}, {1280, 8, 2, 1}, {1280, 0, 2, 1}};
  s.mid_heads = 8;
  s.vae_channels = {128, 256, 512, 512};
  return s;
}

TEST(MemoryEstimate, Sd15At2048IsSeventeenGigabytesPerHeadAndRow) {
  const auto e = pipeline::estimate_memory(sd15_shape(), 2048, 2048, 2, 1);  // one image, CFG
  // 256 x 256 latents: 65,536 tokens at the first level, 65,536^2 float32 scores per head and row
  // (17.2 GB), 8 heads, 2 rows (CFG), twice at the peak (scores and their softmax).
  const uint64_t per_head_and_row = 65536ull * 65536ull * 4ull;
  EXPECT_EQ(per_head_and_row, 17179869184ull);
  EXPECT_EQ(e.unet_attention, 2 * 2 * 8 * per_head_and_row);
  EXPECT_GT(e.unet, e.unet_attention);
  // The VAE's mid-block attention: one head over 65,536 latent pixels, twice.
  EXPECT_GE(e.vae, 2 * per_head_and_row);
  EXPECT_EQ(pipeline::bytes_text(e.unet_attention), "549.8 GB");
  // Images of a size share one call: the estimate grows with its rows.
  const auto batch = pipeline::estimate_memory(sd15_shape(), 2048, 2048, 16, 1);
  EXPECT_EQ(batch.unet_attention, 8 * e.unet_attention);
  // Without guidance an image is one row.
  const auto no_cfg = pipeline::estimate_memory(sd15_shape(), 2048, 2048, 1, 1);
  EXPECT_EQ(2 * no_cfg.unet_attention, e.unet_attention);
}

// A decode holds at most decode_chunk images at its peak (one at a time on the CPU).
TEST(MemoryEstimate, DecodeOfSeveralImagesHoldsOneChunk) {
  auto s = sd15_shape();
  s.decode_chunk = 1;
  const auto one = pipeline::estimate_memory(s, 512, 512, 2, 1);
  EXPECT_EQ(pipeline::estimate_memory(s, 512, 512, 2, 4).vae, one.vae);
  s.decode_chunk = 8;
  EXPECT_EQ(pipeline::estimate_memory(s, 512, 512, 2, 4).vae, 4 * one.vae);
  EXPECT_EQ(pipeline::estimate_memory(s, 512, 512, 2, 16).vae, 8 * one.vae);
}

TEST(MemoryEstimate, Sd15At512IsAFewGigabytesAndFusedAttentionDropsTheScores) {
  const auto e = pipeline::estimate_memory(sd15_shape(), 512, 512, 2, 1);
  // 4,096 tokens: 2 rows x 8 heads x 4096^2 x 4 B = 1.07 GB of scores, twice.
  EXPECT_EQ(e.unet_attention, 2ull * 2 * 8 * 4096 * 4096 * 4);
  EXPECT_LT(e.total(), 6'000'000'000ull);
  auto fused = sd15_shape();
  fused.fused_attention = true;
  fused.unet_element_bytes = fused.attention_element_bytes = 2;  // fp16 on CUDA
  const auto f = pipeline::estimate_memory(fused, 512, 512, 2, 1);
  EXPECT_EQ(f.unet_attention, 0u);
  EXPECT_LT(f.unet, e.unet / 4);
}

TEST(MemoryEstimate, ShapeComesFromTheModelsConfigs) {
  const auto model = pipeline::Model::load(test::model_dir());
  const auto s = pipeline::memory_shape(*model);
  // models/tiny-sd15/unet/config.json: block_out_channels 32, 64, 64; attention_head_dim 8;
  // CrossAttnDownBlock2D x2 then DownBlock2D; layers_per_block 2. vae: 32, 32, 64, 64.
  ASSERT_EQ(s.levels.size(), 3u);
  EXPECT_EQ(s.levels[0].channels, 32);
  EXPECT_EQ(s.levels[0].heads, 8);
  EXPECT_EQ(s.levels[1].heads, 8);
  EXPECT_EQ(s.levels[2].heads, 0);
  EXPECT_EQ(s.levels[0].layers, 2);
  EXPECT_EQ(s.mid_heads, 8);
  EXPECT_EQ(s.vae_scale, 8);
  EXPECT_EQ(s.vae_channels, (std::vector<int>{32, 32, 64, 64}));
  EXPECT_FALSE(s.fused_attention);  // the CPU
  EXPECT_EQ(s.unet_element_bytes, 4);
  EXPECT_EQ(s.decode_chunk, 1);  // the CPU decodes one image at a time
  EXPECT_GT(pipeline::available_memory(*model), 0u);
}

uint64_t status_kb(const std::string& key) {  // "VmHWM" from /proc/self/status
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) return std::stoull(line.substr(key.size() + 1)) * 1024;
  return 0;
}

// One real UNet call (two rows: CFG) at 512x512 with the tiny model: its attention is the peak
// (4,096 tokens, 8 heads: 1.07 GB of scores, twice), and the estimate must cover the measured
// rise of the process's peak RSS without overstating it by more than half.
TEST(MemoryEstimate, CoversTheMeasuredPeakOfAUNetCall) {
  const auto model = pipeline::Model::load(test::model_dir());
  const auto cond = model->encode_text("a cat");
  const auto uncond = model->encode_text("");
  pipeline::ImageSpec spec;
  spec.width = spec.height = 512;
  spec.steps = 2;
  auto run = model->begin(spec, cond, uncond);
  // Reset the peak (VmHWM) to the current RSS: Linux's clear_refs "5".
  {
    std::ofstream reset("/proc/self/clear_refs");
    reset << "5";
    if (!reset) GTEST_SKIP() << "cannot reset VmHWM here";
  }
  const uint64_t before = status_kb("VmRSS");
  if (status_kb("VmHWM") > before + (64 << 20)) GTEST_SKIP() << "VmHWM was not reset";
  model->step({run.get()});
  const uint64_t rise = status_kb("VmHWM") - before;
  const auto e = pipeline::estimate_memory(pipeline::memory_shape(*model), 512, 512, 2, 1);
  std::cout << "measured peak rise " << pipeline::bytes_text(rise) << ", estimated UNet call "
            << pipeline::bytes_text(e.unet) << " (attention "
            << pipeline::bytes_text(e.unet_attention) << ")\n";
  EXPECT_GE(e.unet, rise);
  EXPECT_LE(e.unet, rise + rise / 2);
}

}  // namespace
}  // namespace sdserve
