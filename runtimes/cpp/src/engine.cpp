#include "engine.h"

#include <sys/stat.h>

#include <algorithm>

namespace pipo {
namespace {

const char* const kSamplingNames[] = {"temperature", "top_k", "top_p", "min_p",
                                      "presence_penalty", "repetition_penalty", "threshold"};
const std::string kPast = "past.", kPresent = "present.", kNextToken = "next_token";

std::vector<std::string> output_names(Ort::Session& s) {
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> names;
  for (size_t i = 0; i < s.GetOutputCount(); ++i) {
    names.push_back(s.GetOutputNameAllocated(i, alloc).get());
  }
  return names;
}

std::vector<std::string> input_names(Ort::Session& s) {
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> names;
  for (size_t i = 0; i < s.GetInputCount(); ++i) {
    names.push_back(s.GetInputNameAllocated(i, alloc).get());
  }
  return names;
}

// The graph's inputs must be exactly what the manifest (the contract) lists.
void check_io(Ort::Session& s, const GraphInfo& g, const std::string& file) {
  auto in = input_names(s), out = output_names(s);
  auto sorted = [](std::vector<std::string> v) { std::sort(v.begin(), v.end()); return v; };
  if (sorted(in) != sorted(g.inputs) || sorted(out) != sorted(g.outputs)) {
    throw Error(file + ": graph inputs/outputs differ from the manifest; re-export");
  }
}

}  // namespace

SamplingFeeds::SamplingFeeds(const SamplingOptions& s, double tau, size_t batch)
    : temperature(batch, float(s.temperature)), top_p(batch, float(s.top_p)),
      min_p(batch, float(s.min_p)), presence_penalty(batch, float(s.presence_penalty)),
      repetition_penalty(batch, float(s.repetition_penalty)), threshold(batch, float(tau)),
      top_k(batch, s.top_k) {}

Engine::Engine(const std::string& folder, const Manifest& manifest,
               const RuntimeOptions& options)
    : env_(ORT_LOGGING_LEVEL_ERROR, "pipo"),
      cpu_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)),
      prefill_file_(manifest.prefill.file), decode_file_(manifest.decode.file) {
  for (const std::string& file : {prefill_file_, decode_file_}) {
    struct stat st;
    if (stat((folder + "/" + file).c_str(), &st) != 0) {
      throw Error(folder + ": graph file " + file + " is missing; re-export");
    }
  }
  try {
    Ort::SessionOptions pre_opts, dec_opts;
    for (Ort::SessionOptions* so : {&pre_opts, &dec_opts}) {
      so->SetLogSeverityLevel(3);
      if (options.intra_op_threads > 0) so->SetIntraOpNumThreads(options.intra_op_threads);
    }
    OrtPrepackedWeightsContainer* prepacked = nullptr;
    if (options.share_weights) {
      weights_ = std::make_unique<SharedWeights>();
      weights_->add_to(folder, prefill_file_, pre_opts);
      weights_->add_to(folder, decode_file_, dec_opts);
      prepacked = weights_->prepacked();
    }
    std::string pre_path = folder + "/" + prefill_file_, dec_path = folder + "/" + decode_file_;
    if (prepacked) {
      prefill_ = std::make_unique<Ort::Session>(env_, pre_path.c_str(), pre_opts, prepacked);
      decode_ = std::make_unique<Ort::Session>(env_, dec_path.c_str(), dec_opts, prepacked);
    } else {
      prefill_ = std::make_unique<Ort::Session>(env_, pre_path.c_str(), pre_opts);
      decode_ = std::make_unique<Ort::Session>(env_, dec_path.c_str(), dec_opts);
    }
    if (weights_) weights_->release_pages();  // see SharedWeights::release_pages
  } catch (const Ort::Exception& e) {
    throw Error(folder + ": ONNX Runtime cannot load the graphs: " + e.what() +
                "; `pipo-export check` the folder or re-export it");
  }
  check_io(*prefill_, manifest.prefill, prefill_file_);
  check_io(*decode_, manifest.decode, decode_file_);
  prefill_outputs_ = output_names(*prefill_);
  decode_outputs_ = output_names(*decode_);
  auto prefill_inputs = input_names(*prefill_);
  for (size_t i = 0; i < prefill_inputs.size(); ++i) {
    const std::string& name = prefill_inputs[i];
    if (name.rfind(kPast, 0) != 0 && name != kNextToken) continue;
    Ort::TypeInfo type = prefill_->GetInputTypeInfo(i);  // owns the shape info below
    auto info = type.GetTensorTypeAndShapeInfo();
    prefill_extra_.push_back({name, info.GetElementType(), info.GetShape()});
  }
  auto decode_inputs = input_names(*decode_);
  for (const std::string& state : manifest.states) {  // every state goes out and back in
    for (auto* outs : {&prefill_outputs_, &decode_outputs_}) {
      if (std::find(outs->begin(), outs->end(), kPresent + state) == outs->end()) {
        throw Error(folder + ": a graph has no output " + kPresent + state + "; re-export");
      }
    }
  }
  for (auto* outs : {&prefill_outputs_, &decode_outputs_}) {
    for (const std::string& name : *outs) {
      if (name.rfind(kPresent, 0) != 0) continue;
      std::string past = kPast + name.substr(kPresent.size());
      if (std::find(decode_inputs.begin(), decode_inputs.end(), past) == decode_inputs.end()) {
        throw Error(decode_file_ + ": no input " + past + " for the state " + name);
      }
    }
  }
}

Engine::~Engine() {
  // states and bound buffers go before the sessions; the sessions before the shared weights
  last_.clear();
  fixed_.clear();
  prefill_.reset();
  decode_.reset();
  weights_.reset();
}

void Engine::bind_empty_past(Ort::IoBinding& io) {
  Ort::AllocatorWithDefaultOptions alloc;
  empty_past_.clear();
  for (const ExtraInput& in : prefill_extra_) {
    std::vector<int64_t> shape = in.shape;
    for (size_t d = 0; d < shape.size(); ++d) {
      if (shape[d] < 0) shape[d] = d == 0 ? batch_ : 0;  // batch, then past_pairs = 0
    }
    Ort::Value v = Ort::Value::CreateTensor(alloc, shape.data(), shape.size(), in.type);
    size_t count = v.GetTensorTypeAndShapeInfo().GetElementCount();
    if (in.name == kNextToken) {
      std::fill_n(v.GetTensorMutableData<int64_t>(), count, int64_t(-1));
    } else if (count) {
      size_t bytes = in.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL ? 1
                     : in.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? 2
                     : in.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? 8 : 4;
      std::fill_n(static_cast<char*>(v.GetTensorMutableRawData()), count * bytes, char(0));
    }
    io.BindInput(in.name.c_str(), v);
    empty_past_.push_back(std::move(v));
  }
}

void Engine::bind_fixed(Ort::IoBinding& io) {
  for (size_t i = 0; i < fixed_.size(); ++i) io.BindInput(kSamplingNames[i], fixed_[i]);
  io.BindInput("uniforms", uniforms_value_);
}

void Engine::run(Ort::Session& session, Ort::IoBinding& io,
                 const std::vector<std::string>& outputs, const std::string& file) {
  for (const std::string& name : outputs) io.BindOutput(name.c_str(), cpu_);
  try {
    session.Run(Ort::RunOptions{nullptr}, io);
  } catch (const Ort::Exception& e) {
    throw Error("ONNX Runtime failed running " + file + ": " + e.what() +
                "; `pipo-export check` the folder or re-export it");
  }
  last_ = io.GetOutputValues();  // the tensors ORT allocated; kept for the next step
  last_names_ = outputs;
  pair_index_ = confidence_index_ = -1;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (outputs[i] == "pair") pair_index_ = int(i);
    if (outputs[i] == "confidence") confidence_index_ = int(i);
  }
  if (pair_index_ < 0 || confidence_index_ < 0) {
    throw Error(file + ": graph has no pair/confidence output; re-export");
  }
}

void Engine::prefill(const std::vector<int64_t>& input_ids, int64_t batch, int64_t width,
                     const std::vector<int64_t>& lengths, const SamplingFeeds& sampling,
                     const std::vector<float>& uniforms) {
  batch_ = batch;
  ids_ = input_ids;
  lengths_ = lengths;
  sampling_ = std::make_unique<SamplingFeeds>(sampling);
  uniforms_ = uniforms;
  const int64_t ids_shape[2] = {batch, width}, row_shape[1] = {batch}, uni_shape[2] = {batch, 2};
  auto f32 = [&](std::vector<float>& v) {
    return Ort::Value::CreateTensor<float>(cpu_, v.data(), v.size(), row_shape, 1);
  };
  SamplingFeeds& s = *sampling_;
  fixed_.clear();
  fixed_.push_back(f32(s.temperature));
  fixed_.push_back(Ort::Value::CreateTensor<int64_t>(cpu_, s.top_k.data(), s.top_k.size(),
                                                     row_shape, 1));
  for (auto* v : {&s.top_p, &s.min_p, &s.presence_penalty, &s.repetition_penalty, &s.threshold}) {
    fixed_.push_back(f32(*v));
  }
  uniforms_value_ = Ort::Value::CreateTensor<float>(cpu_, uniforms_.data(), uniforms_.size(),
                                                    uni_shape, 2);
  Ort::Value ids = Ort::Value::CreateTensor<int64_t>(cpu_, ids_.data(), ids_.size(), ids_shape, 2);
  Ort::Value lens = Ort::Value::CreateTensor<int64_t>(cpu_, lengths_.data(), lengths_.size(),
                                                      row_shape, 1);
  Ort::IoBinding io(*prefill_);
  io.BindInput("input_ids", ids);
  io.BindInput("lengths", lens);
  bind_fixed(io);
  bind_empty_past(io);
  run(*prefill_, io, prefill_outputs_, prefill_file_);
  empty_past_.clear();
}

void Engine::decode(const std::vector<float>& uniforms) {
  if (last_.empty()) throw Error("decode before prefill");
  std::copy(uniforms.begin(), uniforms.end(), uniforms_.begin());  // in place: already bound
  // a fresh binding each step: ORT may write outputs into tensors still bound from a previous
  // run, and those are this step's inputs
  Ort::IoBinding io(*decode_);
  io.BindInput("input_pair", last_[size_t(pair_index_)]);
  for (size_t i = 0; i < last_names_.size(); ++i) {
    const std::string& name = last_names_[i];
    if (name.rfind(kPresent, 0) == 0) {
      io.BindInput((kPast + name.substr(kPresent.size())).c_str(), last_[i]);
    }
  }
  bind_fixed(io);
  run(*decode_, io, decode_outputs_, decode_file_);
}

const int64_t* Engine::pair() const {
  return last_.at(size_t(pair_index_)).GetTensorData<int64_t>();
}

const float* Engine::confidence() const {
  return last_.at(size_t(confidence_index_)).GetTensorData<float>();
}

}  // namespace pipo
