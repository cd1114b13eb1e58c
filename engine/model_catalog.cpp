#include "engine/model_catalog.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "cache/sha256.h"
#include "pipeline/errors.h"
#include "pipeline/log.h"

namespace fs = std::filesystem;

namespace sdserve::engine {
namespace {

// A hostile folder (millions of files, deep trees) costs a bounded scan.
constexpr size_t kMaxEntries = 10000;
constexpr int kMaxDepth = 8;

std::vector<std::string> folder_names(ModelKind kind) {
  switch (kind) {
    case ModelKind::kCheckpoint:
      return {"Stable-diffusion", "checkpoints"};
    case ModelKind::kLora:
      return {"Lora", "loras"};
    case ModelKind::kVae:
      return {"VAE", "vae"};
    case ModelKind::kEmbedding:
      return {"embeddings"};
  }
  return {};
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool is_pickle_extension(const std::string& ext) {
  return ext == ".ckpt" || ext == ".pt" || ext == ".pth" || ext == ".bin" || ext == ".pkl";
}

std::string pickle_error(const std::string& ext) {
  return "a pickled file (" + ext +
         "): sdserve reads only .safetensors, since loading a pickle can run any code it holds; "
         "convert it to .safetensors";
}

int64_t mtime_ns(const fs::path& p) {
  std::error_code ec;
  const auto t = fs::last_write_time(p, ec);
  if (ec) return 0;
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

// The .safetensors files below a folder, relative paths sorted (a diffusers folder's weights).
std::vector<std::string> weight_files(const fs::path& folder) {
  std::vector<std::string> out;
  std::error_code ec;
  fs::recursive_directory_iterator it(folder, fs::directory_options::skip_permission_denied, ec);
  for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (it.depth() > kMaxDepth) {
      it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file(ec) && lower(it->path().extension().string()) == ".safetensors")
      out.push_back(fs::relative(it->path(), folder, ec).generic_string());
    if (out.size() > kMaxEntries) break;
  }
  std::sort(out.begin(), out.end());
  return out;
}

// A diffusers model or VAE folder: the whole folder is one entry.
bool is_model_folder(ModelKind kind, const fs::path& p) {
  std::error_code ec;
  if (kind == ModelKind::kCheckpoint) return fs::is_regular_file(p / "model_index.json", ec);
  if (kind == ModelKind::kVae) return fs::is_regular_file(p / "config.json", ec);
  return false;
}

std::string without_extension(const std::string& relative) {
  const fs::path p(relative);
  return (p.parent_path() / p.stem()).generic_string();
}

bool is_hex(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return std::isxdigit(static_cast<unsigned char>(c));
  });
}

}  // namespace

std::string to_string(ModelKind kind) {
  switch (kind) {
    case ModelKind::kCheckpoint:
      return "checkpoint";
    case ModelKind::kLora:
      return "lora";
    case ModelKind::kVae:
      return "vae";
    case ModelKind::kEmbedding:
      return "embedding";
  }
  return "unknown";
}

std::string CatalogEntry::title() const {
  return sha256.empty() ? file_name : file_name + " [" + autov2() + "]";
}

ModelCatalog::ModelCatalog(CatalogOptions options) : options_(std::move(options)) {
  hash_cache_path_ = options_.hash_cache;
  if (hash_cache_path_.empty() && !options_.models_dir.empty())
    hash_cache_path_ = (fs::path(options_.models_dir) / ".sdserve-hashes.json").string();
  load_hash_cache();
  if (options_.hash_in_background) hasher_ = std::thread([this] { hash_loop(); });
  refresh();
}

ModelCatalog::~ModelCatalog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  hash_cv_.notify_all();
  if (hasher_.joinable()) hasher_.join();
}

void ModelCatalog::scan(ModelKind kind, std::vector<CatalogEntry>* out) const {
  std::set<std::string> names;
  const auto add = [&](CatalogEntry e) {
    if (!names.insert(e.name).second) {
      e.error = "another " + to_string(kind) + " has the name '" + e.name +
                "' (the first by folder order is used): rename one";
      e.name += " (" + e.path + ")";
    }
    out->push_back(std::move(e));
  };
  if (kind == ModelKind::kCheckpoint)
    for (const auto& extra : options_.extra_checkpoints) {
      CatalogEntry e;
      e.kind = kind;
      std::error_code ec;
      fs::path p = fs::absolute(extra, ec).lexically_normal();
      if (!p.has_filename()) p = p.parent_path();  // "folder/"
      e.path = p.string();
      e.folder = fs::is_directory(p, ec);
      e.file_name = p.filename().string();
      e.name = e.folder ? e.file_name : p.stem().string();
      add(std::move(e));
    }
  std::vector<fs::path> roots;
  if (!options_.models_dir.empty())
    for (const auto& sub : folder_names(kind)) roots.push_back(fs::path(options_.models_dir) / sub);
  if (kind == ModelKind::kEmbedding && !options_.embeddings_dir.empty())
    roots.push_back(options_.embeddings_dir);
  for (const auto& root : roots) {
    std::error_code ec;
    if (!fs::is_directory(root, ec)) continue;
    std::vector<CatalogEntry> found;
    fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec);
    for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (found.size() >= kMaxEntries) break;
      const fs::path& p = it->path();
      const std::string base = p.filename().string();
      if (base.empty() || base[0] == '.') {  // hidden: the hash cache, editors' files
        if (it->is_directory(ec)) it.disable_recursion_pending();
        continue;
      }
      CatalogEntry e;
      e.kind = kind;
      e.path = fs::absolute(p, ec).lexically_normal().string();
      const std::string relative = fs::relative(p, root, ec).generic_string();
      if (it->is_directory(ec)) {
        if (it.depth() >= kMaxDepth) it.disable_recursion_pending();
        if (!is_model_folder(kind, p)) continue;
        it.disable_recursion_pending();
        e.folder = true;
        e.file_name = relative;
        e.name = relative;
        found.push_back(std::move(e));
        continue;
      }
      if (!it->is_regular_file(ec)) continue;
      const std::string ext = lower(p.extension().string());
      if (ext != ".safetensors" && !is_pickle_extension(ext)) continue;
      e.file_name = relative;
      e.name = without_extension(relative);
      if (is_pickle_extension(ext)) e.error = pickle_error(ext);
      found.push_back(std::move(e));
    }
    std::sort(found.begin(), found.end(),
              [](const CatalogEntry& a, const CatalogEntry& b) { return a.name < b.name; });
    for (auto& e : found) add(std::move(e));
  }
  for (auto& e : *out) {
    std::error_code ec;
    if (e.folder) {
      e.bytes = 0;
      e.mtime = 0;
      for (const auto& f : weight_files(e.path)) {
        const fs::path file = fs::path(e.path) / f;
        e.bytes += fs::file_size(file, ec);
        e.mtime = std::max(e.mtime, mtime_ns(file));
      }
    } else {
      e.bytes = fs::file_size(e.path, ec);
      if (ec) e.bytes = 0;
      e.mtime = mtime_ns(e.path);
    }
  }
}

void ModelCatalog::inspect(CatalogEntry* e) const {
  if (!e->error.empty()) return;
  std::error_code ec;
  if (!fs::exists(e->path, ec)) {
    e->error = "not found: " + e->path;
    return;
  }
  try {
    if (e->kind == ModelKind::kCheckpoint) {
      e->info = pipeline::inspect_model(e->path, options_.load);
      e->info.name = e->name;
    } else if (options_.check) {
      e->error = options_.check(e->kind, e->path);
    } else {
      pipeline::check_safetensors_file(e->path);
    }
  } catch (const std::exception& ex) {
    e->error = ex.what();
  }
}

void ModelCatalog::refresh() {
  for (ModelKind kind :
       {ModelKind::kCheckpoint, ModelKind::kLora, ModelKind::kVae, ModelKind::kEmbedding})
    refresh(kind);
}

void ModelCatalog::refresh(ModelKind kind) {
  std::vector<CatalogEntry> fresh;
  scan(kind, &fresh);
  std::map<std::string, CatalogEntry> previous;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& e : entries_[kind]) previous.emplace(e.path, e);
  }
  std::vector<std::string> unhashed;
  for (auto& e : fresh) {
    const auto it = previous.find(e.path);
    if (it != previous.end() && it->second.bytes == e.bytes && it->second.mtime == e.mtime &&
        it->second.folder == e.folder && e.error.empty()) {
      // Unchanged: keep what was learnt (inspection, hash) instead of reading it again.
      const std::string name = e.name, error = e.error;
      e = it->second;
      e.name = name;
      if (!error.empty()) e.error = error;
    } else {
      inspect(&e);
    }
    if (e.sha256.empty() && !e.folder) {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto c = hash_cache_.find(
          e.kind == ModelKind::kLora && e.error.empty() ? e.path + "#after-header" : e.path);
      if (c != hash_cache_.end() && c->second.bytes == e.bytes && c->second.mtime == e.mtime)
        e.sha256 = c->second.sha256;
    }
    if (e.sha256.empty()) unhashed.push_back(e.path);
  }
  if (!options_.hash_in_background)
    for (auto& e : fresh)
      if (e.sha256.empty()) e.sha256 = hash(e);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_[kind] = std::move(fresh);
    if (options_.hash_in_background)
      for (auto& p : unhashed)
        if (std::find(to_hash_.begin(), to_hash_.end(), p) == to_hash_.end())
          to_hash_.push_back(std::move(p));
  }
  hash_cv_.notify_all();
  if (!options_.hash_in_background) save_hash_cache();
}

std::vector<CatalogEntry> ModelCatalog::list(ModelKind kind) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = entries_.find(kind);
  return it == entries_.end() ? std::vector<CatalogEntry>{} : it->second;
}

std::optional<CatalogEntry> ModelCatalog::find(ModelKind kind,
                                               const std::string& name_or_hash) const {
  std::string query = name_or_hash;
  while (!query.empty() && std::isspace(static_cast<unsigned char>(query.back()))) query.pop_back();
  while (!query.empty() && std::isspace(static_cast<unsigned char>(query.front())))
    query.erase(query.begin());
  if (query.empty()) return std::nullopt;
  // A1111's title: "name.safetensors [0123456789]".
  std::string title_hash;
  if (query.back() == ']') {
    const auto open = query.rfind(" [");
    if (open != std::string::npos) {
      title_hash = lower(query.substr(open + 2, query.size() - open - 3));
      query.resize(open);
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);  // scanned in place: lookups come with requests
  static const std::vector<CatalogEntry> kNone;
  const auto found = entries_.find(kind);
  const auto& entries = found == entries_.end() ? kNone : found->second;
  for (const auto& e : entries) {
    std::string model_name = e.name;
    std::replace(model_name.begin(), model_name.end(), '/', '_');
    if (e.name == query || e.file_name == query || model_name == query || e.path == query) return e;
  }
  for (const std::string& h : {title_hash, lower(query)}) {
    if (h.size() < 8 || !is_hex(h)) continue;
    const CatalogEntry* match = nullptr;
    for (const auto& e : entries)
      if (!e.sha256.empty() && e.sha256.compare(0, h.size(), h) == 0) {
        if (match) return std::nullopt;  // ambiguous
        match = &e;
      }
    if (match) return *match;
  }
  return std::nullopt;
}

std::optional<CatalogEntry> ModelCatalog::default_checkpoint(const std::string& preferred) const {
  if (!preferred.empty()) {
    auto e = find(ModelKind::kCheckpoint, preferred);
    if (e && e->error.empty()) return e;
  }
  for (const auto& e : list(ModelKind::kCheckpoint))
    if (e.error.empty()) return e;
  return std::nullopt;
}

bool ModelCatalog::wait_for_hashes(double timeout_s) const {
  std::unique_lock<std::mutex> lock(mutex_);
  return hashed_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s),
                             [&] { return to_hash_.empty() || stop_; });
}

void ModelCatalog::hash_loop() {
  for (;;) {
    std::string path;
    CatalogEntry entry;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      hash_cv_.wait(lock, [&] { return stop_ || !to_hash_.empty(); });
      if (stop_) return;
      path = to_hash_.front();
      bool found = false;
      for (const auto& [kind, list] : entries_)
        for (const auto& e : list)
          if (e.path == path) {
            entry = e;
            found = true;
          }
      if (!found) {
        to_hash_.pop_front();
        if (to_hash_.empty()) hashed_cv_.notify_all();
        continue;
      }
    }
    const std::string sha = hash(entry);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stop_) return;
      for (auto& [kind, list] : entries_)
        for (auto& e : list)
          if (e.path == path && e.bytes == entry.bytes && e.mtime == entry.mtime) e.sha256 = sha;
      if (!to_hash_.empty() && to_hash_.front() == path) to_hash_.pop_front();
    }
    save_hash_cache();
    if (!sha.empty())
      pipeline::log(pipeline::LogLevel::kInfo,
                    to_string(entry.kind) + " " + entry.name + ": hash " + sha.substr(0, 10));
    std::lock_guard<std::mutex> lock(mutex_);
    if (to_hash_.empty()) hashed_cv_.notify_all();
  }
}

std::string ModelCatalog::hash(const CatalogEntry& entry) {
  if (!entry.folder)
    return file_sha256(entry.path, entry.bytes, entry.mtime,
                       entry.kind == ModelKind::kLora && entry.error.empty());
  std::string lines;
  for (const auto& relative : weight_files(entry.path)) {
    const fs::path file = fs::path(entry.path) / relative;
    std::error_code ec;
    const std::string sha = file_sha256(file.string(), fs::file_size(file, ec), mtime_ns(file));
    if (sha.empty()) return "";
    lines += relative + " " + sha + "\n";
  }
  return lines.empty() ? "" : cache::sha256_hex(lines);
}

std::string ModelCatalog::file_sha256(const std::string& path, uint64_t bytes, int64_t mtime,
                                      bool after_header) {
  const std::string key = after_header ? path + "#after-header" : path;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = hash_cache_.find(key);
    if (it != hash_cache_.end() && it->second.bytes == bytes && it->second.mtime == mtime)
      return it->second.sha256;
  }
  const std::string hex = sha256_of_file(path, after_header, [this] {
    std::lock_guard<std::mutex> lock(mutex_);
    return stop_;
  });
  if (hex.empty()) return "";
  std::lock_guard<std::mutex> lock(mutex_);
  hash_cache_[key] = {bytes, mtime, hex};
  return hex;
}

void ModelCatalog::load_hash_cache() {
  if (hash_cache_path_.empty()) return;
  std::ifstream in(hash_cache_path_);
  if (!in) return;
  try {
    const auto j = nlohmann::json::parse(in);
    if (j.value("format", "") != "sdserve hashes 1") return;
    for (const auto& [path, v] : j.at("files").items()) {
      const std::string sha = v.at("sha256").get<std::string>();
      if (sha.size() != 64 || !is_hex(sha)) continue;
      hash_cache_[path] = {v.at("bytes").get<uint64_t>(), v.at("mtime").get<int64_t>(), sha};
    }
  } catch (const std::exception& e) {  // a broken cache is only a slower start
    pipeline::log(pipeline::LogLevel::kWarn,
                  "hash cache " + hash_cache_path_ + " ignored: " + e.what());
    hash_cache_.clear();
  }
}

void ModelCatalog::save_hash_cache() {
  if (hash_cache_path_.empty()) return;
  nlohmann::json j;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    j["format"] = "sdserve hashes 1";
    j["files"] = nlohmann::json::object();
    for (const auto& [path, h] : hash_cache_)
      j["files"][path] = {{"bytes", h.bytes}, {"mtime", h.mtime}, {"sha256", h.sha256}};
  }
  const std::string tmp = hash_cache_path_ + ".tmp";
  bool ok = false;
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (out) {
      out << j.dump(1) << "\n";
      ok = static_cast<bool>(out);
    }
  }
  std::error_code ec;
  if (ok) fs::rename(tmp, hash_cache_path_, ec);
  if (ok && !ec) return;
  fs::remove(tmp, ec);
  std::lock_guard<std::mutex> lock(mutex_);
  if (cache_write_warned_) return;
  cache_write_warned_ = true;
  pipeline::log(pipeline::LogLevel::kWarn, "cannot write the hash cache " + hash_cache_path_ +
                                               "; hashes are kept in memory only (set "
                                               "hash_cache to a writable file)");
}

}  // namespace sdserve::engine
