// Prompt embeddings as bytes, for caches outside the process (Redis), and the text encoder's
// fingerprint that keys them. A cached value is never trusted: every field of the header and the
// exact length are checked against this model before the bytes become a tensor.
#include <cstdio>
#include <cstring>

#include "pipeline/errors.h"
#include "pipeline/model_impl.h"

namespace sdserve::pipeline {
namespace {

// "SDEM", format version, dtype code, rank, then rank x int64 sizes, then the raw elements
// (little-endian, as the machines we run on). Version 2 (SDXL) appends the pooled embedding as
// a second (rank, sizes, elements) record; version 1 is the hidden state alone.
constexpr char kMagic[4] = {'S', 'D', 'E', 'M'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kVersionPooled = 2;

void put_tensor(std::string& out, const torch::Tensor& t);

// One (rank, sizes, elements) record of `expected` shape in `dtype`, checked and copied.
torch::Tensor take_tensor(std::string_view& in, const std::vector<int64_t>& expected,
                          torch::Dtype dtype, bool last);

uint8_t dtype_code(torch::Dtype d) {
  switch (d) {
    case torch::kFloat32:
      return 1;
    case torch::kFloat16:
      return 2;
    case torch::kBFloat16:
      return 3;
    default:
      throw ModelError("embeddings of dtype " + std::string(c10::toString(d)) +
                       " cannot be serialised");
  }
}

template <typename T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

template <typename T>
T take(std::string_view& in, const char* what) {
  if (in.size() < sizeof(T)) throw ModelError(std::string("embedding bytes: truncated ") + what);
  T v;
  std::memcpy(&v, in.data(), sizeof v);
  in.remove_prefix(sizeof v);
  return v;
}

// Two independent 64-bit lanes over 8-byte words (multiply + xor-shift mixing): fast enough to
// run over a text encoder's weights at load (hundreds of MB), and, unlike a pointer or a path,
// the same on every replica that loads the same weights. Not cryptographic: it identifies a
// model the operator chose; the cache keys built from it are SHA-256 digests.
struct WeightHash {
  uint64_t a = 0x9e3779b97f4a7c15ull, b = 0xc2b2ae3d27d4eb4full;
  static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
  }
  void word(uint64_t w) {
    a = mix(a ^ w) + 0x9e3779b97f4a7c15ull;
    b = mix(b + w * 0x87c37b91114253d5ull) ^ a;
  }
  void bytes(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      word(w);
    }
    uint64_t tail = 0;
    if (n > i) std::memcpy(&tail, p + i, n - i);  // never memcpy from a null (empty) buffer
    word(tail ^ (static_cast<uint64_t>(n) << 56));
  }
  void text(const std::string& s) { bytes(s.data(), s.size()); }
  std::string hex() const {
    char buf[33];
    std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(a),
                  static_cast<unsigned long long>(b));
    return buf;
  }
};

}  // namespace

std::string text_encoder_fingerprint(const ClipTextModel& encoder, const std::string& config) {
  WeightHash h;
  h.text(config);
  auto add = [&](const std::string& name, const torch::Tensor& t) {
    h.text(name);
    const auto cpu = t.detach().to(torch::kCPU).contiguous();
    h.text(c10::toString(cpu.scalar_type()));
    for (int64_t s : cpu.sizes()) h.word(static_cast<uint64_t>(s));
    h.bytes(cpu.data_ptr(), cpu.nbytes());
  };
  for (const auto& p : encoder->named_parameters()) add(p.key(), p.value());
  for (const auto& b : encoder->named_buffers()) add(b.key(), b.value());
  return h.hex();
}

size_t Model::embedding_size(const Embedding& embedding) {
  return embedding.hidden().nbytes() +
         (embedding.pooled().defined() ? embedding.pooled().nbytes() : 0);
}

std::string Model::embedding_to_bytes(const Embedding& embedding) const {
  const bool pooled = embedding.pooled().defined();
  std::string out(kMagic, sizeof kMagic);
  put(out, pooled ? kVersionPooled : kVersion);
  put(out, dtype_code(embedding.hidden().scalar_type()));
  put_tensor(out, embedding.hidden());
  if (pooled) put_tensor(out, embedding.pooled());
  return out;
}

EmbeddingPtr Model::embedding_from_bytes(std::string_view in) const {
  if (in.size() < sizeof kMagic || std::memcmp(in.data(), kMagic, sizeof kMagic) != 0)
    throw ModelError("embedding bytes: not an sdserve embedding");
  in.remove_prefix(sizeof kMagic);
  const bool pooled = static_cast<bool>(impl_->text_encoder_2);
  const uint32_t want_version = pooled ? kVersionPooled : kVersion;
  const auto version = take<uint32_t>(in, "header");
  if (version != want_version)
    throw ModelError("embedding bytes: format version " + std::to_string(version) + ", expected " +
                     std::to_string(want_version));
  const auto dtype = take<uint8_t>(in, "header");
  if (dtype != dtype_code(impl_->dtype))
    throw ModelError("embedding bytes: dtype code " + std::to_string(dtype) +
                     " is not the model's");
  // What this model's text encoders produce: (1, the tokenizer's context length x 1 to
  // kMaxPromptChunks chunks, hidden size), and for SDXL the pooled (1, projection width).
  int64_t width = impl_->text_encoder->config().hidden_size;
  if (pooled) width += impl_->text_encoder_2->config().hidden_size;
  const int64_t context = impl_->tokenizer->max_length();
  std::vector<int64_t> expected = {1, context, width};
  {
    // The chunk count comes from the header; checked before anything is allocated.
    std::string_view peek = in;
    if (take<uint8_t>(peek, "header") == 3) {
      take<int64_t>(peek, "shape");
      const auto length = take<int64_t>(peek, "shape");
      if (length > 0 && length % context == 0 && length / context <= kMaxPromptChunks)
        expected[1] = length;
    }
  }
  auto hidden = take_tensor(in, expected, impl_->dtype, !pooled);
  torch::Tensor pooled_tensor;
  if (pooled)
    pooled_tensor =
        take_tensor(in, {1, impl_->text_encoder_2->config().projection_dim}, impl_->dtype, true);
  return std::make_shared<Embedding>(hidden.to(impl_->device), pooled_tensor.defined()
                                                                   ? pooled_tensor.to(impl_->device)
                                                                   : torch::Tensor());
}

namespace {

void put_tensor(std::string& out, const torch::Tensor& t) {
  const auto cpu = t.to(torch::kCPU).contiguous();
  put(out, static_cast<uint8_t>(cpu.dim()));
  for (int64_t s : cpu.sizes()) put(out, s);
  out.append(static_cast<const char*>(cpu.data_ptr()), cpu.nbytes());
}

torch::Tensor take_tensor(std::string_view& in, const std::vector<int64_t>& expected,
                          torch::Dtype dtype, bool last) {
  const auto rank = take<uint8_t>(in, "header");
  if (rank != expected.size()) throw ModelError("embedding bytes: wrong rank");
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < rank; ++i) sizes.push_back(take<int64_t>(in, "shape"));
  if (sizes != expected) throw ModelError("embedding bytes: shape is not the model's");
  int64_t elements = 1;
  for (int64_t s : expected) elements *= s;
  const auto bytes = static_cast<size_t>(elements) * torch::elementSize(dtype);
  if (in.size() < bytes || (last && in.size() != bytes))
    throw ModelError("embedding bytes: " + std::to_string(in.size()) + " data bytes, expected " +
                     std::to_string(bytes));
  auto cpu = torch::empty(expected, torch::TensorOptions().dtype(dtype));
  std::memcpy(cpu.data_ptr(), in.data(), bytes);
  in.remove_prefix(bytes);
  if (!torch::isfinite(cpu.to(torch::kFloat32)).all().item<bool>())
    throw ModelError("embedding bytes: values are not finite");
  return cpu;
}

}  // namespace

}  // namespace sdserve::pipeline
