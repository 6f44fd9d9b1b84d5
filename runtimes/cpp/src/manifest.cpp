#include "manifest.h"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "folder.h"
#include "sha256.h"

namespace pipo {
namespace {

bool is_dir(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& path, uint64_t* size = nullptr) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  if (size) *size = uint64_t(st.st_size);
  return true;
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (auto& s : items) out += (out.empty() ? "'" : ", '") + s + "'";
  return "[" + out + "]";
}

// `required` keys and const/enum values (the subset of manifest.schema.json it uses).
void require(const Json& obj, const std::vector<std::string>& keys, const std::string& where) {
  obj.as_object(where);
  for (auto& k : keys) {
    if (!obj.has(k)) throw Error(where + ": missing '" + k + "'");
  }
}

void require_enum(const Json& obj, const std::string& key, const std::vector<std::string>& allowed,
                  const std::string& where) {
  const std::string& v = obj.at(key, where).as_string(where + "." + key);
  for (auto& a : allowed) {
    if (v == a) return;
  }
  throw Error(where + "." + key + " is '" + v + "', expected one of " + join(allowed));
}

std::vector<int64_t> int_list(const Json& v, const std::string& what) {
  std::vector<int64_t> out;
  for (auto& x : v.as_array(what)) out.push_back(x.as_int(what + " item"));
  return out;
}

GraphInfo graph_info(const Json& graphs, const char* name, const std::string& path) {
  if (!graphs.has(name)) throw Error(path + ": no graph '" + name + "'");
  std::string where = std::string("manifest.graphs.") + name;
  const Json& g = graphs.at(name, where);
  require(g, {"file", "inputs", "outputs"}, where);
  GraphInfo info;
  info.file = g.at("file", where).as_string(where + ".file");
  for (auto* list : {"inputs", "outputs"}) {
    for (auto& t : g.at(list, where).as_array(where + "." + list)) {
      require(t, {"name", "dtype", "shape"}, where + "." + list);
      auto& names = std::string(list) == "inputs" ? info.inputs : info.outputs;
      names.push_back(t.at("name", where).as_string(where + "." + list + " name"));
    }
  }
  return info;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": missing or cannot be read");
  std::stringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) throw Error(path + ": cannot be read");
  return text.str();
}

}  // namespace

std::string read_sealed(const std::string& path, const std::string& name) {
  std::string seal = path.substr(0, path.size() - name.size()) +
                     name.substr(0, name.rfind('.')) + ".sha256";
  std::string seal_name = seal.substr(seal.rfind('/') + 1);
  if (!is_file(seal)) {
    throw Error(seal + ": missing; " + name + " is only read with its checksum file " +
                seal_name + " beside it (re-export)");
  }
  std::string line = read_file(seal), data = read_file(path);
  std::string want = line.substr(0, line.find(' '));
  std::string body = line.size() && line.back() == '\n' ? line.substr(0, line.size() - 1) : line;
  if (want.size() != 64 || body != want + "  " + name) {
    throw Error(seal + ": not a sha256 line for " + name + " (corrupted); re-export");
  }
  Sha256 h;
  h.update(data.data(), data.size());
  if (h.hex_digest() != want) {
    throw Error(path + ": does not match its sha256 in " + seal_name +
                " (the file was changed or corrupted); re-export");
  }
  return data;
}

Manifest load_manifest(const std::string& folder, bool verify_files) {
  if (!is_dir(folder)) {
    throw Error(folder + ": no such folder (give a pipo-export export folder)");
  }
  std::string path = folder + "/manifest.json";
  if (!is_file(path)) {
    throw Error(folder + ": no manifest.json; not a pipo-export export folder "
                "(make one with: pipo-export export CKPT -o OUT)");
  }
  member_path(folder, "manifest.json", "file");
  if (is_file(folder + "/manifest.sha256")) member_path(folder, "manifest.sha256", "file");
  Json doc = Json::parse(read_sealed(path, "manifest.json"), path);
  if (!doc.is_object()) throw Error(path + ": not a JSON object; re-export");

  require(doc, {"format", "contract_version", "model", "export", "graphs", "states", "files"},
          "manifest");
  const std::string& format = doc.at("format", "manifest").as_string("manifest.format");
  if (format != "pipo-export") {
    throw Error("manifest.format is '" + format + "', expected 'pipo-export'");
  }
  Manifest m;
  m.model.contract_version = doc.at("contract_version", "manifest").as_string(
      "manifest.contract_version");
  const std::string& version = m.model.contract_version;
  std::string ours = kContractVersion;
  if (version.substr(0, version.find('.')) != ours.substr(0, ours.find('.'))) {
    throw Error(path + ": graph contract " + version + ", this runtime reads " + ours +
                "; re-export with this pipo-export version");
  }

  const Json& model = doc.at("model", "manifest");
  require(model, {"vocab_size", "hidden_size", "layer_types", "num_key_value_heads", "head_dim",
                  "pad_token_id", "eos_token_ids", "compressor_type", "max_context"},
          "manifest.model");
  for (auto& layer : model.at("layer_types", "manifest.model").as_array("layer_types")) {
    const std::string& kind = layer.as_string("manifest.model.layer_types item");
    if (kind != "linear_attention" && kind != "full_attention") {
      throw Error("manifest.model.layer_types has '" + kind +
                  "', expected one of ['linear_attention', 'full_attention']");
    }
  }
  m.model.vocab_size = model.at("vocab_size", "manifest.model").as_int("model.vocab_size");
  m.model.pad_token_id = model.at("pad_token_id", "manifest.model").as_int("model.pad_token_id");
  m.model.max_context = model.at("max_context", "manifest.model").as_int("model.max_context");
  m.model.eos_token_ids = int_list(model.at("eos_token_ids", "manifest.model"),
                                   "manifest.model.eos_token_ids");
  // the ranges pipo_graphs.manifest.Manifest.from_json checks, with its messages
  for (auto& [name, v] : {std::pair<const char*, int64_t>{"vocab_size", m.model.vocab_size},
                          {"max_context", m.model.max_context}}) {
    if (v < 1) {
      throw Error("manifest.model." + std::string(name) + " is " + std::to_string(v) +
                  ", expected >= 1");
    }
  }
  std::vector<int64_t> pad{m.model.pad_token_id};
  for (auto& [name, ids] : {std::pair<const char*, const std::vector<int64_t>*>{
                                "pad_token_id", &pad},
                            {"eos_token_ids", &m.model.eos_token_ids}}) {
    std::string outside;
    for (int64_t id : *ids) {
      if (id < 0 || id >= m.model.vocab_size) {
        outside += (outside.empty() ? "" : ", ") + std::to_string(id);
      }
    }
    if (!outside.empty()) {
      throw Error("manifest.model." + std::string(name) + " [" + outside +
                  "] outside the vocabulary [0, " + std::to_string(m.model.vocab_size) + ")");
    }
  }

  const Json& exp = doc.at("export", "manifest");
  require(exp, {"target", "dtype", "opset", "sample_cap", "tool_versions"},
          "manifest.export");
  require_enum(exp, "target", {"onnxruntime", "tensorrt"}, "manifest.export");
  require_enum(exp, "dtype", {"float32", "float16", "bfloat16"}, "manifest.export");
  m.model.target = exp.at("target", "manifest.export").as_string("manifest.export.target");

  const Json& graphs = doc.at("graphs", "manifest");
  graphs.as_object("manifest.graphs");
  m.prefill = graph_info(graphs, kPrefill, path);
  m.decode = graph_info(graphs, kDecode, path);

  for (auto& s : doc.at("states", "manifest").as_array("manifest.states")) {
    require(s, {"name", "dtype", "shape", "kind"}, "manifest.states");
    m.states.push_back(s.at("name", "manifest.states").as_string("manifest.states name"));
  }
  for (auto& [name, entry] : doc.at("files", "manifest").as_object("manifest.files")) {
    require(entry, {"sha256", "bytes"}, "manifest.files." + name);
    FileEntry f;
    f.sha256 = entry.at("sha256", name).as_string("manifest.files." + name + ".sha256");
    int64_t bytes = entry.at("bytes", name).as_int("manifest.files." + name + ".bytes");
    if (bytes < 0) {
      throw Error("manifest.files." + name + ".bytes is " + std::to_string(bytes) +
                  ", expected >= 0");
    }
    f.bytes = uint64_t(bytes);
    m.files[name] = f;
  }
  if (doc.has("weights") && !doc.at("weights", "manifest").is_null()) {
    const Json& w = doc.at("weights", "manifest");
    require(w, {"file"}, "manifest.weights");
    m.weights_file = w.at("file", "manifest.weights").as_string("manifest.weights.file");
  }
  if (verify_files) verify_checksums(folder, m);
  check_export_files(folder, m);  // paths, files-table coverage, external-data offsets
  return m;
}

void verify_checksums(const std::string& folder, const Manifest& manifest) {
  for (auto& [name, entry] : manifest.files) {
    std::string path = member_path(folder, name, "file");  // inside, regular
    uint64_t size = 0;
    is_file(path, &size);
    if (size != entry.bytes || sha256_file(path) != entry.sha256) {
      throw Error(folder + ": " + name + " does not match its sha256 in the manifest "
                  "(corrupted or swapped file); re-export");
    }
  }
}

}  // namespace pipo
