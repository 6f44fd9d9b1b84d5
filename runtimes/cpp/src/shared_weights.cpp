#include "shared_weights.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "onnx_initializers.h"
#include "pipo/runtime.h"

namespace pipo {

MappedFile::MappedFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    throw Error(path + ": cannot stat");
  }
  size_ = size_t(st.st_size);
  if (size_) {
    // PROT_WRITE + MAP_PRIVATE: ORT takes non-const buffers; pages stay the file's (shared page
    // cache) unless written, which ORT never does to initializers.
    void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      close(fd);
      throw Error(path + ": cannot map into memory (" + std::strerror(errno) + ")");
    }
    data_ = static_cast<uint8_t*>(p);
  }
  close(fd);
}

MappedFile::~MappedFile() {
  if (data_) munmap(data_, size_);
}

SharedWeights::SharedWeights()
    : cpu_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
  Ort::ThrowOnError(Ort::GetApi().CreatePrepackedWeightsContainer(&prepacked_));
}

SharedWeights::~SharedWeights() {
  values_.clear();
  if (prepacked_) Ort::GetApi().ReleasePrepackedWeightsContainer(prepacked_);
}

void MappedFile::release_pages() {
  if (data_) madvise(data_, size_, MADV_DONTNEED);
}

void SharedWeights::release_pages() {
  for (auto& [name, file] : files_) file->release_pages();
}

size_t SharedWeights::mapped_bytes() const {
  size_t n = 0;
  for (auto& [name, file] : files_) n += file->size();
  return n;
}

void SharedWeights::add_to(const std::string& folder, const std::string& onnx_file,
                           Ort::SessionOptions& options) {
  for (const ExternalInitializer& init : external_initializers(folder + "/" + onnx_file)) {
    size_t elem = element_size(init.data_type);
    if (!init.top_level) continue;  // subgraph initializers: ORT loads them (checked at load)
    if (elem == 0 || init.location.find('/') != std::string::npos) {
      throw Error(folder + "/" + onnx_file + ": initializer " + init.name +
                  " has an external-data location or type this runtime does not map; re-export");
    }
    auto file_it = files_.find(init.location);
    if (file_it == files_.end()) {
      file_it = files_.emplace(init.location,
                               std::make_unique<MappedFile>(folder + "/" + init.location)).first;
    }
    MappedFile& file = *file_it->second;
    uint64_t bytes = elem;
    bool overflow = false;
    for (int64_t d : init.dims) {
      overflow = overflow || d < 0 || __builtin_mul_overflow(bytes, uint64_t(d), &bytes);
    }
    // offset + length <= size, in a form that cannot wrap (offsets are untrusted 64-bit values)
    if (overflow || bytes != init.length || init.offset > file.size() ||
        init.length > file.size() - init.offset) {
      throw Error(folder + "/" + onnx_file + ": initializer " + init.name + " points outside " +
                  init.location + " or has the wrong length; re-export");
    }
    if (init.offset % elem != 0) continue;  // misaligned for its type: let ORT copy it
    Key key{init.location, init.offset, init.length, init.data_type, init.dims};
    auto it = values_.find(key);
    if (it == values_.end()) {
      Ort::Value v = Ort::Value::CreateTensor(
          cpu_, file.data() + init.offset, init.length, init.dims.data(), init.dims.size(),
          static_cast<ONNXTensorElementDataType>(init.data_type));
      it = values_.emplace(std::move(key), std::move(v)).first;
    }
    options.AddInitializer(init.name.c_str(), it->second);
  }
}

}  // namespace pipo
