// Weights shared by the prefill and decode sessions.
//
// Each external data file (weights.data) is memory-mapped once. Every distinct region an
// initializer points to becomes one Ort::Value over the mapping (no copy), handed to each
// session with SessionOptions::AddInitializer; both sessions are then created with one
// OrtPrepackedWeightsContainer so that the packed copies ONNX Runtime makes of shared
// weights for its GEMM kernels are also made once. Must outlive the sessions.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <onnxruntime_cxx_api.h>

namespace pipo {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // read-only data, private copy-on-write map
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  void release_pages();  // MADV_DONTNEED: unmapped pages re-read from the file when touched

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

class SharedWeights {
 public:
  SharedWeights();
  ~SharedWeights();
  SharedWeights(const SharedWeights&) = delete;
  SharedWeights& operator=(const SharedWeights&) = delete;

  // Register the external initializers of folder/onnx_file with `options` (AddInitializer).
  void add_to(const std::string& folder, const std::string& onnx_file,
              Ort::SessionOptions& options);
  OrtPrepackedWeightsContainer* prepacked() const { return prepacked_; }
  // Once the sessions exist: drop the mapped pages from this process (they are clean file
  // pages). Weights ONNX Runtime prepacked are never read again; the others fault back in
  // from the page cache on first use.
  void release_pages();
  size_t mapped_bytes() const;
  size_t tensors() const { return values_.size(); }

 private:
  // (file, offset, length, data_type, dims) of one region; regions are deduplicated on it
  using Key = std::tuple<std::string, uint64_t, uint64_t, int32_t, std::vector<int64_t>>;
  std::map<std::string, std::unique_ptr<MappedFile>> files_;
  std::map<Key, Ort::Value> values_;
  OrtPrepackedWeightsContainer* prepacked_ = nullptr;
  Ort::MemoryInfo cpu_;
};

}  // namespace pipo
