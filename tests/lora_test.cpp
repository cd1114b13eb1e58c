// LoRA files: format detection, the refused formats by name, hostile and broken files, names
// (kohya's sgm layout), Model::check_loras, and the runtime's two forms against each other on
// every adaptable module.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pipeline/bench_support.h"
#include "pipeline/errors.h"
#include "pipeline/io/lora_convert.h"
#include "pipeline/lora.h"
#include "pipeline/lora_impl.h"
#include "pipeline/model_impl.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

namespace sdserve::pipeline {
// Named, not anonymous: the unity build joins test files.
namespace lora_format_test {

namespace fs = std::filesystem;
using lora_names::Component;

std::string lora_fixture(const std::string& name) {
  return test::fixture("lora/" + name + ".safetensors");
}

// A scratch folder for this process's files.
const fs::path& scratch() {
  static const fs::path dir = [] {
    auto d = fs::temp_directory_path() / ("sdserve-lora-test-" + std::to_string(::getpid()));
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

// A safetensors file of float tensors (float32, or as `dtypes` says) and metadata.
std::string write_file(const std::string& name, const std::map<std::string, torch::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& [key, value] : tensors) {
    auto t = value.contiguous();
    std::string dtype = "F32";
    if (t.scalar_type() == torch::kFloat16) dtype = "F16";
    if (t.scalar_type() == torch::kInt32) dtype = "I32";
    if (t.scalar_type() == torch::kFloat64) t = t.to(torch::kFloat32);
    const auto begin = data.size();
    data.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
    header[key] = {
        {"dtype", dtype}, {"shape", t.sizes().vec()}, {"data_offsets", {begin, data.size()}}};
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const auto path = (scratch() / name).string();
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = text.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << text << data;
  return path;
}

// The message of the ModelError that loading `path` throws ("" when it loads).
std::string load_error(const std::string& path) {
  try {
    Lora::load(path);
  } catch (const ModelError& e) {
    return e.what();
  }
  return "";
}

torch::Tensor rnd(std::vector<int64_t> shape) {
  return torch::randn(shape, torch::TensorOptions().dtype(torch::kFloat32));
}

const std::shared_ptr<Model>& model(const std::string& family, const std::string& mode = "auto") {
  static std::map<std::string, std::shared_ptr<Model>> loaded;
  auto& m = loaded[family + mode];
  if (!m) {
    LoadOptions o;
    o.device = "cpu";
    o.precision = "fp32";
    o.lora_mode = mode;
    m = Model::load(family == "sd15" ? test::model_dir() : test::family_dir("tiny-" + family), o);
  }
  return m;
}

const Lora::Impl::Adapter* adapter(const Lora& lora, Component c, const std::string& module) {
  for (const auto& a : lora.impl().adapters)
    if (a.component == c && a.module == module) return &a;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
TEST(LoraFormat, ReadsTheKohyaFixture) {
  const auto lora = Lora::load(lora_fixture("tiny-sd15-kohya"));
  const auto& info = lora->info();
  EXPECT_EQ(info.name, "tiny-sd15-kohya");
  EXPECT_EQ(info.format, "kohya");
  EXPECT_EQ(info.family, "");  // the tiny model's widths name no family
  EXPECT_TRUE(info.unet);
  EXPECT_TRUE(info.text_encoder);
  EXPECT_TRUE(info.locon);
  EXPECT_EQ(info.rank, 4);
  EXPECT_EQ(info.bytes, fs::file_size(lora_fixture("tiny-sd15-kohya")));
  // alpha 2: scale 0.5 at rank 4, 1 for the rank-2 LoCon convolutions.
  const auto* attn = adapter(*lora, Component::kUnet,
                             "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q");
  ASSERT_NE(attn, nullptr);
  EXPECT_TRUE(attn->kohya);
  EXPECT_DOUBLE_EQ(attn->scale, 0.5);
  EXPECT_EQ(attn->down.scalar_type(), torch::kFloat16);  // kept in the file's dtype
  const auto* conv = adapter(*lora, Component::kUnet, "down_blocks_0_resnets_0_conv1");
  ASSERT_NE(conv, nullptr);
  EXPECT_EQ(conv->down.sizes().vec(), (std::vector<int64_t>{2, 32, 3, 3}));
  EXPECT_DOUBLE_EQ(conv->scale, 1.0);
  EXPECT_NE(adapter(*lora, Component::kTextEncoder, "text_model_encoder_layers_0_mlp_fc1"),
            nullptr);
}

TEST(LoraFormat, ReadsPeftNamesAndTheirMetadata) {
  const auto lora = Lora::load(lora_fixture("tiny-sd15-peft"));
  EXPECT_EQ(lora->info().format, "diffusers");
  // LoraConfig metadata: lora_alpha 8, r 4 (scale 2); rank_pattern gives a conv rank 2 (scale 4).
  const auto* q = adapter(*lora, Component::kUnet,
                          "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q");
  ASSERT_NE(q, nullptr);
  EXPECT_DOUBLE_EQ(q->scale, 2.0);
  const auto* conv = adapter(*lora, Component::kUnet, "down_blocks.0.resnets.0.conv1");
  ASSERT_NE(conv, nullptr);
  EXPECT_DOUBLE_EQ(conv->scale, 4.0);
  // Text encoders: our module names, without transformers' "text_model.".
  EXPECT_NE(adapter(*lora, Component::kTextEncoder, "encoder.layers.0.self_attn.q_proj"), nullptr);
}

TEST(LoraFormat, ReadsDiffusersOlderNames) {
  const auto lora = Lora::load(lora_fixture("tiny-sd15-diffusers-old"));
  EXPECT_EQ(lora->info().format, "diffusers");
  // Attention processors' to_q_lora / to_out_lora, LoRACompatible layers' .lora.down, the text
  // encoder's to_q_lora and lora_linear_layer; no alphas: scale 1.
  for (const char* m : {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
                        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"}) {
    const auto* a = adapter(*lora, Component::kUnet, m);
    ASSERT_NE(a, nullptr) << m;
    EXPECT_DOUBLE_EQ(a->scale, 1.0);
  }
  EXPECT_NE(adapter(*lora, Component::kTextEncoder, "encoder.layers.0.self_attn.out_proj"),
            nullptr);
  EXPECT_NE(adapter(*lora, Component::kTextEncoder, "encoder.layers.0.mlp.fc1"), nullptr);
}

TEST(LoraFormat, SdxlFilesAreSdxl) {
  for (const char* name : {"tiny-sdxl-kohya", "tiny-sdxl-peft"}) {
    const auto lora = Lora::load(lora_fixture(name));
    EXPECT_EQ(lora->info().family, "sdxl") << name;
  }
  // Published widths name the family: cross-attention 768 (SD 1.x), 1024 (SD 2.x), 2048 (SDXL).
  for (const auto& [width, family] :
       {std::pair{768, "sd1"}, std::pair{1024, "sd2"}, std::pair{2048, "sdxl"}}) {
    const std::string key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k";
    const auto path = write_file("width.safetensors", {{key + ".lora_down.weight", rnd({4, width})},
                                                       {key + ".lora_up.weight", rnd({640, 4})}});
    EXPECT_EQ(Lora::load(path)->info().family, family);
  }
}

TEST(LoraFormat, RefusesFormatsThatAreNotLoraByName) {
  const std::string m = "lora_unet_down_blocks_0_attentions_0_proj_in";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {m + ".hada_w1_a", "LoHa"},
      {m + ".lokr_w1", "LoKr"},
      {m + ".dora_scale", "DoRA"},
      {"unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "DoRA"},
      {m + ".on_input", "(IA)^3"},
      {m + ".a1.weight", "GLoRA"},
      {m + ".diff", "full weight difference"},
      {m + ".lora_mid.weight", "Tucker"},
      {"unet.down_blocks.0.attentions.0.proj_in.lora_B.bias", "bias"},
  };
  for (const auto& [key, name] : cases) {
    const auto path = write_file("refused.safetensors", {{m + ".lora_down.weight", rnd({4, 32})},
                                                         {m + ".lora_up.weight", rnd({32, 4})},
                                                         {key, rnd({4})}});
    const auto error = load_error(path);
    EXPECT_NE(error.find(name), std::string::npos) << key << ": " << error;
    EXPECT_NE(error.find("not support"), std::string::npos) << error;
  }
  // PEFT's LoraConfig saying DoRA.
  const auto path =
      write_file("dora.safetensors",
                 {{"unet.conv_in.lora_A.weight", rnd({4, 4, 3, 3})},
                  {"unet.conv_in.lora_B.weight", rnd({32, 4, 1, 1})}},
                 {{"lora_adapter_metadata", R"({"unet.r": 4, "unet.use_dora": true})"}});
  EXPECT_NE(load_error(path).find("DoRA"), std::string::npos) << load_error(path);
}

TEST(LoraFormat, RefusesPickles) {
  for (const char* name : {"lora.pt", "lora.ckpt", "lora.bin"}) {
    const auto path = (scratch() / name).string();
    std::ofstream(path) << "anything";
    EXPECT_NE(load_error(path).find("pickle"), std::string::npos) << name;
  }
  // torch.save's zip archive under a .safetensors name.
  const auto path = (scratch() / "zip.safetensors").string();
  std::ofstream(path, std::ios::binary) << std::string("PK\x03\x04", 4) << std::string(100, 'x');
  EXPECT_NE(load_error(path).find("pickle"), std::string::npos) << load_error(path);
}

TEST(LoraFormat, RefusesBrokenFiles) {
  const std::string m = "lora_unet_down_blocks_0_attentions_0_proj_in";
  const auto expect = [](const std::string& path, const std::string& words) {
    const auto error = load_error(path);
    EXPECT_NE(error.find(words), std::string::npos) << "want '" << words << "', got: " << error;
  };
  // Truncated: the fixture's first half.
  {
    std::ifstream in(lora_fixture("tiny-sd15-kohya"), std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto path = (scratch() / "truncated.safetensors").string();
    std::ofstream(path, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
    EXPECT_FALSE(load_error(path).empty());
    std::ofstream(path, std::ios::binary) << "";
    EXPECT_FALSE(load_error(path).empty());
  }
  expect((scratch() / "missing.safetensors").string(), "no such file");
  expect(scratch().string(), "folder");
  expect(write_file("empty.safetensors", {}), "no LoRA adapters");
  expect(write_file("unknown.safetensors", {{"model.diffusion_model.out.2.weight", rnd({4, 4})}}),
         "model.diffusion_model.out.2.weight");
  expect(write_file("pairs.safetensors", {{m + ".lora_down.weight", rnd({4, 32})},
                                          {m + ".lora_up.weight", rnd({32, 3})}}),
         "do not pair");
  expect(write_file("lonely.safetensors", {{m + ".lora_down.weight", rnd({4, 32})}}),
         "lacks its up");
  expect(write_file("conv-up.safetensors", {{m + ".lora_down.weight", rnd({4, 32, 3, 3})},
                                            {m + ".lora_up.weight", rnd({32, 4, 3, 3})}}),
         "do not pair");
  auto nan = rnd({32, 4});
  nan[3][1] = std::nan("");
  expect(write_file("nan.safetensors",
                    {{m + ".lora_down.weight", rnd({4, 32})}, {m + ".lora_up.weight", nan}}),
         "not finite");
  expect(write_file("alpha.safetensors", {{m + ".lora_down.weight", rnd({4, 32})},
                                          {m + ".lora_up.weight", rnd({32, 4})},
                                          {m + ".alpha", rnd({2})}}),
         "not one number");
  expect(
      write_file("int.safetensors", {{m + ".lora_down.weight", torch::ones({4, 32}, torch::kInt32)},
                                     {m + ".lora_up.weight", rnd({32, 4})}}),
      "floating point");
  expect(write_file("mixed.safetensors", {{m + ".lora_down.weight", rnd({4, 32})},
                                          {m + ".lora_up.weight", rnd({32, 4})},
                                          {"unet.conv_in.lora_A.weight", rnd({4, 4, 3, 3})},
                                          {"unet.conv_in.lora_B.weight", rnd({32, 4, 1, 1})}}),
         "mixes");
  expect(write_file("twice.safetensors", {{"unet.conv_in.lora_A.weight", rnd({4, 4, 3, 3})},
                                          {"unet.conv_in.lora.down.weight", rnd({4, 4, 3, 3})},
                                          {"unet.conv_in.lora_B.weight", rnd({32, 4, 1, 1})}}),
         "twice");
  expect(write_file("meta.safetensors",
                    {{"unet.conv_in.lora_A.weight", rnd({4, 4, 3, 3})},
                     {"unet.conv_in.lora_B.weight", rnd({32, 4, 1, 1})}},
                    {{"lora_adapter_metadata", R"({"unet.r": 8, "unet.lora_alpha": 8})"}}),
         "rank 8");
  expect(write_file("badmeta.safetensors",
                    {{"unet.conv_in.lora_A.weight", rnd({4, 4, 3, 3})},
                     {"unet.conv_in.lora_B.weight", rnd({32, 4, 1, 1})}},
                    {{"lora_adapter_metadata", "{not json"}}),
         "not valid JSON");
}

// ---------------------------------------------------------------------------------------------
std::vector<std::string> unet_module_names(const Model& m) {
  std::vector<std::string> names;
  for (const auto& item : m.impl().unet->named_modules("", false)) names.push_back(item.key());
  return names;
}

TEST(LoraNames, SgmLayoutOfTheTinySdxl) {
  const auto names = unet_module_names(*model("sdxl"));
  // Two resnets per down block, each level but the last downsampling; up blocks of three.
  const std::vector<std::pair<std::string, std::string>> want = {
      {"conv_in", "input_blocks.0.0"},
      {"down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"},
      {"down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"},
      {"down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"},
      {"down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"},
      {"down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"},
      {"down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_out.0",
       "input_blocks.8.1.transformer_blocks.1.attn2.to_out.0"},
      {"mid_block.resnets.0.conv2", "middle_block.0.out_layers.3"},
      {"mid_block.attentions.0.proj_out", "middle_block.1.proj_out"},
      {"mid_block.resnets.1.conv1", "middle_block.2.in_layers.2"},
      {"up_blocks.0.resnets.2.conv1", "output_blocks.2.0.in_layers.2"},
      {"up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"},
      {"up_blocks.1.attentions.0.proj_in", "output_blocks.3.1.proj_in"},
      {"up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"},
      {"time_embedding.linear_2", "time_embed.2"},
      {"add_embedding.linear_1", "label_emb.0.0"},
      {"conv_out", "out.2"},
      {"down_blocks.0.resnets.0.norm1", ""},  // not an adaptable module in kohya's layout
  };
  for (const auto& [ours, sgm] : want) EXPECT_EQ(lora_names::sgm_unet_name(ours, names), sgm);
  // SD 1.x's UpBlock2D (no attention) upsamples at index 1.
  EXPECT_EQ(
      lora_names::sgm_unet_name("up_blocks.0.upsamplers.0.conv", unet_module_names(*model("sd15"))),
      "output_blocks.2.1.conv");
}

TEST(LoraNames, KohyaSpellingsOfTextEncoders) {
  const auto names = lora_names::kohya_module_names(
      Component::kTextEncoder2, {"encoder.layers.0.self_attn.q_proj", "text_projection"});
  EXPECT_EQ(names.at("text_model_encoder_layers_0_self_attn_q_proj"),
            "encoder.layers.0.self_attn.q_proj");
  EXPECT_EQ(names.at("text_projection"), "text_projection");
}

// ---------------------------------------------------------------------------------------------
std::string check_error(const Model& m, const std::vector<LoraUse>& uses) {
  try {
    m.check_loras(uses);
  } catch (const RequestError& e) {
    EXPECT_EQ(e.field(), "loras");
    return e.what();
  }
  return "";
}

TEST(LoraCheck, SaysWhyALoraDoesNotFit) {
  const auto& sd15 = *model("sd15");
  const auto& sdxl = *model("sdxl");
  const auto kohya = Lora::load(lora_fixture("tiny-sd15-kohya"));
  const auto xl = Lora::load(lora_fixture("tiny-sdxl-kohya"));
  EXPECT_EQ(check_error(sd15, {{kohya}}), "");
  EXPECT_EQ(check_error(sdxl, {{xl, 0.5, 1.0}}), "");
  auto error = check_error(sd15, {{xl}});
  EXPECT_NE(error.find("Stable Diffusion XL"), std::string::npos) << error;
  EXPECT_NE(error.find("tiny-sdxl-kohya"), std::string::npos) << error;
  // An SD 1.x-shaped LoRA on the tiny SDXL: names it lacks (its blocks differ).
  error = check_error(sdxl, {{kohya}});
  EXPECT_NE(error.find("does not have"), std::string::npos) << error;
  // A module the model lacks.
  const std::string missing = "lora_unet_down_blocks_7_attentions_0_proj_in";
  const auto no_module =
      Lora::load(write_file("nomodule.safetensors", {{missing + ".lora_down.weight", rnd({4, 32})},
                                                     {missing + ".lora_up.weight", rnd({32, 4})}}));
  error = check_error(sd15, {{no_module}});
  EXPECT_NE(error.find("down_blocks_7_attentions_0_proj_in"), std::string::npos) << error;
  // A shape that differs: proj_in is 32 wide in the tiny SD 1.x.
  const std::string proj = "lora_unet_down_blocks_0_attentions_0_proj_in";
  const auto wide =
      Lora::load(write_file("wide.safetensors", {{proj + ".lora_down.weight", rnd({4, 320, 1, 1})},
                                                 {proj + ".lora_up.weight", rnd({320, 4, 1, 1})}}));
  error = check_error(sd15, {{wide}});
  EXPECT_NE(error.find("weight there is [32, 32, 1, 1]"), std::string::npos) << error;
  // A second text encoder on a model with one.
  const std::string te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";
  const auto two =
      Lora::load(write_file("te2.safetensors", {{te2 + ".lora_down.weight", rnd({4, 32})},
                                                {te2 + ".lora_up.weight", rnd({32, 4})}}));
  // (The file names a second encoder, so it says SDXL first.)
  EXPECT_NE(check_error(sd15, {{two}}).find("Stable Diffusion XL"), std::string::npos);
  EXPECT_NE(check_error(sd15, {{nullptr}}).find("missing"), std::string::npos);
  EXPECT_NE(check_error(sd15, {{kohya, std::nan(""), 1.0}}).find("finite"), std::string::npos);
  // begin() refuses it before any step() another image shares.
  ImageSpec spec;
  spec.width = spec.height = 64;
  spec.steps = 2;
  spec.loras = {{wide}};
  const auto cond = sd15.encode_text("x");
  try {
    sd15.begin(spec, cond, cond);
    FAIL() << "a LoRA that does not fit";
  } catch (const RequestError& e) {
    EXPECT_EQ(e.field(), "loras");
  }
}

// ---------------------------------------------------------------------------------------------
// A LoRA (diffusers' names) with seeded factors on every module a LoRA may adapt: its Linear and
// Conv2d modules, 3x3 convolutions with 3x3 down factors.
std::string every_module_lora(const Model& m, const std::string& name) {
  torch::manual_seed(7);
  std::map<std::string, torch::Tensor> tensors;
  const auto add = [&](const std::string& prefix, torch::nn::Module& root) {
    for (const auto& item : root.named_modules("", false)) {
      torch::Tensor w;
      if (const auto* l = item.value()->as<torch::nn::LinearImpl>()) w = l->weight;
      if (const auto* c = item.value()->as<torch::nn::Conv2dImpl>()) w = c->weight;
      if (!w.defined()) continue;
      auto down_shape = w.sizes().vec();
      down_shape[0] = 2;
      std::vector<int64_t> up_shape = {w.size(0), 2};
      if (w.dim() == 4) up_shape.insert(up_shape.end(), {1, 1});
      const int64_t fan_in = w[0].numel();
      tensors[prefix + item.key() + ".lora_A.weight"] = rnd(down_shape) / std::sqrt(fan_in);
      tensors[prefix + item.key() + ".lora_B.weight"] =
          rnd(up_shape) * w.std().item<double>() * 0.3;
    }
  };
  auto& impl = m.impl();
  add("unet.", *impl.unet);
  add("text_encoder.text_model.", *impl.text_encoder);
  if (impl.text_encoder_2) add("text_encoder_2.text_model.", *impl.text_encoder_2);
  // text_projection sits beside text_model in transformers' names.
  std::map<std::string, torch::Tensor> fixed;
  for (auto& [k, v] : tensors) {
    auto key = k;
    const std::string wrong = "text_model.text_projection";
    if (const auto at = key.find(wrong); at != std::string::npos)
      key.replace(at, wrong.size(), "text_projection");
    fixed[key] = v;
  }
  return write_file(name, fixed);
}

// One UNet call's output with `loras` on every row (CFG on: two rows an image).
torch::Tensor first_step(const Model& m, const std::vector<LoraUse>& loras, uint64_t seed = 3) {
  ImageSpec spec;
  spec.width = spec.height = 64;
  spec.steps = 4;
  spec.seed = seed;
  spec.loras = loras;
  const auto cond = m.encode_text("a photo of a cat");
  const auto uncond = m.encode_text("", 1, TextRole::kNegative);
  auto t = m.begin(spec, cond, uncond);
  m.step({t.get()});
  return t->state().latent.clone();
}

TEST(LoraRuntime, PerRowAndMergedAgreeOnEveryModule) {
  for (const std::string family : {"sd15", "sdxl"}) {
    auto& m = *model(family);
    auto& impl = m.impl();
    const auto lora = Lora::load(every_module_lora(m, "every-" + family + ".safetensors"));
    EXPECT_EQ(static_cast<size_t>(lora->info().adapters), impl.lora_targets.size()) << family;
    const std::vector<LoraUse> uses = {{lora, 0.8, 0.6}};
    const auto base = first_step(m, {});
    impl.lora_mode = LoraMode::kPerRow;
    const auto per_row = first_step(m, uses);
    const auto text_per_row =
        m.encode_text("a photo of a cat", 1, TextRole::kPrompt, PromptSyntax::kA1111, uses);
    impl.lora_mode = LoraMode::kMerged;
    const auto merged = first_step(m, uses);
    const auto text_merged =
        m.encode_text("a photo of a cat", 1, TextRole::kPrompt, PromptSyntax::kA1111, uses);
    impl.lora_mode = LoraMode::kAuto;
    // A module without a hook would add its delta merged only: the two differ by the delta.
    const double change = test::rel_diff(per_row, base);
    const double err = test::rel_diff(per_row, merged);
    EXPECT_GT(change, 1e-2) << family;
    EXPECT_LT(err, 1e-5) << family << " (change " << change << ")";
    const auto plain = m.encode_text("a photo of a cat");
    EXPECT_GT(test::rel_diff(text_per_row->hidden(), plain->hidden()), 1e-2) << family;
    EXPECT_LT(test::rel_diff(text_per_row->hidden(), text_merged->hidden()), 1e-5) << family;
    if (plain->pooled().defined()) {
      EXPECT_GT(test::rel_diff(text_per_row->pooled(), plain->pooled()), 1e-2) << family;
      EXPECT_LT(test::rel_diff(text_per_row->pooled(), text_merged->pooled()), 1e-5) << family;
    }
    std::cout << "[ lora ] " << family << ": every module, per row vs merged " << err
              << " (the LoRA changes the step by " << change << ")\n";
  }
}

TEST(LoraRuntime, MergedWeightsAreRestoredExactly) {
  auto& m = *model("sd15", "merged");
  auto& impl = m.impl();
  std::vector<torch::Tensor> before;
  for (const auto& p : impl.unet->parameters()) before.push_back(p.clone());
  for (const auto& p : impl.text_encoder->parameters()) before.push_back(p.clone());
  const auto lora = Lora::load(lora_fixture("tiny-sd15-kohya"));
  const auto base = first_step(m, {});
  first_step(m, {{lora, 0.7, 0.7}});
  m.encode_text("x", 1, TextRole::kPrompt, PromptSyntax::kA1111, {{lora, 0.7, 0.7}});
  EXPECT_FALSE(impl.unet_merged.key().empty());
  // A call without LoRAs restores: the weights are the originals, bit for bit.
  const auto again = first_step(m, {});
  m.encode_text("x");
  EXPECT_TRUE(impl.unet_merged.key().empty());
  size_t i = 0;
  for (const auto& p : impl.unet->parameters()) EXPECT_TRUE(torch::equal(p, before[i++]));
  for (const auto& p : impl.text_encoder->parameters()) EXPECT_TRUE(torch::equal(p, before[i++]));
  EXPECT_TRUE(torch::equal(base, again));
}

TEST(LoraRuntime, TheCacheIsBounded) {
  LoadOptions o;
  o.device = "cpu";
  o.precision = "fp32";
  o.lora_cache_mb = 0;  // keeps only the LoRA last used
  const auto m = Model::load(test::model_dir(), o);
  const auto a = Lora::load(lora_fixture("tiny-sd15-kohya"));
  const auto b = Lora::load(lora_fixture("tiny-sd15-peft"));
  m->encode_text("x", 1, TextRole::kPrompt, PromptSyntax::kA1111, {{a}});
  m->encode_text("x", 1, TextRole::kPrompt, PromptSyntax::kA1111, {{b}});
  EXPECT_EQ(m->impl().lora_cache->entries(), 1u);
  // With room, both stay; a LoRA no one holds goes at the next bind.
  o.lora_cache_mb = 64;
  const auto roomy = Model::load(test::model_dir(), o);
  auto c = Lora::load(lora_fixture("tiny-sd15-kohya"));
  roomy->check_loras({{c}});  // checks only: nothing bound
  EXPECT_EQ(roomy->impl().lora_cache->entries(), 0u);
  roomy->encode_text("x", 1, TextRole::kPrompt, PromptSyntax::kA1111, {{c}});
  roomy->encode_text("x", 1, TextRole::kPrompt, PromptSyntax::kA1111, {{b}});
  EXPECT_EQ(roomy->impl().lora_cache->entries(), 2u);
  c.reset();
  roomy->encode_text("x", 1, TextRole::kPrompt, PromptSyntax::kA1111, {{a}});
  EXPECT_EQ(roomy->impl().lora_cache->entries(), 2u);  // c's entry went, a's came
}

// generate() takes request.image.loras for both sides: the UNet at unet_weight, the prompts'
// text encoders at te_weight; the same as the step-level API given them.
TEST(LoraRuntime, GenerateUsesBothSides) {
  const auto& m = *model("sd15");
  const auto lora = Lora::load(lora_fixture("tiny-sd15-kohya"));
  GenerateRequest req;
  req.prompt = "a photo of a cat";
  req.image.width = req.image.height = 64;
  req.image.steps = 3;
  req.image.seed = 5;
  req.image.loras = {{lora, 0.8, 0.5}};
  const auto image = m.generate(req).front();
  const auto& uses = req.image.loras;
  const auto cond = m.encode_text(req.prompt, 1, TextRole::kPrompt, req.prompt_syntax, uses);
  const auto uncond = m.encode_text("", 1, TextRole::kNegative, req.prompt_syntax, uses);
  auto t = m.begin(req.image, cond, uncond);
  while (!t->done()) m.step({t.get()});
  EXPECT_EQ(m.decode({t.get()}).front().pixels, image.pixels);
  // Without the text side the image differs: generate() did use it.
  const auto plain_cond = m.encode_text(req.prompt);
  const auto plain_uncond = m.encode_text("", 1, TextRole::kNegative);
  auto u = m.begin(req.image, plain_cond, plain_uncond);
  while (!u->done()) m.step({u.get()});
  EXPECT_NE(m.decode({u.get()}).front().pixels, image.pixels);
}

TEST(LoraRuntime, ModesAreNamed) {
  EXPECT_EQ(parse_lora_mode("per-row"), LoraMode::kPerRow);
  EXPECT_EQ(parse_lora_mode("merged"), LoraMode::kMerged);
  EXPECT_EQ(lora_mode_name(LoraMode::kAuto), "auto");
  EXPECT_THROW(parse_lora_mode("fused"), ModelError);
  LoadOptions o;
  o.device = "cpu";
  o.lora_mode = "sometimes";
  EXPECT_THROW(Model::load(test::model_dir(), o), ModelError);
}

// ---------------------------------------------------------------------------------------------
// Not a test (nothing is asserted): one UNet step's time without LoRAs, with LoRAs per row and
// merged, the configurations interleaved in one process so that a shared machine's drift hits
// each alike. By hand, e.g. on the bench's random SD 1.5 (sdserve bench writes it):
//   SDSERVE_LORA_BENCH_MODEL=/tmp/sdserve-bench/sd15-random SDSERVE_LORA_BENCH_SIZE=128
//     ./build/tests/unit_tests --gtest_also_run_disabled_tests --gtest_filter='*LoraCpuTimings*'
// Also SDSERVE_LORA_BENCH_BATCH (images, default 4), _RANK (16), _REPEATS (5), _DEVICE (cpu).
TEST(LoraBench, DISABLED_LoraCpuTimings) {
  const auto env = [](const char* name, const std::string& fallback) {
    const char* v = std::getenv(name);
    return v ? std::string(v) : fallback;
  };
  LoadOptions o;
  o.device = env("SDSERVE_LORA_BENCH_DEVICE", "cpu");
  const auto m = Model::load(env("SDSERVE_LORA_BENCH_MODEL", test::model_dir()), o);
  auto& impl = m->impl();
  const int size = std::stoi(env("SDSERVE_LORA_BENCH_SIZE", "64"));
  const int images = std::stoi(env("SDSERVE_LORA_BENCH_BATCH", "4"));
  const int rank = std::stoi(env("SDSERVE_LORA_BENCH_RANK", "16"));
  const int repeats = std::stoi(env("SDSERVE_LORA_BENCH_REPEATS", "5"));
  std::vector<std::shared_ptr<const Lora>> loras;
  for (const auto& path :
       bench_support::write_random_loras(*m, (scratch() / "bench-loras").string(), images, rank, 0))
    loras.push_back(Lora::load(path));
  const auto cond = m->encode_text("a photograph of an astronaut riding a horse");
  const auto uncond = m->encode_text("", 1, TextRole::kNegative);
  struct Config {
    std::string name;
    LoraMode mode;
    bool distinct;  // image k with LoRA k; else all with LoRA 0 (none: no LoRA)
    bool none;
    std::vector<std::unique_ptr<Trajectory>> owned;
    std::vector<Trajectory*> batch;
    std::vector<double> ms, first_ms;  // steady steps; steps right after another configuration
  };
  std::vector<Config> configs;
  configs.push_back({"no LoRA", LoraMode::kAuto, false, true, {}, {}, {}, {}});
  configs.push_back({"per-row, a LoRA per image", LoraMode::kPerRow, true, false, {}, {}, {}, {}});
  configs.push_back({"merged, a LoRA per image (a call per LoRA)",
                     LoraMode::kMerged,
                     true,
                     false,
                     {},
                     {},
                     {},
                     {}});
  configs.push_back({"per-row, one LoRA for all", LoraMode::kPerRow, false, false, {}, {}, {}, {}});
  configs.push_back({"merged, one LoRA for all", LoraMode::kMerged, false, false, {}, {}, {}, {}});
  for (auto& c : configs)
    for (int k = 0; k < images; ++k) {
      ImageSpec spec;
      spec.width = spec.height = size;
      spec.steps = 2 * repeats + 5;
      spec.seed = k;
      if (!c.none) spec.loras = {{loras[c.distinct ? k : 0], 1.0, 1.0}};
      c.owned.push_back(m->begin(spec, cond, uncond));
      c.batch.push_back(c.owned.back().get());
    }
  // Text encoders: one call of 2 prompts, without and with a LoRA (per row, merged).
  std::vector<double> text_none, text_per_row, text_merged;
  for (int rep = 0; rep <= repeats; ++rep) {
    // Each configuration steps twice: the first step after another configuration (packing the
    // per-row factors again, merging after a restore) and a steady one.
    for (auto& c : configs) {
      impl.lora_mode = c.mode;
      for (auto* times : {&c.first_ms, &c.ms}) {
        const auto t0 = std::chrono::steady_clock::now();
        m->step(c.batch);
        bench_support::synchronize(*m);
        const double ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                .count();
        if (rep > 0) times->push_back(ms);  // the first round warms up (binding the LoRAs)
      }
    }
    const auto time_text = [&](LoraMode mode, const std::vector<LoraUse>& uses) {
      impl.lora_mode = mode;
      const auto t0 = std::chrono::steady_clock::now();
      m->encode_texts({"a photograph of an astronaut riding a horse", "blurry"}, 1,
                      TextRole::kPrompt, PromptSyntax::kA1111, uses);
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
          .count();
    };
    const double a = time_text(LoraMode::kAuto, {});
    const double b = time_text(LoraMode::kPerRow, {{loras[0]}});
    const double c = time_text(LoraMode::kMerged, {{loras[0]}});
    if (rep > 0) {
      text_none.push_back(a);
      text_per_row.push_back(b);
      text_merged.push_back(c);
    }
  }
  impl.lora_mode = LoraMode::kAuto;
  const auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::cout << "[ lora timings ] " << m->info().name << " on " << m->info().device << ", " << images
            << " images of " << size << "x" << size << " (CFG: " << 2 * images
            << " UNet rows), LoRAs of rank " << rank << " (" << loras.front()->info().adapters
            << " modules), median of " << repeats << " steps:\n";
  const double base = median(configs.front().ms);
  for (const auto& c : configs)
    std::cout << "  " << c.name << ": " << median(c.ms) << " ms a step (x" << median(c.ms) / base
              << "); right after another configuration " << median(c.first_ms) << " ms\n";
  std::cout << "  text encoders, 2 prompts: no LoRA " << median(text_none) << " ms, per-row "
            << median(text_per_row)
            << " ms, merged (re-merged each call: the call without LoRA restored) "
            << median(text_merged) << " ms\n";
}

}  // namespace lora_format_test
}  // namespace sdserve::pipeline
