// Whole safetensors files (8-byte little-endian header length, JSON header, data) through
// pipeline::SafetensorsFile::open(), which only takes a path: the input is written to a memfd and
// opened as /proc/self/fd/N. Documented: ModelError. Properties: every tensor's byte count
// matches its shape and dtype and lies inside the file's data section, and its bytes are
// readable.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "finding.h"
#include "pipeline/errors.h"
#include "pipeline/io/safetensors.h"

namespace {

int memfd() {
  static const int fd = [] {
    const int fd = ::memfd_create("fuzz_safetensors", MFD_CLOEXEC);
    if (fd < 0) finding("memfd_create failed");
    return fd;
  }();
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = memfd();
  if (::ftruncate(fd, 0) != 0) finding("ftruncate failed");
  for (size_t done = 0; done < size;) {
    const ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) finding("pwrite failed");
    done += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);

  std::shared_ptr<sdserve::pipeline::SafetensorsFile> file;
  try {
    file = sdserve::pipeline::SafetensorsFile::open(path);
  } catch (const sdserve::pipeline::ModelError&) {
    return 0;
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  const uint64_t data_size = size - 8 - header_len;  // open() checked header_len <= size - 8
  unsigned sum = 0;
  for (const auto& [name, t] : file->tensors()) {
    uint64_t numel = 1;
    for (const int64_t d : t.shape) {
      if (d < 0) finding("tensor '" + name + "' has a negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    if (t.shape.size() > 8) finding("tensor '" + name + "' has more than 8 dimensions");
    if (numel * sdserve::pipeline::dtype_size(t.dtype) != t.nbytes)
      finding("tensor '" + name + "' has a byte count that does not match its shape");
    if (t.nbytes > data_size) finding("tensor '" + name + "' is larger than the data section");
    if (t.nbytes > 0) {
      const auto* p = reinterpret_cast<const unsigned char*>(t.data);
      sum += p[0] + p[t.nbytes - 1];  // faults if the view points outside the mapping
    }
    (void)file->at(name);
  }
  const std::string absent = "\x01not a tensor";
  if (!file->contains(absent)) {
    try {
      (void)file->at(absent);
      finding("at() found a tensor that does not exist");
    } catch (const sdserve::pipeline::ModelError&) {
    }
  }
  for (const auto& [k, v] : file->metadata()) sum += static_cast<unsigned>(k.size() + v.size());
  volatile unsigned sink = sum;
  (void)sink;
  return 0;
}
