// manifest.json of an export folder: schema subset, contract version, file checksums.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "json.h"
#include "pipo/runtime.h"

namespace pipo {

constexpr const char* kContractVersion = "1.1";  // pipo_graphs.contract.CONTRACT_VERSION
constexpr const char* kPrefill = "prefill_compress";
constexpr const char* kDecode = "decode_unfold";

struct FileEntry {
  std::string sha256;
  uint64_t bytes = 0;
};

struct GraphInfo {
  std::string file;
  std::vector<std::string> inputs;   // names, graph order
  std::vector<std::string> outputs;
};

struct Manifest {
  ModelInfo model;
  GraphInfo prefill, decode;
  std::vector<std::string> states;  // state names ("conv.0", ..., "output_mask")
  std::map<std::string, FileEntry> files;
  std::string weights_file;  // manifest.weights.file ("" when the export has none)
};

// The bytes of `path` (whose file name is `name`, e.g. manifest.json) once they match the
// sha256 in its seal file (manifest.sha256, `sha256sum -c` format), as
// pipo_graphs.manifest.read_sealed; throws pipo::Error when the seal is missing, malformed or
// different.
std::string read_sealed(const std::string& path, const std::string& name);

// Read and check folder/manifest.json (sealed by manifest.sha256) like
// pipo_graphs.manifest.load_manifest: required keys,
// consts/enums, contract major version, both graphs, and (verify_files) that every listed
// file exists with its recorded size and sha256. Throws pipo::Error.
Manifest load_manifest(const std::string& folder, bool verify_files);

// The sha256/size check alone.
void verify_checksums(const std::string& folder, const Manifest& manifest);

}  // namespace pipo
