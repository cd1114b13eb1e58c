// SD 2.x and SDXL on CUDA: every fixture run in float32 (with CUDA graphs, as the service runs)
// against diffusers' CPU reference, and SDXL in fp16. Named *Cuda*; skipped without a GPU.
#include <gtest/gtest.h>

#include "family_parity.h"

namespace sdserve::pipeline {
namespace {

std::shared_ptr<Model> cuda_family_model(const std::string& family, const std::string& precision) {
  LoadOptions o;
  o.device = "cuda";
  o.precision = precision;
  return Model::load(test::family_dir(family), o);
}

// fp32 on the GPU: TF32 is off for fp32 models and the kernels differ from the CPU's only in
// summation order, so the CPU bound holds with margin; the bound for runs is 1e-3.
constexpr double kCudaFp32Tolerance = 1e-3;
// fp16 weights and activations: ~3 decimal digits per operation over 10-15 evaluations; the
// SD 1.x fp16 test (cuda_test.cpp) uses the same order of bound.
constexpr double kCudaFp16Tolerance = 5e-2;

void check_family_on_cuda(const std::string& family, const std::string& precision,
                          double tolerance) {
  auto model = cuda_family_model(family, precision);
  for (const auto& run : test::family_runs(family)) {
    const auto [latents, image] = test::run_errors(*model, run);
    EXPECT_LE(latents, tolerance) << run.name;
    EXPECT_LE(image, tolerance) << run.name;
    std::cout << "[ parity cuda " << precision << " ] " << family << " " << run.name << ": latents "
              << latents << ", image " << image << "\n";
  }
}

TEST(FamilyCuda, Sd2RunsMatchInFloat32) {
  SKIP_WITHOUT_CUDA();
  check_family_on_cuda("tiny-sd2", "fp32", kCudaFp32Tolerance);
}

TEST(FamilyCuda, SdxlRunsMatchInFloat32) {
  SKIP_WITHOUT_CUDA();
  check_family_on_cuda("tiny-sdxl", "fp32", kCudaFp32Tolerance);
}

TEST(FamilyCuda, SdxlRunsMatchInFloat16) {
  SKIP_WITHOUT_CUDA();
  check_family_on_cuda("tiny-sdxl", "fp16", kCudaFp16Tolerance);
}

TEST(FamilyCuda, SdxlSingleFileMatchesTheFolder) {
  SKIP_WITHOUT_CUDA();
  auto folder = cuda_family_model("tiny-sdxl", "fp32");
  LoadOptions o;
  o.device = "cuda";
  o.precision = "fp32";
  o.single_file_config = test::family_dir("tiny-sdxl");
  auto single = Model::load(test::fixture("tiny-sdxl.safetensors"), o);
  GenerateRequest r;
  r.prompt = "a photo of a cat";
  r.image.width = 96;
  r.image.height = 64;
  r.image.steps = 4;
  r.image.seed = 7;
  EXPECT_EQ(folder->generate(r)[0].pixels, single->generate(r)[0].pixels);
}

}  // namespace
}  // namespace sdserve::pipeline
