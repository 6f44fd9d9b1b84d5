#include "folder.h"

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <map>
#include <utility>
#include <vector>

#include "onnx_initializers.h"

namespace pipo {
namespace {

std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  if (!realpath(path.c_str(), buf)) return "";
  return buf;
}

std::string base_name(const std::string& path) {
  return path.substr(path.rfind('/') == std::string::npos ? 0 : path.rfind('/') + 1);
}

std::string parent(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos || slash == 0 ? "/" : path.substr(0, slash);
}

bool inside(const std::string& path, const std::string& root) {
  return !root.empty() && path.size() > root.size() && path.compare(0, root.size(), root) == 0 &&
         (root == "/" || path[root.size()] == '/');
}

}  // namespace

void check_name(const std::string& name, const std::string& what) {
  bool ok = !name.empty() && name[0] != '/' && name.find('\\') == std::string::npos &&
            name.find('\0') == std::string::npos;
  size_t start = 0;
  while (ok && start <= name.size()) {
    size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    std::string part = name.substr(start, end - start);
    ok = !part.empty() && part != "." && part != "..";
    start = end + 1;
  }
  if (!ok) {
    throw Error("manifest " + what + " '" + name + "' is not a plain relative path inside the "
                "export folder (absolute, '..' or empty); re-export");
  }
}

std::string member_path(const std::string& folder, const std::string& name,
                        const std::string& what) {
  check_name(name, what);
  std::string path = folder + "/" + name;
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    throw Error(folder + ": " + what + " " + name + " listed in the manifest is missing; "
                "re-export");
  }
  std::string target = real_path(path), root = real_path(folder);
  if (target.empty()) {
    throw Error(folder + ": " + what + " " + name + " cannot be resolved (a broken symlink or "
                "a loop); re-export");
  }
  std::string snapshots = parent(root);
  bool hub = base_name(snapshots) == "snapshots" &&
             base_name(parent(snapshots)).rfind("models--", 0) == 0;
  if (!inside(target, root) && !(hub && inside(target, parent(snapshots) + "/blobs"))) {
    throw Error(folder + ": " + what + " " + name + " is a symlink to " + target +
                ", outside the export folder; copy the file into the folder");
  }
  if (stat(target.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    throw Error(folder + ": " + what + " " + name + " is not a regular file; re-export");
  }
  return target;
}

void check_export_files(const std::string& folder, const Manifest& m) {
  for (auto& [name, entry] : m.files) check_name(name, "files entry");
  std::vector<std::pair<std::string, std::string>> needed = {
      {m.prefill.file, std::string("graph ") + kPrefill},
      {m.decode.file, std::string("graph ") + kDecode}};
  if (!m.weights_file.empty()) needed.push_back({m.weights_file, "weights file"});
  for (auto& [name, what] : needed) {
    check_name(name, what);
    if (!m.files.count(name)) {
      throw Error(folder + ": the manifest's files table does not list the " + what + " " +
                  name + ", so its checksum is unknown; re-export");
    }
  }
  if (m.prefill.file == m.decode.file) {
    throw Error(folder + ": both graphs name the file " + m.prefill.file + "; re-export");
  }
  std::map<std::string, std::pair<uint64_t, uint64_t>> by_name;  // tensor -> (offset, length)
  std::map<std::pair<uint64_t, uint64_t>, std::string> by_region;
  for (const GraphInfo* g : {&m.prefill, &m.decode}) {
    std::string graph = member_path(folder, g->file, "graph file");
    uint64_t size = 0;
    bool sized = false;
    for (const ExternalInitializer& init : external_initializers(graph)) {
      std::string where = g->file + ": initializer '" + init.name + "'";
      check_name(init.location, "external-data location of " + g->file);
      if (m.weights_file.empty() || init.location != m.weights_file) {
        throw Error(where + " points into '" + init.location + "', not the manifest's weights "
                    "file; re-export");
      }
      if (!sized) {
        struct stat st;
        std::string weights = member_path(folder, m.weights_file, "weights file");
        if (stat(weights.c_str(), &st) != 0) throw Error(weights + ": cannot stat");
        size = uint64_t(st.st_size);
        sized = true;
      }
      uint64_t bytes = element_size(init.data_type);
      if (bytes == 0) {
        throw Error(where + " has ONNX data type " + std::to_string(init.data_type) +
                    ", which no export writes; re-export");
      }
      bool overflow = false;
      for (int64_t d : init.dims) {
        overflow = overflow || d < 0 || __builtin_mul_overflow(bytes, uint64_t(d), &bytes);
      }
      // offset + length <= size, written so that it cannot wrap
      if (overflow || bytes != init.length || init.offset > size ||
          init.length > size - init.offset || init.offset % kWeightsAlign != 0) {
        throw Error(where + " points outside " + init.location + ", off its " +
                    std::to_string(kWeightsAlign) + "-byte alignment or has the wrong length "
                    "(offset " + std::to_string(init.offset) + ", length " +
                    std::to_string(init.length) + ", file " + std::to_string(size) +
                    " bytes); re-export");
      }
      // the exporter's layout (pipo_runtime.folder.check_layout): one region per tensor name,
      // one name per region, no overlaps
      auto region = std::make_pair(init.offset, init.length);
      auto named = by_name.emplace(init.name, region).first;
      if (named->second != region) {
        throw Error(where + " is stored at offset " + std::to_string(init.offset) +
                    ", the other graph reads it at " + std::to_string(named->second.first) +
                    "; re-export");
      }
      auto owner = by_region.emplace(region, init.name).first;
      if (owner->second != init.name) {
        throw Error(where + " and '" + owner->second + "' share the bytes at " +
                    std::to_string(init.offset) + " of " + init.location + "; re-export");
      }
    }
  }
  uint64_t end = 0;
  for (auto& [region, name] : by_region) {
    if (region.first < end) {
      throw Error(m.weights_file + ": two stored tensors overlap at byte " +
                  std::to_string(region.first) + " (not the layout an export writes); re-export");
    }
    end = region.first + region.second;  // <= size: checked above
  }
}

}  // namespace pipo
