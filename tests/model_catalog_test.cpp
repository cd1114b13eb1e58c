// The models folder (engine/model_catalog.h) on real files: both tools' folder names, diffusers
// folders and single files, unusable files with their reasons, hashes (A1111's AutoV2) and their
// cache, lookups by every name A1111 clients send, and refresh.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "cache/sha256.h"
#include "engine/model_catalog.h"
#include "pipeline/io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace sdserve::catalog_test {
namespace {

using engine::CatalogOptions;
using engine::ModelCatalog;
using engine::ModelKind;

std::string file_sha256(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  return cache::sha256_hex(bytes);
}

void write(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << bytes;
}

class ModelCatalogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("sdserve-catalog-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
    // A1111's names for checkpoints, ComfyUI's for LoRAs: both are found.
    fs::create_directories(root_ / "Stable-diffusion" / "sd1");
    fs::copy_file(test::single_file(), root_ / "Stable-diffusion" / "sd1" / "tiny.safetensors");
    fs::create_directories(root_ / "checkpoints");
    fs::copy(test::model_dir(), root_ / "checkpoints" / "tiny-folder", fs::copy_options::recursive);
    write(root_ / "Stable-diffusion" / "old.ckpt", "pickle bytes");
    write(root_ / "Stable-diffusion" / "broken.safetensors",
          std::string("\x10\0\0\0\0\0\0\0{not json}}}}}}}", 24));
    write(root_ / "Stable-diffusion" / "notes.txt", "ignored");
    write(root_ / "loras" / "style.safetensors", std::string("\x02\0\0\0\0\0\0\0{}", 10));
    write(root_ / "loras" / "bad.safetensors", "truncated");
  }
  void TearDown() override { fs::remove_all(root_); }

  CatalogOptions options() const {
    CatalogOptions o;
    o.models_dir = root_.string();
    o.hash_in_background = false;
    return o;
  }

  fs::path root_;
};

TEST_F(ModelCatalogTest, ListsEveryCheckpointWithWhatItIsOrWhyItCannotBeUsed) {
  ModelCatalog catalog(options());
  const auto list = catalog.list(ModelKind::kCheckpoint);
  ASSERT_EQ(list.size(), 4u);
  std::map<std::string, engine::CatalogEntry> by_name;
  for (const auto& e : list) by_name[e.name] = e;
  ASSERT_TRUE(by_name.count("sd1/tiny"));
  ASSERT_TRUE(by_name.count("tiny-folder"));
  const auto& single = by_name.at("sd1/tiny");
  EXPECT_EQ(single.error, "");
  EXPECT_EQ(single.file_name, "sd1/tiny.safetensors");
  EXPECT_EQ(single.info.family, "sd1");
  // What loading it would say, without loading it.
  const auto loaded = pipeline::Model::load(single.path)->info();
  EXPECT_EQ(single.info.native_size, loaded.native_size);
  EXPECT_EQ(single.info.text_layers, loaded.text_layers);
  EXPECT_EQ(single.info.weight_bytes, loaded.weight_bytes);
  EXPECT_GT(single.info.weight_bytes, 0u);
  EXPECT_FALSE(single.folder);
  const auto& folder = by_name.at("tiny-folder");
  EXPECT_EQ(folder.error, "");
  EXPECT_TRUE(folder.folder);
  EXPECT_EQ(folder.info.family, "sd1");
  EXPECT_NE(by_name.at("old").error.find("pickled"), std::string::npos) << by_name.at("old").error;
  EXPECT_FALSE(by_name.at("broken").error.empty());
  // The LoRA folder under ComfyUI's name: a readable file, and one that is not.
  const auto loras = catalog.list(ModelKind::kLora);
  ASSERT_EQ(loras.size(), 2u);
  EXPECT_EQ(loras[0].name, "bad");
  EXPECT_FALSE(loras[0].error.empty());
  EXPECT_EQ(loras[1].name, "style");
  EXPECT_EQ(loras[1].error, "") << loras[1].error;
}

TEST_F(ModelCatalogTest, HashesAreA1111sAndFoundByEveryNameClientsSend) {
  ModelCatalog catalog(options());
  const std::string sha = file_sha256(test::single_file());
  const auto e = catalog.find(ModelKind::kCheckpoint, "sd1/tiny");
  ASSERT_TRUE(e);
  EXPECT_EQ(e->sha256, sha);
  EXPECT_EQ(e->autov2(), sha.substr(0, 10));
  EXPECT_EQ(e->title(), "sd1/tiny.safetensors [" + sha.substr(0, 10) + "]");
  for (const std::string& name : {std::string("sd1/tiny.safetensors"), std::string("sd1_tiny"),
                                  e->title(), sha.substr(0, 10), sha, std::string(" sd1/tiny ")}) {
    const auto found = catalog.find(ModelKind::kCheckpoint, name);
    ASSERT_TRUE(found) << name;
    EXPECT_EQ(found->path, e->path) << name;
  }
  // A title whose name is stale still finds the model by its hash, as A1111 does.
  EXPECT_TRUE(
      catalog.find(ModelKind::kCheckpoint, "renamed.safetensors [" + sha.substr(0, 10) + "]"));
  EXPECT_FALSE(catalog.find(ModelKind::kCheckpoint, "nope"));
  EXPECT_FALSE(catalog.find(ModelKind::kCheckpoint, ""));
  // A diffusers folder's hash: its weight files' hashes, one line each, sorted by path.
  const auto folder = catalog.find(ModelKind::kCheckpoint, "tiny-folder");
  ASSERT_TRUE(folder);
  std::string lines;
  for (const char* rel :
       {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"})
    lines += std::string(rel) + " " + file_sha256(test::model_dir() + "/" + rel) + "\n";
  EXPECT_EQ(folder->sha256, cache::sha256_hex(lines));
  // The default: the first usable by name, or the one asked for.
  EXPECT_EQ(catalog.default_checkpoint()->name, "sd1/tiny");
  EXPECT_EQ(catalog.default_checkpoint("tiny-folder")->name, "tiny-folder");
  EXPECT_EQ(catalog.default_checkpoint("old")->name, "sd1/tiny");  // unusable: not the default
}

TEST_F(ModelCatalogTest, ALorasHashIsA1111sAddnetHashOfItsTensorsOnly) {
  // The same tensors behind two different headers (metadata): one hash, of the bytes after the
  // header, as A1111 and kohya's sd-scripts compute it.
  const fs::path a = root_ / "Lora" / "a.safetensors", b = root_ / "Lora" / "b.safetensors";
  fs::create_directories(a.parent_path());
  std::map<std::string, pipeline::TensorData> tensors;
  tensors["lora_unet_x.lora_down.weight"] = {pipeline::DType::kF32, {2}, std::vector<std::byte>(8)};
  pipeline::write_safetensors(a.string(), tensors);
  std::ifstream in(a, std::ios::binary);
  const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  const std::string data = bytes.substr(8 + n);
  // b: the header padded with spaces (valid JSON, another file hash), the same data.
  std::string header = bytes.substr(8, n) + std::string(8, ' ');
  std::string b_bytes(8, '\0');
  for (int i = 0; i < 8; ++i) b_bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  write(b, b_bytes + header + data);
  ModelCatalog catalog(options());
  const auto ea = catalog.find(ModelKind::kLora, "a"), eb = catalog.find(ModelKind::kLora, "b");
  ASSERT_TRUE(ea && eb);
  ASSERT_EQ(eb->error, "") << eb->error;
  EXPECT_EQ(ea->sha256, cache::sha256_hex(data));
  EXPECT_EQ(eb->sha256, ea->sha256);
  EXPECT_NE(file_sha256(a.string()), file_sha256(b.string()));
  EXPECT_EQ(ea->lora_shorthash(), ea->sha256.substr(0, 12));
}

TEST_F(ModelCatalogTest, TheHashCacheSparesReadingUnchangedFilesAgain) {
  { ModelCatalog catalog(options()); }
  const fs::path cache_file = root_ / ".sdserve-hashes.json";
  ASSERT_TRUE(fs::exists(cache_file));
  // A planted hash for the unchanged file is believed (so the cache was read, not the file) ...
  std::ifstream in(cache_file);
  auto j = nlohmann::json::parse(in);
  const std::string path = fs::absolute(root_ / "Stable-diffusion" / "sd1" / "tiny.safetensors")
                               .lexically_normal()
                               .string();
  ASSERT_TRUE(j["files"].contains(path));
  j["files"][path]["sha256"] = std::string(64, 'a');
  std::ofstream(cache_file) << j.dump();
  {
    ModelCatalog catalog(options());
    EXPECT_EQ(catalog.find(ModelKind::kCheckpoint, "sd1/tiny")->sha256, std::string(64, 'a'));
  }
  // ... and a changed file is hashed again.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  fs::last_write_time(path, fs::file_time_type::clock::now());
  ModelCatalog catalog(options());
  EXPECT_EQ(catalog.find(ModelKind::kCheckpoint, "sd1/tiny")->sha256, file_sha256(path));
}

TEST_F(ModelCatalogTest, RefreshFindsNewFilesAndForgetsRemovedOnes) {
  ModelCatalog catalog(options());
  EXPECT_FALSE(catalog.find(ModelKind::kCheckpoint, "added"));
  fs::copy_file(test::single_file(), root_ / "Stable-diffusion" / "added.safetensors");
  fs::remove(root_ / "Stable-diffusion" / "old.ckpt");
  EXPECT_FALSE(catalog.find(ModelKind::kCheckpoint, "added"));  // until refreshed
  catalog.refresh(ModelKind::kCheckpoint);
  ASSERT_TRUE(catalog.find(ModelKind::kCheckpoint, "added"));
  EXPECT_EQ(catalog.find(ModelKind::kCheckpoint, "added")->error, "");
  EXPECT_FALSE(catalog.find(ModelKind::kCheckpoint, "old"));
}

TEST_F(ModelCatalogTest, HashesInTheBackgroundWithoutHoldingUpTheListing) {
  auto o = options();
  o.hash_in_background = true;
  ModelCatalog catalog(o);
  EXPECT_EQ(catalog.list(ModelKind::kCheckpoint).size(), 4u);
  ASSERT_TRUE(catalog.wait_for_hashes(60));
  EXPECT_EQ(catalog.find(ModelKind::kCheckpoint, "sd1/tiny")->sha256,
            file_sha256(test::single_file()));
}

TEST_F(ModelCatalogTest, AModelOutsideTheFolderIsListedFirstUnderItsOwnName) {
  auto o = options();
  o.extra_checkpoints = {test::model_dir() + "/"};
  ModelCatalog catalog(o);
  const auto list = catalog.list(ModelKind::kCheckpoint);
  ASSERT_EQ(list.front().name, "tiny-sd15");
  EXPECT_TRUE(list.front().folder);
  EXPECT_EQ(catalog.default_checkpoint()->name, "tiny-sd15");
}

TEST_F(ModelCatalogTest, AHostileFolderNeitherStopsTheScanNorLeavesItsBounds) {
  // A symlink back to the root (not followed) and a folder without permissions (skipped; root
  // reads it anyway): the scan ends and lists the models around them.
  fs::create_directory_symlink(root_, root_ / "Stable-diffusion" / "loop");
  fs::create_directories(root_ / "Stable-diffusion" / "locked");
  write(root_ / "Stable-diffusion" / "locked" / "x.safetensors", "x");
  fs::permissions(root_ / "Stable-diffusion" / "locked", fs::perms::none);
  ModelCatalog catalog(options());
  fs::permissions(root_ / "Stable-diffusion" / "locked", fs::perms::owner_all);
  EXPECT_TRUE(catalog.find(ModelKind::kCheckpoint, "sd1/tiny"));
  EXPECT_TRUE(catalog.find(ModelKind::kCheckpoint, "tiny-folder"));
}

}  // namespace
}  // namespace sdserve::catalog_test
