// Reading textual-inversion files: which layout, which vectors, and every way a file can be
// wrong (pipeline/textual_inversion.h). A1111's modules/textual_inversion/textual_inversion.py
// (EmbeddingDatabase.load_from_file) was read for the layouts; pickles it would load are refused.
#include "pipeline/textual_inversion.h"

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>

#include "cache/sha256.h"
#include "pipeline/errors.h"
#include "pipeline/io/file_io.h"
#include "pipeline/io/safetensors.h"
#include "pipeline/io/tensor_io.h"

namespace sdserve::pipeline {
namespace {

namespace fs = std::filesystem;

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

[[noreturn]] void refuse(const std::string& path, const std::string& why) {
  throw ModelError("embedding '" + path + "' cannot be used: " + why);
}

// torch.save's zip archive (PyTorch >= 1.6) or a bare pickle stream (protocol 2 to 5).
bool pickled_bytes(const std::string& bytes) {
  if (bytes.size() < 4) return false;
  const bool zip = bytes.compare(0, 4, "PK\x03\x04") == 0;
  const auto b0 = static_cast<unsigned char>(bytes[0]);
  const auto b1 = static_cast<unsigned char>(bytes[1]);
  return zip || (b0 == 0x80 && b1 >= 2 && b1 <= 5);
}

void refuse_pickle(const std::string& path, const std::string& what) {
  refuse(path, what +
                   ": sdserve reads only .safetensors, since loading a pickle can run any code it "
                   "holds; convert it to .safetensors once, in an environment you trust");
}

// The prompt word: the file's stem, or a diffusers concept folder's name for its
// learned_embeds.safetensors.
std::string embedding_name(const std::string& path) {
  const fs::path p(path);
  const std::string stem = p.stem().string();
  const std::string folder = p.parent_path().filename().string();
  if (stem == "learned_embeds" && !folder.empty() && folder != "." && folder != "..") return folder;
  return stem;
}

std::string shape_of(const TensorView& v) {
  return shape_string(v.shape);
}

// A (vectors, dim) or (dim) tensor of floats as float32 rows; `what` names it in messages.
std::vector<float> vectors_of(const std::string& path, const std::string& what,
                              const TensorView& view, int* vectors, int* dim) {
  if (view.dtype != DType::kF32 && view.dtype != DType::kF16 && view.dtype != DType::kBF16 &&
      view.dtype != DType::kF64)
    refuse(path, "tensor '" + what + "' holds " + dtype_name(view.dtype) +
                     " values; an embedding's vectors are floating point");
  if (view.shape.empty() || view.shape.size() > 2)
    refuse(path, "tensor '" + what + "' has shape " + shape_of(view) +
                     "; an embedding is (vectors, dim) or (dim)");
  const int64_t rows = view.shape.size() == 2 ? view.shape[0] : 1;
  const int64_t cols = view.shape.back();
  if (rows < 1 || cols < 1)
    refuse(path, "tensor '" + what + "' has shape " + shape_of(view) + ", which holds no vector");
  if (rows > TextualInversion::kMaxVectors)
    refuse(path, "tensor '" + what + "' holds " + std::to_string(rows) + " vectors; a prompt " +
                     "chunk holds " + std::to_string(TextualInversion::kMaxVectors) +
                     " tokens, so an embedding may take at most that many");
  if (cols > TextualInversion::kMaxDim)
    refuse(path, "tensor '" + what + "' has vectors of " + std::to_string(cols) +
                     " values; no text encoder's are larger than " +
                     std::to_string(TextualInversion::kMaxDim));
  const auto t = to_tensor(view, torch::kFloat32).contiguous();
  if (!torch::isfinite(t).all().item<bool>())
    refuse(path, "tensor '" + what + "' holds values that are not finite (NaN or infinity)");
  *vectors = static_cast<int>(rows);
  *dim = static_cast<int>(cols);
  return std::vector<float>(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
}

std::string tensor_names(const SafetensorsFile& file) {
  std::string out;
  size_t n = 0;
  for (const auto& [name, view] : file.tensors()) {
    if (n++ == 5) return out + ", ...";
    out += (out.empty() ? "" : ", ") + name;
  }
  return out;
}

}  // namespace

TextualInversion::TextualInversion(TextualInversionInfo info,
                                   std::vector<std::vector<float>> vectors)
    : info_(std::move(info)), vectors_(std::move(vectors)) {}

std::shared_ptr<const TextualInversion> TextualInversion::load(const std::string& path) {
  const std::string ext = lower(fs::path(path).extension().string());
  for (const char* pickle : {".pt", ".bin", ".ckpt", ".pth", ".pkl"})
    if (ext == pickle) refuse_pickle(path, "a pickled embedding (" + ext + ")");
  for (const char* image : {".png", ".webp", ".jxl", ".avif"})
    if (ext == image)
      refuse(path, "an embedding inside an image (" + ext +
                       ") is not read by sdserve; save it as "
                       ".safetensors");
  std::string bytes;
  try {
    bytes = read_regular_file(path, kMaxFileBytes);
  } catch (const ModelError& e) {
    refuse(path, e.what());
  }
  if (pickled_bytes(bytes)) refuse_pickle(path, "a pickle (torch.save's format) named " + ext);

  TextualInversionInfo info;
  info.name = embedding_name(path);
  info.path = path;
  info.sha256 = cache::sha256_hex(bytes);
  std::shared_ptr<SafetensorsFile> file;
  try {
    file = SafetensorsFile::open(path);
  } catch (const ModelError& e) {
    refuse(path, e.what());
  }
  const auto& tensors = file->tensors();
  std::vector<std::vector<float>> vectors;
  int rows = 0, dim = 0;
  if (file->contains("clip_l") && file->contains("clip_g")) {
    // SDXL: one set of vectors per text encoder (A1111's "clip_l" / "clip_g" keys).
    info.format = "sdxl";
    int rows_g = 0, dim_g = 0;
    vectors.push_back(vectors_of(path, "clip_l", file->at("clip_l"), &rows, &dim));
    vectors.push_back(vectors_of(path, "clip_g", file->at("clip_g"), &rows_g, &dim_g));
    if (rows != rows_g)
      refuse(path, "its clip_l holds " + std::to_string(rows) + " vectors but its clip_g " +
                       std::to_string(rows_g) + "; both encoders need one per token");
    info.dims = {dim, dim_g};
  } else if (tensors.size() == 1) {
    const auto& [key, view] = *tensors.begin();
    info.format =
        key == "emb_params" || key.rfind("string_to_param", 0) == 0 ? "a1111" : "diffusers";
    vectors.push_back(vectors_of(path, key, view, &rows, &dim));
    info.dims = {dim};
  } else if (tensors.empty()) {
    refuse(path, "it holds no tensors");
  } else {
    refuse(path, "it holds " + std::to_string(tensors.size()) + " tensors (" + tensor_names(*file) +
                     "); an embedding holds one (emb_params, string_to_param.*, or a token's) "
                     "or SDXL's clip_l and clip_g. A LoRA or a checkpoint belongs in another "
                     "folder");
  }
  info.vectors = rows;
  return std::make_shared<const TextualInversion>(std::move(info), std::move(vectors));
}

}  // namespace sdserve::pipeline
