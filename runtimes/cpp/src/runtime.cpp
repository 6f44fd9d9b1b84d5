// pipo::Runtime: manifest + engine + the generation loop (pipo_runtime.PipoSession.stream).
#include "pipo/runtime.h"

#include <algorithm>
#include <chrono>
#include <set>

#include "engine.h"
#include "manifest.h"
#include "rng.h"
#include "semantics.h"

namespace pipo {

struct Runtime::Impl {
  std::string folder;
  Manifest manifest;
  std::unique_ptr<Engine> engine;
};

Runtime::Runtime(const std::string& folder, const RuntimeOptions& options)
    : impl_(std::make_unique<Impl>()) {
  impl_->folder = folder;
  impl_->manifest = load_manifest(folder, options.verify_checksums);
  impl_->engine = std::make_unique<Engine>(folder, impl_->manifest, options);
}

Runtime::~Runtime() = default;

const ModelInfo& Runtime::model() const { return impl_->manifest.model; }

size_t Runtime::shared_weight_bytes() const { return impl_->engine->shared_weight_bytes(); }

double GenerateResult::ms_per_step() const {
  return decode_ms / double(std::max<int64_t>(steps - 1, 1));
}

double GenerateResult::ms_per_token() const {
  int64_t later = 0;
  for (auto& s : sequences) later += int64_t(s.tokens.size()) - s.prefill_tokens;
  return decode_ms / double(std::max<int64_t>(later, 1));
}

GenerateResult Runtime::generate(const std::vector<int64_t>& prompt,
                                 const GenerateOptions& options, const StreamCallback& on_step) {
  return generate_batch(std::vector<std::vector<int64_t>>{prompt}, options, on_step);
}

GenerateResult Runtime::generate_batch(const std::vector<std::vector<int64_t>>& prompts,
                                       const GenerateOptions& options,
                                       const StreamCallback& on_step) {
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  };
  const ModelInfo& model = impl_->manifest.model;
  int64_t steps = request_steps(options);
  validate_sampling(options.sampling);
  check_request(model, prompts, steps);
  for (int64_t id : options.stop_token_ids) {
    if (id < 0 || id >= model.vocab_size) {
      throw Error("stop token ids [" + std::to_string(id) + "] are outside the vocabulary [0, " +
                  std::to_string(model.vocab_size) + ")");
    }
  }

  std::vector<int64_t> ids, lengths;
  int64_t width = pack_prompts(prompts, model.pad_token_id, ids, lengths);
  const int64_t batch = int64_t(prompts.size());
  std::vector<int64_t> seqs;
  for (int64_t r = 0; r < batch; ++r) seqs.push_back(options.seq_offset + r);
  SamplingFeeds sampling(options.sampling, options.threshold, size_t(batch));
  std::set<int64_t> eos(model.eos_token_ids.begin(), model.eos_token_ids.end());
  std::set<int64_t> stop(options.stop_token_ids.begin(), options.stop_token_ids.end());
  std::vector<float> uniforms(size_t(batch) * 2);

  GenerateResult result;
  result.sequences.resize(size_t(batch));
  Engine& engine = *impl_->engine;
  auto start = Clock::now();
  step_uniforms(options.seed, seqs, 0, uniforms.data());
  engine.prefill(ids, batch, width, lengths, sampling, uniforms);
  result.ttft_ms = ms_since(start);

  for (int64_t step = 0; step < steps; ++step) {
    if (step) {
      auto t = Clock::now();
      step_uniforms(options.seed, seqs, uint64_t(step), uniforms.data());
      engine.decode(uniforms);
      result.decode_ms += ms_since(t);
    }
    result.steps = step + 1;
    const int64_t* pair = engine.pair();        // [B, 2]
    const float* conf = engine.confidence();    // [B]
    bool all_done = true;
    for (int64_t row = 0; row < batch; ++row) {
      SequenceResult& out = result.sequences[size_t(row)];
      if (out.finish_reason.empty()) {
        std::vector<int64_t> added = add_pair(out, pair[2 * row], pair[2 * row + 1], conf[row],
                                              model.pad_token_id, eos, stop);
        limit_new_tokens(out, added, options);
        if (step == 0) out.prefill_tokens = int64_t(out.tokens.size());
        if (on_step && !added.empty()) on_step(StreamEvent{row, added, step});
      }
      all_done = all_done && !out.finish_reason.empty();
    }
    if (all_done) break;
  }
  for (auto& out : result.sequences) {
    if (out.finish_reason.empty()) out.finish_reason = "length";
  }
  return result;
}

}  // namespace pipo
