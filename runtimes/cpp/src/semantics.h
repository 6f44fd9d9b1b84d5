// Host-side PIPO semantics every runtime shares (pipo_graphs/semantics.py and the request
// checks of pipo_runtime): prompt packing, request validation, and what the user sees.
#pragma once

#include <cstdint>
#include <set>
#include <vector>

#include "manifest.h"
#include "pipo/runtime.h"

namespace pipo {

// Right-pad prompts with PAD to one even length T (the longest rounded up to even).
// -> input_ids [B, T] int64 row-major, lengths [B] int64; returns T.
int64_t pack_prompts(const std::vector<std::vector<int64_t>>& prompts, int64_t pad_id,
                     std::vector<int64_t>& input_ids, std::vector<int64_t>& lengths);

// Steps to run: min(max_steps, max_new_tokens); throws when neither is given or one is < 1.
int64_t request_steps(const GenerateOptions& options);

// SamplingParams.validate(): throws pipo::Error naming the bad field.
void validate_sampling(const SamplingOptions& s);

// Non-empty prompts, ids inside the vocabulary, prompt + 2 * steps within max_context.
void check_request(const ModelInfo& model, const std::vector<std::vector<int64_t>>& prompts,
                   int64_t steps);

// SequenceOutput.add_pair: record one pair; return the user tokens it adds. PAD is never
// shown; EOS or a stop id (token1 or token2) ends the row and a token2 after an ending
// token1 is dropped.
std::vector<int64_t> add_pair(SequenceResult& out, int64_t token1, int64_t token2, float conf,
                              int64_t pad_id, const std::set<int64_t>& eos,
                              const std::set<int64_t>& stop);

// PipoSession._limit: cut the row at max_new_tokens user tokens; trims `added` to match.
void limit_new_tokens(SequenceResult& out, std::vector<int64_t>& added,
                      const GenerateOptions& options);

}  // namespace pipo
