#include "onnx_initializers.h"

#include <fstream>
#include <iterator>

#include "pipo/runtime.h"

namespace pipo {
namespace {

// Field numbers from onnx.proto3.
constexpr uint32_t kModelGraph = 7;
constexpr uint32_t kGraphNode = 1, kGraphInitializer = 5;
constexpr uint32_t kNodeAttribute = 5, kAttributeGraph = 6, kAttributeGraphs = 11;
constexpr int kMaxDepth = 64;  // nested subgraphs
constexpr uint32_t kTensorDims = 1, kTensorDataType = 2, kTensorName = 8;
constexpr uint32_t kTensorExternalData = 13, kTensorDataLocation = 14;
constexpr uint32_t kEntryKey = 1, kEntryValue = 2;
constexpr uint64_t kLocationExternal = 1;

enum Wire { kVarint = 0, kFixed64 = 1, kLen = 2, kFixed32 = 5 };

// A view of one protobuf message; next() walks its fields.
class Reader {
 public:
  Reader(const uint8_t* p, const uint8_t* end, const std::string& where)
      : p_(p), end_(end), where_(where) {}

  bool next(uint32_t& field, int& wire) {
    if (p_ >= end_) return false;
    uint64_t key = varint();
    field = uint32_t(key >> 3);
    wire = int(key & 7);
    return true;
  }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) fail();
      uint8_t b = *p_++;
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    fail();
  }
  Reader sub() {
    uint64_t n = varint();
    if (n > uint64_t(end_ - p_)) fail();
    Reader r(p_, p_ + n, where_);
    p_ += n;
    return r;
  }
  std::string bytes() {
    Reader r = sub();
    return std::string(reinterpret_cast<const char*>(r.p_), size_t(r.end_ - r.p_));
  }
  bool at_end() const { return p_ >= end_; }
  const std::string& where() const { return where_; }
  void skip(int wire) {
    switch (wire) {
      case kVarint: varint(); break;
      case kFixed64: advance(8); break;
      case kLen: sub(); break;
      case kFixed32: advance(4); break;
      default: fail();
    }
  }
  [[noreturn]] void fail() const {
    throw Error(where_ + ": not a valid ONNX model (protobuf parse error)");
  }

 private:
  void advance(size_t n) {
    if (n > size_t(end_ - p_)) fail();
    p_ += n;
  }
  const uint8_t* p_;
  const uint8_t* end_;
  const std::string& where_;
};

// Plain decimal digits (no sign, space or suffix) that fit in 64 bits; std::stoull would wrap
// "-40960" to 2^64 - 40960.
bool parse_u64(const std::string& text, uint64_t& out) {
  if (text.empty() || text.size() > 20) return false;
  uint64_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    uint64_t d = uint64_t(c - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
  }
  out = v;
  return true;
}

// One TensorProto; returns false when it is not stored externally.
bool read_tensor(Reader r, ExternalInitializer& out) {
  uint64_t location = 0;
  uint32_t field;
  int wire;
  while (r.next(field, wire)) {
    if (field == kTensorDims && wire == kVarint) {
      out.dims.push_back(int64_t(r.varint()));
    } else if (field == kTensorDims && wire == kLen) {  // packed
      Reader packed = r.sub();
      while (!packed.at_end()) out.dims.push_back(int64_t(packed.varint()));
    } else if (field == kTensorDataType && wire == kVarint) {
      out.data_type = int32_t(r.varint());
    } else if (field == kTensorName && wire == kLen) {
      out.name = r.bytes();
    } else if (field == kTensorDataLocation && wire == kVarint) {
      location = r.varint();
    } else if (field == kTensorExternalData && wire == kLen) {
      Reader entry = r.sub();
      std::string key, value;
      uint32_t f;
      int w;
      while (entry.next(f, w)) {
        if (f == kEntryKey && w == kLen) key = entry.bytes();
        else if (f == kEntryValue && w == kLen) value = entry.bytes();
        else entry.skip(w);
      }
      if (key == "location") {
        out.location = value;
      } else if (key == "offset" || key == "length") {
        uint64_t v = 0;
        if (!parse_u64(value, v)) {
          throw Error(r.where() + ": external-data " + key + " '" + value.substr(0, 30) +
                      "' is not a decimal integer below 2^64; re-export");
        }
        (key == "offset" ? out.offset : out.length) = v;
        if (key == "length") out.has_length = true;
      }
    } else {
      r.skip(wire);
    }
  }
  if (location != kLocationExternal || out.location.empty()) return false;
  if (!out.has_length) {
    uint64_t n = element_size(out.data_type);
    for (int64_t d : out.dims) {
      if (d < 0 || __builtin_mul_overflow(n, uint64_t(d), &n)) r.fail();
    }
    out.length = n;
  }
  return true;
}

// GraphProto: external initializers of it and of every subgraph under its nodes.
void read_graph(Reader graph, bool top, int depth, std::vector<ExternalInitializer>& out) {
  if (depth > kMaxDepth) graph.fail();
  uint32_t field;
  int wire;
  while (graph.next(field, wire)) {
    if (field == kGraphInitializer && wire == kLen) {
      ExternalInitializer init;
      init.top_level = top;
      if (read_tensor(graph.sub(), init)) out.push_back(std::move(init));
    } else if (field == kGraphNode && wire == kLen) {
      Reader node = graph.sub();
      uint32_t nf;
      int nw;
      while (node.next(nf, nw)) {
        if (nf != kNodeAttribute || nw != kLen) {
          node.skip(nw);
          continue;
        }
        Reader attr = node.sub();
        uint32_t af;
        int aw;
        while (attr.next(af, aw)) {
          if ((af == kAttributeGraph || af == kAttributeGraphs) && aw == kLen) {
            read_graph(attr.sub(), false, depth + 1, out);
          } else {
            attr.skip(aw);
          }
        }
      }
    } else {
      graph.skip(wire);
    }
  }
}

}  // namespace

size_t element_size(int32_t data_type) {
  switch (data_type) {
    case 1: case 6: case 12: return 4;          // float, int32, uint32
    case 2: case 3: case 9: return 1;           // uint8, int8, bool
    case 4: case 5: case 10: case 16: return 2; // uint16, int16, float16, bfloat16
    case 7: case 11: case 13: return 8;         // int64, double, uint64
    default: return 0;
  }
}

std::vector<ExternalInitializer> external_initializers(const std::string& onnx_path) {
  std::ifstream in(onnx_path, std::ios::binary);
  if (!in) throw Error(onnx_path + ": cannot open for reading");
  std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<ExternalInitializer> out;
  Reader model(data.data(), data.data() + data.size(), onnx_path);
  uint32_t field;
  int wire;
  while (model.next(field, wire)) {
    if (field != kModelGraph || wire != kLen) {
      model.skip(wire);
      continue;
    }
    read_graph(model.sub(), true, 0, out);
  }
  return out;
}

}  // namespace pipo
