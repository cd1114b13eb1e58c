#include "pipeline/io/model_files.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "pipeline/errors.h"
#include "pipeline/io/safetensors.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Tensors = std::map<std::string, TensorData>;

std::string tokenizer_dir() {
  return test::model_dir() + "/tokenizer";
}

class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : path_(fs::temp_directory_path() /
              ("sdserve-model-files-" + std::to_string(::getpid()) + "-" + tag)) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  std::string str(const std::string& rel) const { return (path_ / rel).string(); }

 private:
  fs::path path_;
};

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
}

// Expects open_model_files to throw a ModelError whose message has every fragment.
void expect_refused(const std::string& path, const std::vector<std::string>& fragments) {
  SCOPED_TRACE(path);
  try {
    open_model_files(path, tokenizer_dir());
    ADD_FAILURE() << "expected a ModelError";
  } catch (const ModelError& e) {
    const std::string message = e.what();
    for (const auto& fragment : fragments)
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message: " << message << "\nlacks: " << fragment;
  }
}

void expect_family_refused(const std::string& path, const std::string& family) {
  expect_refused(path, {path, "detected " + family, "not yet SD 3, Flux"});
}

Tensors read_tensors(const std::string& path) {
  auto file = SafetensorsFile::open(path);
  Tensors out;
  for (const auto& [name, v] : file->tensors())
    out[name] = TensorData{v.dtype, v.shape, std::vector<std::byte>(v.data, v.data + v.nbytes)};
  return out;
}

TensorData zeros(DType dtype, const std::vector<int64_t>& shape) {
  std::size_t n = dtype_size(dtype);
  for (int64_t d : shape) n *= static_cast<std::size_t>(d);
  return TensorData{dtype, shape, std::vector<std::byte>(n)};
}

void rename_prefix(Tensors& t, const std::string& from, const std::string& to) {
  Tensors out;
  for (auto& [name, data] : t)
    out[name.compare(0, from.size(), from) == 0 ? to + name.substr(from.size()) : name] =
        std::move(data);
  t = std::move(out);
}

// The fixture single file with `edit` applied, written as `dir`/`name`.
std::string edited_single_file(const TempDir& dir, const std::string& name,
                               const std::function<void(Tensors&)>& edit) {
  Tensors t = read_tensors(test::single_file());
  edit(t);
  write_safetensors(dir.str(name), t);
  return dir.str(name);
}

fs::path copy_model_dir(const TempDir& dir) {
  const fs::path copy = dir.path() / "model";
  fs::copy(test::model_dir(), copy, fs::copy_options::recursive);
  return copy;
}

void edit_json(const fs::path& file, const std::function<void(json&)>& edit) {
  std::ifstream in(file);
  json j = json::parse(in);
  edit(j);
  write_text(file, j.dump(2));
}

void expect_same_weights(const WeightSource& a, const WeightSource& b) {
  SCOPED_TRACE(a.component);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, va] : a.tensors) {
    auto it = b.tensors.find(name);
    ASSERT_NE(it, b.tensors.end()) << "missing " << name;
    const TensorView& vb = it->second;
    EXPECT_EQ(va.dtype, vb.dtype) << name;
    EXPECT_EQ(va.shape, vb.shape) << name;
    ASSERT_EQ(va.nbytes, vb.nbytes) << name;
    EXPECT_EQ(std::memcmp(va.data, vb.data, va.nbytes), 0) << name;
    EXPECT_TRUE(torch::equal(to_tensor(va), to_tensor(vb))) << name;
  }
}

json read_config(const std::string& rel) {
  std::ifstream in(test::model_dir() + "/" + rel);
  return json::parse(in);
}

// Every field of the folder's config, save versions and those no shape can tell (the default
// resolution, the stored dtype), equals the inferred one.
void expect_config_matches(const json& inferred, const json& folder, const std::string& what) {
  SCOPED_TRACE(what);
  for (const auto& [key, value] : folder.items()) {
    if (key == "_diffusers_version" || key == "transformers_version" || key == "dtype" ||
        key == "sample_size")
      continue;
    ASSERT_TRUE(inferred.contains(key)) << key;
    EXPECT_EQ(inferred.at(key), value) << key;
  }
}

TEST(ModelFiles, OpensDiffusersFolder) {
  const ModelFiles m = open_model_files(test::model_dir(), "/nonexistent");
  EXPECT_EQ(m.path, test::model_dir());
  EXPECT_EQ(m.layout, "diffusers");
  EXPECT_EQ(m.family, "sd1");
  EXPECT_EQ(m.unet_config, read_config("unet/config.json"));
  EXPECT_EQ(m.vae_config, read_config("vae/config.json"));
  EXPECT_EQ(m.text_encoder_config, read_config("text_encoder/config.json"));
  EXPECT_EQ(m.scheduler_config, read_config("scheduler/scheduler_config.json"));
  EXPECT_EQ(m.vocab_path, test::model_dir() + "/tokenizer/vocab.json");
  EXPECT_EQ(m.merges_path, test::model_dir() + "/tokenizer/merges.txt");
  EXPECT_EQ(m.unet.tensors.size(), 494u);
  EXPECT_EQ(m.vae.tensors.size(), 180u);
  EXPECT_EQ(m.text_encoder.tensors.size(), 52u);
  EXPECT_EQ(m.unet.component, "unet");
  EXPECT_EQ(m.text_encoder.origin, test::model_dir() + "/text_encoder/model.safetensors");
  EXPECT_EQ(m.text_encoder.tensors.count("encoder.layers.0.self_attn.q_proj.weight"), 1u);
  EXPECT_EQ(m.vae.tensors.at("decoder.mid_block.attentions.0.to_q.weight").shape,
            (std::vector<int64_t>{64, 64}));
}

TEST(ModelFiles, SingleFileGivesTheFolderWeights) {
  const ModelFiles folder = open_model_files(test::model_dir(), tokenizer_dir());
  const ModelFiles single = open_model_files(test::single_file(), tokenizer_dir());
  EXPECT_EQ(single.layout, "single-file");
  EXPECT_EQ(single.family, "sd1");
  EXPECT_EQ(single.unet.origin, test::single_file());
  EXPECT_EQ(single.vocab_path, tokenizer_dir() + "/vocab.json");
  EXPECT_EQ(single.merges_path, tokenizer_dir() + "/merges.txt");
  expect_same_weights(single.unet, folder.unet);
  expect_same_weights(single.vae, folder.vae);
  expect_same_weights(single.text_encoder, folder.text_encoder);
}

TEST(ModelFiles, InferredConfigsMatchTheFolder) {
  const ModelFiles single = open_model_files(test::single_file(), tokenizer_dir());
  expect_config_matches(single.unet_config, read_config("unet/config.json"), "unet");
  expect_config_matches(single.vae_config, read_config("vae/config.json"), "vae");
  expect_config_matches(single.text_encoder_config, read_config("text_encoder/config.json"),
                        "text_encoder");
  expect_config_matches(single.scheduler_config, read_config("scheduler/scheduler_config.json"),
                        "scheduler");
  EXPECT_EQ(single.scheduler_config.size() + 1,
            read_config("scheduler/scheduler_config.json").size());
}

TEST(ModelFiles, SingleFileWithOldTextEncoderPrefix) {
  TempDir dir("oldclip");
  const std::string path = edited_single_file(dir, "old.safetensors", [](Tensors& t) {
    rename_prefix(t, "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.");
    t["cond_stage_model.transformer.embeddings.position_ids"] = zeros(DType::kI64, {1, 77});
  });
  const ModelFiles folder = open_model_files(test::model_dir(), tokenizer_dir());
  expect_same_weights(open_model_files(path, tokenizer_dir()).text_encoder, folder.text_encoder);
}

TEST(ModelFiles, FolderWithLegacyVaeNamesAndPrefixlessTextEncoder) {
  TempDir dir("legacy");
  const fs::path model = copy_model_dir(dir);
  const std::string vae = (model / "vae/diffusion_pytorch_model.safetensors").string();
  Tensors t = read_tensors(vae);
  for (const std::string part : {"encoder", "decoder"}) {
    const std::string p = part + ".mid_block.attentions.0.";
    for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
             {"to_q", "query"}, {"to_k", "key"}, {"to_v", "value"}, {"to_out.0", "proj_attn"}})
      for (const std::string kind : {".weight", ".bias"}) {
        TensorData d = std::move(t.at(p + from + kind));
        t.erase(p + from + kind);
        if (d.shape.size() == 2) d.shape = {d.shape[0], d.shape[1], 1, 1};
        t[p + to + kind] = std::move(d);
      }
  }
  write_safetensors(vae, t);
  const std::string text = (model / "text_encoder/model.safetensors").string();
  Tensors tt = read_tensors(text);
  rename_prefix(tt, "text_model.", "");
  write_safetensors(text, tt);

  const ModelFiles original = open_model_files(test::model_dir(), tokenizer_dir());
  const ModelFiles legacy = open_model_files(model.string(), tokenizer_dir());
  expect_same_weights(legacy.vae, original.vae);
  expect_same_weights(legacy.text_encoder, original.text_encoder);
}

TEST(ModelFiles, FolderUsesFp16Variant) {
  TempDir dir("fp16");
  const fs::path model = copy_model_dir(dir);
  fs::rename(model / "unet/diffusion_pytorch_model.safetensors",
             model / "unet/diffusion_pytorch_model.fp16.safetensors");
  const ModelFiles m = open_model_files(model.string(), tokenizer_dir());
  EXPECT_EQ(m.unet.origin, (model / "unet/diffusion_pytorch_model.fp16.safetensors").string());
  EXPECT_EQ(m.unet.tensors.size(), 494u);
}

TEST(ModelFiles, RefusesMissingPath) {
  expect_refused("/nonexistent/model.safetensors",
                 {"/nonexistent/model.safetensors", "does not exist"});
}

TEST(ModelFiles, RefusesPickleCheckpoints) {
  TempDir dir("pickle");
  for (const std::string name :
       {"model.ckpt", "model.pt", "model.pth", "model.bin", "MODEL.CKPT"}) {
    write_text(dir.path() / name, std::string("PK\x03\x04", 4) + "rest of a zip");
    expect_refused(dir.str(name),
                   {dir.str(name), "pickle checkpoint", "arbitrary code",
                    "convert_original_stable_diffusion_to_diffusers.py", ".safetensors"});
  }
  // A pickle renamed to .safetensors is named for what it is, not as a broken safetensors file.
  write_text(dir.path() / "disguised.safetensors", std::string("PK\x03\x04", 4) + "zip");
  expect_refused(dir.str("disguised.safetensors"), {"pickle checkpoint"});
  write_text(dir.path() / "legacy.safetensors", std::string("\x80\x02}q\x00", 5));
  expect_refused(dir.str("legacy.safetensors"), {"pickle checkpoint"});
}

TEST(ModelFiles, RefusesTruncatedSingleFile) {
  TempDir dir("truncated");
  const std::string path = dir.str("cut.safetensors");
  const auto size = fs::file_size(test::single_file());
  fs::copy_file(test::single_file(), path);
  fs::resize_file(path, size / 2);
  expect_refused(path, {path, "truncated"});
}

TEST(ModelFiles, RefusesFolderWithoutModelIndex) {
  TempDir dir("noindex");
  expect_refused(dir.path().string(), {dir.path().string(), "without model_index.json"});
  expect_refused(test::model_dir() + "/unet", {"without model_index.json", "one component"});
}

TEST(ModelFiles, RefusesFolderMissingAComponent) {
  TempDir dir("nocomponent");
  const fs::path model = copy_model_dir(dir);
  const fs::path original = test::model_dir();
  // Each part in turn goes missing, then comes back.
  for (const std::string rel :
       {"tokenizer/merges.txt", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "unet/config.json"}) {
    fs::remove(model / rel);
    expect_refused(model.string(), {model.string(), "lacks", (model / rel).string()});
    fs::copy_file(original / rel, model / rel);
  }
  fs::remove_all(model / "vae");
  expect_refused(model.string(), {"lacks the vae/ component folder"});
  fs::copy(original / "vae", model / "vae", fs::copy_options::recursive);
  fs::remove(model / "unet/diffusion_pytorch_model.safetensors");
  expect_refused(model.string(), {"lacks weights", "diffusion_pytorch_model.safetensors"});
}

TEST(ModelFiles, RefusesFolderWithOnlyPickleWeights) {
  TempDir dir("binfolder");
  const fs::path model = copy_model_dir(dir);
  const fs::path bin = model / "text_encoder/pytorch_model.bin";
  fs::rename(model / "text_encoder/model.safetensors", bin);
  expect_refused(model.string(), {bin.string(), "pickle checkpoint", "safe_serialization=True"});
}

TEST(ModelFiles, RefusesMalformedConfig) {
  TempDir dir("badconfig");
  const fs::path model = copy_model_dir(dir);
  const fs::path config = model / "vae/config.json";
  write_text(config, "{\"block_out_channels\": [32, ");
  expect_refused(model.string(), {config.string(), "not valid JSON"});
  write_text(config, "[1, 2]");
  expect_refused(model.string(), {config.string(), "not a JSON object"});
  fs::copy_file(test::model_dir() + "/vae/config.json", config,
                fs::copy_options::overwrite_existing);
  edit_json(model / "unet/config.json", [](json& j) { j["cross_attention_dim"] = "wide"; });
  expect_refused(model.string(),
                 {(model / "unet/config.json").string(), "malformed", "\"cross_attention_dim\""});
  edit_json(model / "unet/config.json", [](json& j) { j.erase("cross_attention_dim"); });
  expect_refused(model.string(), {"\"cross_attention_dim\" is missing"});
  write_text(model / "model_index.json", "{{");
  expect_refused(model.string(), {(model / "model_index.json").string(), "not valid JSON"});
}

TEST(ModelFiles, RefusesSafetensorsErrorsInAFolder) {
  TempDir dir("badweights");
  const fs::path model = copy_model_dir(dir);
  const fs::path weights = model / "vae/diffusion_pytorch_model.safetensors";
  fs::resize_file(weights, fs::file_size(weights) - 100);
  expect_refused(model.string(), {weights.string(), "truncated"});
}

TEST(ModelFiles, RefusesOtherFamiliesInAFolder) {
  TempDir dir("folderfamily");
  const fs::path model = copy_model_dir(dir);
  const fs::path unet = model / "unet/config.json";
  // A UNet that cross-attends to another width than the text encoder gives.
  edit_json(unet, [](json& j) { j["cross_attention_dim"] = 1024; });
  expect_refused(model.string(), {"cross-attends to width 1024", "give width 32"});
  edit_json(unet, [](json& j) {
    j["cross_attention_dim"] = 32;
    j["in_channels"] = 8;
  });
  expect_family_refused(model.string(), "an InstructPix2Pix model");
  edit_json(unet, [](json& j) {
    j["in_channels"] = 4;
    j["addition_embed_type"] = "text_time";
  });
  expect_refused(model.string(), {"text_time conditioning", "no text_encoder_2/"});
  edit_json(unet, [](json& j) { j["addition_embed_type"] = nullptr; });
  edit_json(model / "model_index.json",
            [](json& j) { j["_class_name"] = "StableDiffusionInstructPix2PixPipeline"; });
  expect_family_refused(model.string(), "an InstructPix2Pix model");
  edit_json(model / "model_index.json", [](json& j) { j["_class_name"] = "FluxPipeline"; });
  expect_family_refused(model.string(), "Flux");
  edit_json(model / "model_index.json",
            [](json& j) { j["_class_name"] = "StableDiffusion3Pipeline"; });
  expect_family_refused(model.string(), "Stable Diffusion 3");
}

TEST(ModelFiles, RefusesOtherFamiliesInASingleFile) {
  TempDir dir("family");
  const std::string unet = "model.diffusion_model.";
  // SDXL names with only one of its two text encoders.
  expect_refused(edited_single_file(dir, "sdxl.safetensors",
                                    [](Tensors& t) {
                                      rename_prefix(t, "cond_stage_model.transformer.",
                                                    "conditioner.embedders.0.transformer.");
                                    }),
                 {"not SDXL's two text encoders"});
  // SD 2.x's names on SD 1.x's UNet: its 32-wide level cannot have SD 2.x's 64-wide heads.
  expect_refused(edited_single_file(dir, "sd2.safetensors",
                                    [](Tensors& t) {
                                      rename_prefix(t, "cond_stage_model.transformer.",
                                                    "cond_stage_model.model.");
                                    }),
                 {"not a model sdserve recognises", "UNet level 0 is 32 wide"});
  // A UNet that cross-attends to 1024-wide embeddings the CLIP-L encoder does not give.
  expect_refused(edited_single_file(dir, "sd2-width.safetensors",
                                    [](Tensors& t) {
                                      for (auto& [name, d] : t)
                                        if (name.find("attn2.to_k.weight") != std::string::npos ||
                                            name.find("attn2.to_v.weight") != std::string::npos)
                                          d = zeros(d.dtype, {d.shape[0], 1024});
                                    }),
                 {"cross-attends to width 1024"});
  expect_family_refused(edited_single_file(dir, "sd3.safetensors",
                                           [&](Tensors& t) {
                                             rename_prefix(t, unet + "input_blocks.1.",
                                                           unet + "joint_blocks.0.");
                                           }),
                        "Stable Diffusion 3");
  expect_family_refused(
      edited_single_file(
          dir, "flux.safetensors",
          [&](Tensors& t) { rename_prefix(t, unet + "input_blocks.", "double_blocks."); }),
      "Flux");
  expect_family_refused(edited_single_file(dir, "pix2pix.safetensors",
                                           [&](Tensors& t) {
                                             auto& d = t.at(unet + "input_blocks.0.0.weight");
                                             d = zeros(d.dtype, {32, 8, 3, 3});
                                           }),
                        "an InstructPix2Pix model");
}

TEST(ModelFiles, RefusesUnrecognisedSingleFiles) {
  TempDir dir("unknown");
  const std::vector<std::string> unrecognised = {"not a model sdserve recognises",
                                                 "sdserve loads Stable Diffusion 1.x, 2.x and XL"};
  auto with = [&](std::vector<std::string> v, const std::string& extra) {
    v.push_back(extra);
    return v;
  };
  expect_refused(edited_single_file(dir, "vae-only.safetensors",
                                    [](Tensors& t) {
                                      rename_prefix(t, "first_stage_model.", "");
                                      for (auto it = t.begin(); it != t.end();)
                                        it = it->first.rfind("encoder.", 0) == 0 ||
                                                     it->first.rfind("decoder.", 0) == 0
                                                 ? std::next(it)
                                                 : t.erase(it);
                                    }),
                 with(unrecognised, "no SD UNet"));
  expect_refused(edited_single_file(dir, "lora.safetensors",
                                    [](Tensors& t) {
                                      Tensors lora;
                                      lora
                                          ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_"
                                           "down.weight"] = zeros(DType::kF16, {4, 32});
                                      t = std::move(lora);
                                    }),
                 with(unrecognised, "LoRA"));
  expect_refused(
      edited_single_file(
          dir, "extra.safetensors",
          [](Tensors& t) {
            t["model.diffusion_model.label_emb.0.0.weight"] = zeros(DType::kF16, {128, 16});
          }),
      with(unrecognised, "model.diffusion_model.label_emb.0.0.weight"));
  expect_refused(edited_single_file(dir, "empty.safetensors", [](Tensors& t) { t.clear(); }),
                 with(unrecognised, "no tensors"));
}

TEST(ModelFiles, RefusesSingleFileMissingATensor) {
  TempDir dir("missing");
  for (const std::string name :
       {"model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.2.1.conv.bias",
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc2.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"}) {
    const std::string path =
        edited_single_file(dir, "missing.safetensors", [&](Tensors& t) { t.erase(name); });
    expect_refused(path, {path, "lacks tensor '" + name + "'"});
  }
}

// The fixture UNet with one resnet per level instead of two: each down level keeps its first
// resnet, each up level its first and last (the shapes of a layers_per_block 1 UNet), and the
// LDM blocks are numbered again. `up_only` prunes the up path alone (an inconsistent file).
void prune_unet(Tensors& t, bool up_only) {
  const std::string unet = "model.diffusion_model.";
  const std::map<int, int> inputs = {{0, 0}, {1, 1}, {3, 2}, {4, 3}, {6, 4}, {7, 5}};
  const std::map<int, int> outputs = {{0, 0}, {2, 1}, {3, 2}, {5, 3}, {6, 4}, {8, 5}};
  auto renumber = [&](const std::string& list, const std::map<int, int>& keep) {
    Tensors out;
    const std::string prefix = unet + list;
    for (auto& [name, data] : t) {
      if (name.compare(0, prefix.size(), prefix) != 0) {
        out[name] = std::move(data);
        continue;
      }
      const std::string rest = name.substr(prefix.size());
      const int i = std::stoi(rest.substr(0, rest.find('.')));
      const auto it = keep.find(i);
      if (it != keep.end())
        out[prefix + std::to_string(it->second) + rest.substr(rest.find('.'))] = std::move(data);
    }
    t = std::move(out);
  };
  if (!up_only) renumber("input_blocks.", inputs);
  renumber("output_blocks.", outputs);
}

TEST(ModelFiles, InfersResnetsPerLevelFromTheKeys) {
  TempDir dir("pruned");
  const std::string path =
      edited_single_file(dir, "pruned.safetensors", [](Tensors& t) { prune_unet(t, false); });
  const auto files = open_model_files(path, tokenizer_dir());
  EXPECT_EQ(files.unet_config.at("layers_per_block"), 1);
  EXPECT_EQ(files.unet_config.at("block_out_channels"), json({32, 64, 64}));
  EXPECT_EQ(files.unet.tensors.count("down_blocks.0.resnets.1.conv1.weight"), 0u);
  EXPECT_EQ(files.unet.tensors.count("up_blocks.0.resnets.1.conv1.weight"), 1u);
  EXPECT_EQ(files.unet.tensors.count("up_blocks.0.resnets.2.conv1.weight"), 0u);
  // The weights fill a UNet built from the inferred config, and it runs.
  LoadOptions o;
  o.device = "cpu";
  o.precision = "fp32";
  GenerateRequest r;
  r.prompt = "a cat";
  r.image.width = r.image.height = 64;
  r.image.steps = 2;
  EXPECT_EQ(Model::load(path, o)->generate(r).size(), 1u);
}

TEST(ModelFiles, RefusesUpAndDownLevelsThatDisagreeNamingThem) {
  TempDir dir("uneven");
  const std::string path =
      edited_single_file(dir, "uneven.safetensors", [](Tensors& t) { prune_unet(t, true); });
  expect_refused(path,
                 {"up level 0 has 2 resnets", "down level it mirrors (2, 2 resnets)", "needs 3"});
}

TEST(ModelFiles, RefusesMissingDefaultTokenizer) {
  try {
    open_model_files(test::single_file(), "/nonexistent-tokenizer");
    ADD_FAILURE() << "expected a ModelError";
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("'/nonexistent-tokenizer' lacks vocab.json"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace sdserve::pipeline
