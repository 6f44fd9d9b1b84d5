// Lists the initializers an ONNX model keeps in external data files, by reading just enough of
// the protobuf wire format (ModelProto.graph.initializer); no protobuf library needed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pipo {

struct ExternalInitializer {
  std::string name;
  int32_t data_type = 0;      // ONNX TensorProto.DataType (= ONNXTensorElementDataType)
  std::vector<int64_t> dims;  // the tensor's shape
  std::string location;       // external data file, relative to the model's folder
  uint64_t offset = 0;        // byte offset in that file
  uint64_t length = 0;        // byte length (computed from dims when the model omits it)
  bool has_length = false;    // the model gave `length`
  bool top_level = true;      // in the main graph (false: an If/Loop/Scan body)
};

// Byte size of one element of an ONNX data type; 0 for types this reader does not handle
// (strings, sub-byte types).
size_t element_size(int32_t data_type);

// Initializers of `onnx_path` stored externally (data_location EXTERNAL), subgraphs (If, Loop,
// Scan bodies) included (top_level false). Offsets and lengths must be plain decimal digits
// that fit in 64 bits (a sign, a space or an overflow is a parse error).
// Throws pipo::Error when the file cannot be read or is not a valid ModelProto.
std::vector<ExternalInitializer> external_initializers(const std::string& onnx_path);

}  // namespace pipo
