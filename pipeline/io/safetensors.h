// A read-only, memory-mapped safetensors reader.
//
// The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
// shape and [begin, end) byte range inside the data section, then the raw data. Every offset,
// dtype and shape is checked against the file size in open(), before any data is touched, so a
// truncated or hostile file is refused with a ModelError instead of reading out of bounds.
//
// Thread safety: a SafetensorsFile is immutable after open(); concurrent reads are safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sdserve::pipeline {

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

std::string dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);

struct TensorView {
  DType dtype;
  std::vector<int64_t> shape;
  const std::byte* data;  // points into the mapping; valid while the file object lives
  std::size_t nbytes;
  // A 2-D view whose bytes hold the transpose of `shape` (OpenCLIP's text_projection is stored
  // (in, out) where a Linear weight is (out, in)); to_tensor transposes while it copies.
  bool transposed = false;
};

class SafetensorsFile {
 public:
  // Maps and validates the file; throws ModelError naming the path and the problem.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // Throws ModelError naming the tensor and the file when it is absent.
  const TensorView& at(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  std::size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors in safetensors format (used by tests to build broken or converted files).
struct TensorData {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;
};
void write_safetensors(const std::string& path, const std::map<std::string, TensorData>& tensors);

}  // namespace sdserve::pipeline
