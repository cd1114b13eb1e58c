#include "engine/model_hash.h"

#include <filesystem>
#include <fstream>
#include <vector>

#include "cache/sha256.h"
#include "pipeline/log.h"

namespace sdserve::engine {

ModelHash::ModelHash(const std::string& path) {
  std::error_code ec;
  if (path.empty() || !std::filesystem::is_regular_file(path, ec)) return;
  thread_ = std::thread([this, path] { run(path); });
}

ModelHash::~ModelHash() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

void ModelHash::run(const std::string& path) {
  const std::string hex = sha256_of_file(path, false, [this] { return stop_.load(); });
  if (hex.empty()) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    sha256_ = hex;
  }
  pipeline::log(pipeline::LogLevel::kInfo, "model hash (A1111 AutoV2): " + hex.substr(0, 10));
}

std::string sha256_of_file(const std::string& path, bool after_header,
                           const std::function<bool()>& stop) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  if (after_header) {  // 8 bytes of header length, little-endian, then the header
    unsigned char size[8] = {};
    in.read(reinterpret_cast<char*>(size), 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | size[i];
    std::error_code ec;
    if (!in || n > std::filesystem::file_size(path, ec) || ec) return "";
    in.seekg(static_cast<std::streamoff>(8 + n));
  }
  cache::Sha256 sha;
  std::vector<char> buffer(4 << 20);
  while (in) {
    if (stop && stop()) return "";
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    if (in.gcount() > 0) sha.update(buffer.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) return "";
  const auto digest = sha.finish();
  return cache::to_hex(digest.data(), digest.size());
}

std::string ModelHash::sha256() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return sha256_;
}

std::string ModelHash::autov2() const {
  const std::string full = sha256();
  return full.substr(0, full.empty() ? 0 : 10);
}

}  // namespace sdserve::engine
