// The two ONNX Runtime sessions and one generation's device state.
//
// prefill() runs prefill_compress, decode() one decode_unfold step. Both run with IO binding:
// outputs are allocated by ONNX Runtime, and the present.<state> outputs of step n are bound,
// as the same OrtValues (no copy), as the past.<state> inputs of step n+1; the pair output is
// bound as the next input_pair. Sampling inputs are bound once per generation and the
// uniforms tensor is rewritten in place each step. Only pair and confidence are read on the
// host.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <onnxruntime_cxx_api.h>

#include "manifest.h"
#include "pipo/runtime.h"
#include "shared_weights.h"

namespace pipo {

// The sampling inputs of both graphs, in contract order (pipo_graphs.contract.SAMPLING_INPUTS),
// each [B]: temperature, top_k (int64), top_p, min_p, presence_penalty, repetition_penalty,
// threshold (float32).
struct SamplingFeeds {
  std::vector<float> temperature, top_p, min_p, presence_penalty, repetition_penalty, threshold;
  std::vector<int64_t> top_k;
  SamplingFeeds(const SamplingOptions& s, double threshold, size_t batch);
};

class Engine {
 public:
  Engine(const std::string& folder, const Manifest& manifest, const RuntimeOptions& options);
  ~Engine();

  // input_ids [B, T] int64 row-major (T even, right-padded with PAD), lengths [B] int64,
  // uniforms [B, 2] float32. Starts a generation; returns after the prefill step.
  void prefill(const std::vector<int64_t>& input_ids, int64_t batch, int64_t width,
               const std::vector<int64_t>& lengths, const SamplingFeeds& sampling,
               const std::vector<float>& uniforms);
  // One decode step on the states of the previous step; uniforms [B, 2] float32.
  void decode(const std::vector<float>& uniforms);

  const int64_t* pair() const;       // [B, 2] int64 of the last step
  const float* confidence() const;   // [B] float32 of the last step
  size_t shared_weight_bytes() const { return weights_ ? weights_->mapped_bytes() : 0; }

 private:
  void run(Ort::Session& session, Ort::IoBinding& io, const std::vector<std::string>& outputs,
           const std::string& file);
  void bind_fixed(Ort::IoBinding& io);
  void bind_empty_past(Ort::IoBinding& io);

  Ort::Env env_;
  Ort::MemoryInfo cpu_;
  std::unique_ptr<SharedWeights> weights_;  // declared before the sessions: outlives them
  std::unique_ptr<Ort::Session> prefill_, decode_;
  std::string prefill_file_, decode_file_;
  std::vector<std::string> prefill_outputs_, decode_outputs_;
  // contract 1.1: the prefill's past.<state> and next_token inputs (none under 1.0), which a
  // fresh prefill feeds empty: 0 cached slots, zeros, next_token -1
  struct ExtraInput {
    std::string name;
    ONNXTensorElementDataType type;
    std::vector<int64_t> shape;  // -1: symbolic (batch first, past_pairs)
  };
  std::vector<ExtraInput> prefill_extra_;
  std::vector<Ort::Value> empty_past_;  // bound during the prefill run

  // one generation's host buffers (bound by pointer) and the last step's outputs
  int64_t batch_ = 0;
  std::vector<int64_t> ids_, lengths_;
  std::unique_ptr<SamplingFeeds> sampling_;
  std::vector<float> uniforms_;
  std::vector<Ort::Value> fixed_;   // sampling inputs over sampling_, contract order
  Ort::Value uniforms_value_{nullptr};
  std::vector<std::string> last_names_;  // output names of the last step
  std::vector<Ort::Value> last_;         // output values of the last step
  int pair_index_ = -1, confidence_index_ = -1;
};

}  // namespace pipo
