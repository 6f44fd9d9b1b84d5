#include "semantics.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <sstream>

namespace pipo {
namespace {

std::string fmt(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

int64_t pack_prompts(const std::vector<std::vector<int64_t>>& prompts, int64_t pad_id,
                     std::vector<int64_t>& input_ids, std::vector<int64_t>& lengths) {
  size_t longest = 0;
  for (auto& p : prompts) {
    if (p.empty()) throw Error("empty prompt: every prompt needs at least one token");
    longest = std::max(longest, p.size());
  }
  if (prompts.empty()) throw Error("no prompt: give at least one prompt");
  int64_t width = int64_t(longest + longest % 2);
  input_ids.assign(prompts.size() * size_t(width), pad_id);
  lengths.clear();
  for (size_t row = 0; row < prompts.size(); ++row) {
    std::copy(prompts[row].begin(), prompts[row].end(), input_ids.begin() + row * size_t(width));
    lengths.push_back(int64_t(prompts[row].size()));
  }
  return width;
}

int64_t request_steps(const GenerateOptions& o) {
  if (!std::isfinite(o.threshold)) {
    throw Error("threshold must be a finite number, got " + fmt(o.threshold));
  }
  if (o.seq_offset < 0) throw Error("seq_offset must be >= 0, got " + fmt(double(o.seq_offset)));
  if (!o.max_steps && !o.max_new_tokens) throw Error("give max_steps or max_new_tokens");
  if (o.max_new_tokens && *o.max_new_tokens < 1) throw Error("max_new_tokens must be >= 1");
  if (o.max_steps && *o.max_steps < 1) throw Error("max_steps must be >= 1");
  const int64_t unset = int64_t(1) << 30;
  // >= 1 user token per step unless PAD, so max_new_tokens steps always suffice
  return std::min(o.max_steps.value_or(unset), o.max_new_tokens.value_or(unset));
}

void validate_sampling(const SamplingOptions& s) {
  const std::pair<const char*, double> values[] = {
      {"temperature", s.temperature}, {"top_p", s.top_p}, {"min_p", s.min_p},
      {"presence_penalty", s.presence_penalty}, {"repetition_penalty", s.repetition_penalty}};
  for (auto& [name, v] : values) {  // NaN and infinities, as pipo_graphs.SamplingParams
    if (!std::isfinite(v)) throw Error(std::string(name) + " must be a finite number, got " + fmt(v));
  }
  if (!(s.temperature >= 0)) {
    throw Error("temperature must be >= 0 (0 = greedy), got " + fmt(s.temperature));
  }
  if (s.top_k < 0) throw Error("top_k must be >= 0 (0 disables it), got " + fmt(double(s.top_k)));
  if (!(s.top_p > 0 && s.top_p <= 1)) throw Error("top_p must be in (0, 1], got " + fmt(s.top_p));
  if (!(s.min_p >= 0 && s.min_p <= 1)) throw Error("min_p must be in [0, 1], got " + fmt(s.min_p));
  if (!(s.repetition_penalty > 0)) {
    throw Error("repetition_penalty must be > 0, got " + fmt(s.repetition_penalty));
  }
}

void check_request(const ModelInfo& model, const std::vector<std::vector<int64_t>>& prompts,
                   int64_t steps) {
  if (prompts.empty()) throw Error("no prompt: give at least one prompt");
  for (auto& p : prompts) {
    if (p.empty()) throw Error("empty prompt: every prompt needs at least one token");
    std::vector<int64_t> bad;
    for (int64_t t : p) {
      if ((t < 0 || t >= model.vocab_size) && bad.size() < 5) bad.push_back(t);
    }
    if (!bad.empty()) {
      std::string list;
      for (int64_t t : bad) list += (list.empty() ? "" : ", ") + std::to_string(t);
      throw Error("token ids [" + list + "] are outside the vocabulary [0, " +
                  std::to_string(model.vocab_size) + ")");
    }
    int64_t len = int64_t(p.size());
    int64_t prompt = len + len % 2;
    // need = prompt + 2 * steps, compared without computing it (steps may be near 2^63)
    if (steps < 0 || prompt > model.max_context || steps > (model.max_context - prompt) / 2) {
      std::string need = steps <= (INT64_MAX - prompt) / 2 ? std::to_string(prompt + 2 * steps)
                                                            : "more than 2^63";
      throw Error("prompt of " + std::to_string(len) + " tokens plus " + std::to_string(steps) +
                  " steps needs " + need + " tokens of context; this export "
                  "allows " + std::to_string(model.max_context));
    }
  }
}

std::vector<int64_t> add_pair(SequenceResult& out, int64_t token1, int64_t token2, float conf,
                              int64_t pad_id, const std::set<int64_t>& eos,
                              const std::set<int64_t>& stop) {
  out.pairs.push_back({token1, token2});
  out.confidence.push_back(conf);
  out.commits += token2 != pad_id;
  std::vector<int64_t> added;
  for (int64_t token : {token1, token2}) {
    bool is_eos = eos.count(token) > 0;
    if (is_eos || stop.count(token)) {
      out.finish_reason = is_eos ? "eos" : "stop";
      break;
    }
    if (token != pad_id) added.push_back(token);
  }
  out.tokens.insert(out.tokens.end(), added.begin(), added.end());
  return added;
}

void limit_new_tokens(SequenceResult& out, std::vector<int64_t>& added,
                      const GenerateOptions& options) {
  if (!options.max_new_tokens) return;
  size_t cap = size_t(*options.max_new_tokens);
  if (out.tokens.size() < cap) return;
  size_t extra = out.tokens.size() - cap;
  if (extra) {
    out.tokens.resize(cap);
    added.resize(added.size() - extra);
  }
  if (out.finish_reason.empty()) out.finish_reason = "length";
}

}  // namespace pipo
