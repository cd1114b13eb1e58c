// Original-layout single files of the other families: SDXL's (tiny-sdxl.safetensors, built from
// the folder in the layout diffusers' convert_diffusers_to_original_sdxl.py writes, with CLIP-L and
// OpenCLIP-G inside) gives the same tensors and images as its diffusers folder;
// SD 2.x's OpenCLIP text encoder (cond_stage_model.model.*, built here from the tiny-sd2
// folder's weights, as no SD 2.x single-file fixture exists) converts to the folder's tensors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "family_parity.h"
#include "pipeline/errors.h"
#include "pipeline/io/checkpoint_config.h"
#include "pipeline/io/checkpoint_convert.h"
#include "pipeline/io/model_files.h"
#include "pipeline/io/openclip_convert.h"
#include "pipeline/io/safetensors.h"

namespace sdserve::pipeline {
namespace {

namespace fs = std::filesystem;

std::string sdxl_file() {
  return test::fixture("tiny-sdxl.safetensors");
}

void expect_same_tensors(const WeightSource& a, const WeightSource& b) {
  SCOPED_TRACE(a.component);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, va] : a.tensors) {
    const auto it = b.tensors.find(name);
    ASSERT_NE(it, b.tensors.end()) << "missing " << name;
    EXPECT_EQ(va.shape, it->second.shape) << name;
    EXPECT_TRUE(torch::equal(to_tensor(va), to_tensor(it->second))) << name;
  }
}

TEST(SdxlSingleFile, GivesTheFoldersTensors) {
  const auto folder = open_model_files(test::family_dir("tiny-sdxl"), "");
  const auto single = open_model_files(sdxl_file(), test::model_dir() + "/tokenizer",
                                       test::family_dir("tiny-sdxl"));
  EXPECT_EQ(single.family, "sdxl");
  EXPECT_EQ(single.layout, "single-file");
  EXPECT_TRUE(single.force_zeros_for_empty_prompt);
  expect_same_tensors(folder.unet, single.unet);
  expect_same_tensors(folder.vae, single.vae);
  expect_same_tensors(folder.text_encoder, single.text_encoder);
  expect_same_tensors(folder.text_encoder_2, single.text_encoder_2);
}

TEST(SdxlSingleFile, InfersTheUNetArchitectureFromShapes) {
  auto file = SafetensorsFile::open(sdxl_file());
  const auto inferred = infer_unet_config(*file, /*sd1_heads=*/false);
  const auto folder = open_model_files(test::family_dir("tiny-sdxl"), "").unet_config;
  for (const char* key :
       {"block_out_channels", "down_block_types", "up_block_types", "transformer_layers_per_block",
        "layers_per_block", "in_channels", "cross_attention_dim", "use_linear_projection"})
    EXPECT_EQ(inferred.at(key), folder.at(key)) << key;
  // Without the folder, its 48-wide OpenCLIP encoder (12-wide heads) cannot be inferred.
  try {
    open_model_files(sdxl_file(), test::model_dir() + "/tokenizer");
    ADD_FAILURE() << "expected a ModelError";
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("48 wide"), std::string::npos) << e.what();
  }
}

TEST(SdxlSingleFile, GeneratesTheFoldersImage) {
  LoadOptions o;
  o.device = "cpu";
  o.precision = "fp32";
  o.single_file_config = test::family_dir("tiny-sdxl");
  auto single = Model::load(sdxl_file(), o);
  EXPECT_EQ(single->info().family, "sdxl");
  GenerateRequest r;
  r.prompt = "a photo of a cat";
  r.negative_prompt = "";
  r.image.width = 96;
  r.image.height = 64;
  r.image.steps = 4;
  r.image.seed = 7;
  r.image.guidance_scale = 5;
  EXPECT_EQ(test::family_model("tiny-sdxl")->generate(r)[0].pixels, single->generate(r)[0].pixels);
}

TensorData data(const torch::Tensor& x) {
  const auto c = x.contiguous();
  const auto* b = static_cast<const std::byte*>(c.data_ptr());
  return TensorData{DType::kF32, c.sizes().vec(), std::vector<std::byte>(b, b + c.nbytes())};
}

// The tiny-sd2 text encoder in OpenCLIP's layout, plus one more layer that SD 2.x's conversion
// drops (diffusers keeps all but the last OpenCLIP layer).
void add_openclip_text_encoder(const ModelFiles& folder, std::map<std::string, TensorData>& out) {
  const auto& t = folder.text_encoder.tensors;
  const std::string p = "cond_stage_model.model.";
  auto put = [&](const std::string& name, const std::string& from) {
    out[p + name] = data(to_tensor(t.at(from)));
  };
  put("token_embedding.weight", "embeddings.token_embedding.weight");
  put("positional_embedding", "embeddings.position_embedding.weight");
  put("ln_final.weight", "final_layer_norm.weight");
  put("ln_final.bias", "final_layer_norm.bias");
  const int layers = folder.text_encoder_config.at("num_hidden_layers").get<int>();
  for (int i = 0; i <= layers; ++i) {
    const int from_layer = std::min(i, layers - 1);  // the extra last layer repeats one
    const std::string s = "transformer.resblocks." + std::to_string(i) + ".";
    const std::string l = "encoder.layers." + std::to_string(from_layer) + ".";
    for (const std::string k : {"weight", "bias"}) {
      out[p + s + "attn.in_proj_" + k] =
          data(torch::cat({to_tensor(t.at(l + "self_attn.q_proj." + k)),
                           to_tensor(t.at(l + "self_attn.k_proj." + k)),
                           to_tensor(t.at(l + "self_attn.v_proj." + k))}));
      put(s + "attn.out_proj." + k, l + "self_attn.out_proj." + k);
      put(s + "ln_1." + k, l + "layer_norm1." + k);
      put(s + "ln_2." + k, l + "layer_norm2." + k);
      put(s + "mlp.c_fc." + k, l + "mlp.fc1." + k);
      put(s + "mlp.c_proj." + k, l + "mlp.fc2." + k);
    }
  }
}

std::string sd2_openclip_file(const fs::path& dir) {
  std::map<std::string, TensorData> out;
  add_openclip_text_encoder(open_model_files(test::family_dir("tiny-sd2"), ""), out);
  const std::string path = (dir / "sd2-openclip.safetensors").string();
  write_safetensors(path, out);
  return path;
}

// The whole tiny-sd2 folder as one original-layout SD 2.x file (no such fixture exists):
// the UNet and VAE under the names the converter reads, the text encoder in OpenCLIP's layout.
std::string sd2_single_file(const fs::path& dir) {
  const auto folder = open_model_files(test::family_dir("tiny-sd2"), "");
  std::map<std::string, TensorData> out;
  for (const auto& [target, source] : ldm_unet_names(folder.unet_config))
    out[kLdmUnetPrefix + source] = data(to_tensor(folder.unet.tensors.at(target)));
  for (const auto& [target, source] : ldm_vae_names(folder.vae_config))
    out[kLdmVaePrefix + source] = data(to_tensor(folder.vae.tensors.at(target)));
  add_openclip_text_encoder(folder, out);
  const std::string path = (dir / "sd2.safetensors").string();
  write_safetensors(path, out);
  return path;
}

TEST(Sd2SingleFile, OpenClipTextEncoderConvertsToTheFoldersTensors) {
  const fs::path dir = fs::temp_directory_path() / ("sdserve-sd2-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto file = SafetensorsFile::open(sd2_openclip_file(dir));
  const OpenClipLayout layout{"cond_stage_model.model.", /*drop_last_layer=*/true, false, true};
  const auto config = infer_openclip_config(*file, layout);
  const auto folder = open_model_files(test::family_dir("tiny-sd2"), "");
  for (const char* key : {"hidden_size", "intermediate_size", "num_hidden_layers",
                          "max_position_embeddings", "vocab_size", "hidden_act"})
    EXPECT_EQ(config.at(key), folder.text_encoder_config.at(key)) << key;
  expect_same_tensors(folder.text_encoder, openclip_weights(file, layout, config, "text_encoder"));
  fs::remove_all(dir);
}

TEST(Sd2SingleFile, WholeFileGivesTheFoldersTensorsAndImage) {
  const fs::path dir = fs::temp_directory_path() / ("sdserve-sd2f-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string path = sd2_single_file(dir);
  const auto folder = open_model_files(test::family_dir("tiny-sd2"), "");
  const auto single =
      open_model_files(path, test::model_dir() + "/tokenizer", test::family_dir("tiny-sd2"));
  EXPECT_EQ(single.family, "sd2");
  expect_same_tensors(folder.unet, single.unet);
  expect_same_tensors(folder.vae, single.vae);
  expect_same_tensors(folder.text_encoder, single.text_encoder);
  // Shapes alone: the family's defaults, and its UNet as the folder's config describes it.
  auto file = SafetensorsFile::open(path);
  const auto inferred = infer_unet_config(*file, /*sd1_heads=*/false, /*infer_heads=*/false);
  for (const char* key : {"block_out_channels", "down_block_types", "up_block_types",
                          "layers_per_block", "cross_attention_dim", "use_linear_projection"})
    EXPECT_EQ(inferred.at(key), folder.unet_config.at(key)) << key;
  // The same pixels as the folder.
  LoadOptions o;
  o.device = "cpu";
  o.precision = "fp32";
  o.single_file_config = test::family_dir("tiny-sd2");
  GenerateRequest r;
  r.prompt = "a lighthouse in a storm";
  r.negative_prompt = "text";
  r.image.width = r.image.height = 64;
  r.image.steps = 3;
  r.image.sampler = "ddim";
  EXPECT_EQ(test::family_model("tiny-sd2")->generate(r)[0].pixels,
            Model::load(path, o)->generate(r)[0].pixels);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sdserve::pipeline
