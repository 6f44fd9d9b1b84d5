// Which files of an export folder the runtime may open (as pipo_graphs.members and
// pipo_runtime.folder): a name from the manifest is a plain relative path (not absolute, no
// "..", "." or empty parts) whose target, symlinks resolved, is a regular file inside the folder
// (or, for a Hugging Face cache snapshot models--X/snapshots/REV, inside models--X/blobs); the
// files table covers both graphs and the weights file; every external-data reference points
// into the sealed weights file with its exact length, in 64-bit arithmetic that cannot wrap,
// at an aligned offset, one region per tensor and no overlaps (the exporter's layout).
#pragma once

#include <string>

#include "manifest.h"

namespace pipo {

constexpr uint64_t kWeightsAlign = 4096;  // pipo_graphs.contract.WEIGHTS_ALIGN

// Throws pipo::Error unless `name` is a plain relative path.
void check_name(const std::string& name, const std::string& what);

// The resolved path of folder/name once it is a regular file inside the folder.
std::string member_path(const std::string& folder, const std::string& name,
                        const std::string& what);

// The files-table coverage, path and external-data checks above (the checksums are
// verify_checksums'). Throws pipo::Error.
void check_export_files(const std::string& folder, const Manifest& manifest);

}  // namespace pipo
