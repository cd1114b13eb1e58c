// Textual-inversion files (pipeline/textual_inversion.h): each layout A1111 and diffusers write,
// read to the file's numbers; and every broken or hostile file refused with a ModelError that
// names the problem, never a crash. Fixtures: tests/fixtures/embeddings (make_ti_refs.py).
#include "pipeline/textual_inversion.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>

#include "cache/sha256.h"
#include "pipeline/errors.h"
#include "pipeline/io/safetensors.h"
#include "pipeline/io/tensor_io.h"
#include "test_util.h"

namespace sdserve::pipeline {
namespace ti_load_test {

namespace fs = std::filesystem;

std::string embedding(const std::string& rel) {
  return test::fixture("embeddings/" + rel);
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A folder of its own for the files a test writes, removed after it.
class Scratch {
 public:
  Scratch() {
    dir_ = fs::temp_directory_path() /
           ("sdserve-ti-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++));
    fs::create_directories(dir_);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream(path(name), std::ios::binary) << bytes;
    return path(name);
  }
  // A safetensors file of tensors (float32 ones hold `fill`, or 0.01 * i; others zeros).
  std::string tensors(const std::string& name,
                      const std::map<std::string, std::vector<int64_t>>& shapes,
                      std::optional<float> fill = std::nullopt, DType dtype = DType::kF32) const {
    std::map<std::string, TensorData> out;
    for (const auto& [key, shape] : shapes) {
      int64_t n = 1;
      for (const int64_t s : shape) n *= s;
      TensorData t{dtype, shape,
                   std::vector<std::byte>(static_cast<size_t>(n) * dtype_size(dtype))};
      if (dtype == DType::kF32)
        for (int64_t i = 0; i < n; ++i) {
          const float v = fill ? *fill : 0.01f * static_cast<float>(i);
          std::memcpy(t.bytes.data() + i * 4, &v, 4);
        }
      out.emplace(key, std::move(t));
    }
    write_safetensors(path(name), out);
    return path(name);
  }

 private:
  fs::path dir_;
  static inline int counter_ = 0;
};

// load() throws a ModelError naming the file and saying `what`.
void expect_refused(const std::string& path, const std::string& what) {
  SCOPED_TRACE(path);
  try {
    TextualInversion::load(path);
    ADD_FAILURE() << "loaded; expected a refusal saying \"" << what << "\"";
  } catch (const ModelError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(what), std::string::npos) << message;
    EXPECT_NE(message.find(path), std::string::npos) << message;
  }
}

TEST(TextualInversionFiles, ReadsEachLayoutToTheFilesNumbers) {
  struct Want {
    std::string rel, name, format, tensor;
    int vectors;
    std::vector<int> dims;
  };
  const std::vector<Want> wants = {
      {"tiny-sd15/tiemb.safetensors", "tiemb", "a1111", "emb_params", 3, {32}},
      {"tiny-sd15/tistp.safetensors", "tistp", "a1111", "string_to_param.*", 2, {32}},
      {"tiny-sd15/ticoncept/learned_embeds.safetensors",
       "ticoncept",
       "diffusers",
       "<ticoncept>",
       1,
       {32}},
      {"tiny-sdxl/tixl.safetensors", "tixl", "sdxl", "clip_l", 2, {32, 48}},
  };
  for (const auto& want : wants) {
    SCOPED_TRACE(want.rel);
    const auto ti = TextualInversion::load(embedding(want.rel));
    const auto& info = ti->info();
    EXPECT_EQ(info.name, want.name);
    EXPECT_EQ(info.format, want.format);
    EXPECT_EQ(info.vectors, want.vectors);
    EXPECT_EQ(info.dims, want.dims);
    EXPECT_EQ(info.path, embedding(want.rel));
    EXPECT_EQ(info.sha256, cache::sha256_hex(file_bytes(embedding(want.rel))));
    // The vectors are the file's (float16 ones converted exactly).
    const auto tensors = load_all(embedding(want.rel));
    const std::vector<std::string> keys = want.format == "sdxl"
                                              ? std::vector<std::string>{"clip_l", "clip_g"}
                                              : std::vector<std::string>{want.tensor};
    for (size_t k = 0; k < keys.size(); ++k) {
      const auto& file = tensors.at(keys[k]).reshape({-1});
      ASSERT_EQ(static_cast<int64_t>(ti->vectors(k).size()), file.numel());
      for (int64_t i = 0; i < file.numel(); ++i)
        ASSERT_EQ(ti->vectors(k)[static_cast<size_t>(i)], file[i].item<float>()) << i;
    }
  }
}

TEST(TextualInversionFiles, PicklesAreRefusedByName) {
  const Scratch dir;
  const auto valid = file_bytes(embedding("tiny-sd15/tiemb.safetensors"));
  for (const char* ext : {".pt", ".bin", ".ckpt", ".pth", ".PT"})
    expect_refused(dir.write(std::string("neg") + ext, valid), "a pickled embedding");
  // torch.save's zip archive and a bare pickle stream, named .safetensors.
  expect_refused(dir.write("zip.safetensors", std::string("PK\x03\x04", 4) + std::string(64, 'x')),
                 "a pickle (torch.save's format)");
  expect_refused(dir.write("pickle.safetensors", "\x80\x02}q\x00(X\x0f\x00\x00\x00"),
                 "a pickle (torch.save's format)");
  expect_refused(dir.write("neg.png", valid), "inside an image");
}

TEST(TextualInversionFiles, BrokenAndHostileFilesAreRefusedSayingWhy) {
  const Scratch dir;
  const auto valid = file_bytes(embedding("tiny-sd15/tiemb.safetensors"));
  // Truncated: the header promises data that is not there.
  expect_refused(dir.write("truncated.safetensors", valid.substr(0, valid.size() - 7)),
                 "not a valid safetensors file");
  expect_refused(dir.write("short.safetensors", valid.substr(0, 5)), "not a valid safetensors");
  expect_refused(dir.write("empty.safetensors", ""), "not a valid safetensors");
  expect_refused(dir.write("garbage.safetensors", std::string(4096, '\xff')),
                 "not a valid safetensors");
  // Values.
  expect_refused(dir.tensors("nan.safetensors", {{"emb_params", {2, 8}}},
                             std::numeric_limits<float>::quiet_NaN()),
                 "not finite");
  expect_refused(dir.tensors("inf.safetensors", {{"emb_params", {2, 8}}},
                             std::numeric_limits<float>::infinity()),
                 "not finite");
  expect_refused(dir.tensors("ints.safetensors", {{"emb_params", {2, 8}}}, 0, DType::kI32),
                 "floating point");
  // Shapes.
  expect_refused(dir.tensors("rank3.safetensors", {{"emb_params", {1, 2, 8}}}), "shape [1, 2, 8]");
  expect_refused(dir.tensors("scalar.safetensors", {{"emb_params", {}}}), "shape []");
  expect_refused(dir.tensors("none.safetensors", {{"emb_params", {0, 8}}}), "holds no vector");
  expect_refused(dir.tensors("huge.safetensors", {{"emb_params", {76, 8}}}),
                 "holds 76 vectors; a prompt chunk holds 75 tokens");
  expect_refused(dir.tensors("wide.safetensors", {{"emb_params", {1, 9000}}}),
                 "vectors of 9000 values");
  expect_refused(dir.tensors("lopsided.safetensors", {{"clip_l", {2, 8}}, {"clip_g", {3, 12}}}),
                 "clip_l holds 2 vectors but its clip_g 3");
  // Not one embedding.
  write_safetensors(dir.path("no-tensors.safetensors"), {});
  expect_refused(dir.path("no-tensors.safetensors"), "holds no tensors");
  expect_refused(
      dir.tensors("lora.safetensors",
                  {{"lora_up.weight", {4, 8}}, {"lora_down.weight", {8, 4}}, {"alpha", {1}}}),
      "holds 3 tensors");
  // Not a file, or far too big to be one.
  expect_refused(dir.path("missing.safetensors"), "cannot open");
  fs::create_directories(dir.path("folder.safetensors"));
  expect_refused(dir.path("folder.safetensors"), "not a regular file");
  ASSERT_EQ(::mkfifo(dir.path("fifo.safetensors").c_str(), 0600), 0);
  expect_refused(dir.path("fifo.safetensors"), "not a regular file");
  {
    std::ofstream(dir.path("big.safetensors")) << "x";
    fs::resize_file(dir.path("big.safetensors"), TextualInversion::kMaxFileBytes + 1);
  }
  expect_refused(dir.path("big.safetensors"), "larger than 16 MiB");
}

TEST(TextualInversionFiles, OneVectorAsAPlainVectorAndOtherTensorNamesAreTokens) {
  const Scratch dir;
  const auto ti = TextualInversion::load(dir.tensors("plain.safetensors", {{"<my-token>", {8}}}));
  EXPECT_EQ(ti->info().name, "plain");
  EXPECT_EQ(ti->info().format, "diffusers");
  EXPECT_EQ(ti->info().vectors, 1);
  EXPECT_EQ(ti->info().dims, std::vector<int>{8});
  // SDXL files may carry more than the two tensors: A1111 reads clip_l and clip_g alone.
  const auto xl = TextualInversion::load(
      dir.tensors("xl.safetensors", {{"clip_l", {1, 8}}, {"clip_g", {1, 12}}, {"step", {1}}}));
  EXPECT_EQ(xl->info().format, "sdxl");
  EXPECT_EQ(xl->info().dims, (std::vector<int>{8, 12}));
}

}  // namespace ti_load_test
}  // namespace sdserve::pipeline
