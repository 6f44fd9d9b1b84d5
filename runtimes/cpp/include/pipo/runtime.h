// pipo runtime: generate with a pipo-export export folder on ONNX Runtime (C++17).
//
//   pipo::Runtime runtime("out/");                       // checks manifest + sha256, loads
//   pipo::GenerateOptions opts;
//   opts.max_steps = 16;
//   pipo::GenerateResult r = runtime.generate({5, 17, 300}, opts);
//   // r.sequences[0].tokens, .pairs, .confidence, .finish_reason
//
// Semantics mirror the Python runtime (pipo_runtime.PipoSession): prompts are right-padded
// with PAD to one even length, step 0 is prefill_compress and step n the n-th decode_unfold,
// each step emits one pair (token1, token2) per row; the uniforms fed to the graphs come from
// the shared splitmix64 generator, so the same seed gives the same tokens as every backend.
// Errors (bad folder, manifest, checksums, requests) are thrown as pipo::Error.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace pipo {

// Every error the runtime reports: a clear, one-line message for the user.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Sampling settings; temperature 0 means greedy (the graphs apply them in this order:
// repetition/presence penalty, temperature, top-k, top-p, min-p, inverse-CDF selection).
struct SamplingOptions {
  double temperature = 0.0;
  int64_t top_k = 0;  // 0 disables
  double top_p = 1.0;
  double min_p = 0.0;
  double presence_penalty = 0.0;
  double repetition_penalty = 1.0;
};

// One request. Each row stops at EOS, a stop id, max_new_tokens user tokens, or after
// max_steps steps (prefill included). At least one of max_steps / max_new_tokens is required.
struct GenerateOptions {
  std::optional<int64_t> max_steps;
  std::optional<int64_t> max_new_tokens;
  double threshold = -1.0;  // confidence gate tau: < 0 always keep token2, >= 1 never
  SamplingOptions sampling;
  uint64_t seed = 0;
  int64_t seq_offset = 0;  // row r draws the random stream of sequence index seq_offset + r
  std::vector<int64_t> stop_token_ids;
};

// Reported as confidence when the gate was off (threshold >= 1: the head did not run).
constexpr float kSkippedConfidence = -1.0f;

struct SequenceResult {
  std::vector<std::array<int64_t, 2>> pairs;  // raw pairs per step, PAD included
  std::vector<float> confidence;              // one per step; kSkippedConfidence when skipped
  std::vector<int64_t> tokens;                // user tokens: PAD removed, cut at EOS/stop
  std::string finish_reason;                  // "eos", "stop" or "length"
  int64_t commits = 0;                        // pairs whose token2 was kept (not PAD)
  int64_t prefill_tokens = 0;                 // user tokens the prefill step emitted
  double commit_rate() const { return pairs.empty() ? 0.0 : double(commits) / pairs.size(); }
};

struct GenerateResult {
  std::vector<SequenceResult> sequences;  // one per prompt, in order
  double ttft_ms = 0;                     // request start to the first pair (prefill)
  double decode_ms = 0;                   // all decode steps
  int64_t steps = 0;                      // steps run, prefill included
  double ms_per_step() const;             // decode_ms / (steps - 1)
  double ms_per_token() const;            // decode_ms / user tokens emitted by decode steps
};

// Streaming: called after each step for each row that gained user tokens.
struct StreamEvent {
  int64_t row;
  std::vector<int64_t> tokens;  // user tokens this step added to the row
  int64_t step;                 // 0 = prefill
};
using StreamCallback = std::function<void(const StreamEvent&)>;

struct RuntimeOptions {
  int intra_op_threads = 0;      // 0: ONNX Runtime's default
  bool verify_checksums = true;  // sha256 of every file listed in the manifest
  // Map weights.data once and give both sessions the same initializer tensors (plus one
  // prepacked-weights container); false lets each session load its own copy.
  bool share_weights = true;
};

// What the manifest says about the model.
struct ModelInfo {
  int64_t vocab_size = 0;
  int64_t pad_token_id = 0;
  int64_t max_context = 0;
  std::vector<int64_t> eos_token_ids;
  std::string contract_version;
  std::string target;  // "onnxruntime" or "tensorrt"
};

class Runtime {
 public:
  // Loads folder/manifest.json, checks it, creates the prefill and decode sessions.
  explicit Runtime(const std::string& folder, const RuntimeOptions& options = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // One prompt (token ids); the result holds one sequence. on_step streams user tokens.
  GenerateResult generate(const std::vector<int64_t>& prompt, const GenerateOptions& options,
                          const StreamCallback& on_step = nullptr);
  // A batch of prompts of any lengths >= 1, run together (one row each).
  GenerateResult generate_batch(const std::vector<std::vector<int64_t>>& prompts,
                                const GenerateOptions& options,
                                const StreamCallback& on_step = nullptr);

  const ModelInfo& model() const;
  // Bytes of weights.data mapped once and shared by both sessions (0 when not shared).
  size_t shared_weight_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pipo
