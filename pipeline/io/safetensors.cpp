#include "pipeline/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "config/safe_json.h"
#include "pipeline/errors.h"
#include "pipeline/io/file_io.h"

namespace sdserve::pipeline {
namespace {

// Headers of real checkpoints are well under 1 MiB; the cap keeps a hostile length from making
// us parse gigabytes of "JSON".
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct DTypeInfo {
  const char* name;
  DType dtype;
  std::size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {"F32", DType::kF32, 4},   {"F16", DType::kF16, 2}, {"BF16", DType::kBF16, 2},
    {"F64", DType::kF64, 8},   {"I64", DType::kI64, 8}, {"I32", DType::kI32, 4},
    {"I16", DType::kI16, 2},   {"I8", DType::kI8, 1},   {"U8", DType::kU8, 1},
    {"BOOL", DType::kBool, 1},
};

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw ModelError("'" + path + "' is not a valid safetensors file: " + what);
}

}  // namespace

std::string dtype_name(DType dtype) {
  for (const auto& d : kDTypes)
    if (d.dtype == dtype) return d.name;
  return "?";
}

std::size_t dtype_size(DType dtype) {
  for (const auto& d : kDTypes)
    if (d.dtype == dtype) return d.size;
  return 0;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  const int fd = open_regular_file(path);  // a FIFO named x.safetensors must not block
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw ModelError("cannot stat '" + path + "': " + std::strerror(errno));
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail(path, "the file is " + std::to_string(size) + " bytes, shorter than the 8-byte header");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw ModelError("cannot map '" + path + "': " + std::strerror(errno));
  file->map_ = map;
  file->map_size_ = size;

  const auto* base = static_cast<const unsigned char*>(map);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8)
    fail(path, "its header claims " + std::to_string(header_len) + " bytes but the file has " +
                   std::to_string(size) + " bytes (truncated or not safetensors)");
  const std::size_t data_begin = 8 + header_len;
  const uint64_t data_size = size - data_begin;

  nlohmann::json header;
  try {
    header = safe_json::parse(std::string_view(reinterpret_cast<const char*>(base) + 8,
                                               static_cast<std::size_t>(header_len)));
  } catch (const safe_json::Error& e) {
    fail(path, std::string("its JSON header does not parse (") + e.what() + ")");
  }
  if (!header.is_object()) fail(path, "its JSON header is not an object");

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (entry.is_object())
        for (const auto& [k, v] : entry.items())
          if (v.is_string()) file->metadata_[k] = v.get<std::string>();
      continue;
    }
    const std::string where =
        "tensor '" + (name.size() <= 200 ? name : name.substr(0, 200) + "...") + "'";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets"))
      fail(path, where + " lacks dtype, shape or data_offsets");
    const auto& jd = entry["dtype"];
    const DTypeInfo* info = nullptr;
    if (jd.is_string())
      for (const auto& d : kDTypes)
        if (jd.get<std::string>() == d.name) info = &d;
    if (info == nullptr) fail(path, where + " has unsupported dtype " + safe_json::describe(jd));
    const auto& js = entry["shape"];
    if (!js.is_array() || js.size() > 8) fail(path, where + " has a malformed shape");
    TensorView view{info->dtype, {}, nullptr, 0};
    uint64_t numel = 1;
    for (const auto& d : js) {
      if (!d.is_number_unsigned()) fail(path, where + " has a negative or non-integer dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 64 / dim)
        fail(path, where + " has an impossibly large shape");
      numel *= dim;
      view.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& jo = entry["data_offsets"];
    if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() ||
        !jo[1].is_number_unsigned())
      fail(path, where + " has malformed data_offsets");
    const uint64_t begin = jo[0].get<uint64_t>(), end = jo[1].get<uint64_t>();
    if (begin > end || end > data_size)
      fail(path, where + " lies at bytes [" + std::to_string(begin) + ", " + std::to_string(end) +
                     ") but the data section has " + std::to_string(data_size) +
                     " bytes (truncated file?)");
    if (end - begin != numel * info->size)
      fail(path, where + " has " + std::to_string(end - begin) +
                     " bytes but its shape and dtype need " + std::to_string(numel * info->size));
    view.data = reinterpret_cast<const std::byte*>(base + data_begin + begin);
    view.nbytes = end - begin;
    file->tensors_.emplace(name, std::move(view));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const TensorView& SafetensorsFile::at(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    throw ModelError("tensor '" + name + "' is missing from '" + path_ + "'");
  return it->second;
}

void write_safetensors(const std::string& path, const std::map<std::string, TensorData>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", dtype_name(t.dtype)},
                    {"shape", t.shape},
                    {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');  // the format pads the header to 8 bytes
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
  uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xff));
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, t] : tensors)
    out.write(reinterpret_cast<const char*>(t.bytes.data()),
              static_cast<std::streamsize>(t.bytes.size()));
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
}

}  // namespace sdserve::pipeline
