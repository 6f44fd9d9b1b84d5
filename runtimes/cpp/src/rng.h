// The counter-based uniforms every PIPO backend feeds its graphs (pipo_graphs/rng.py):
// a keyed splitmix64 chain over (seed, sequence index, step, slot), 24-bit uniforms in [0, 1).
#pragma once

#include <cstdint>
#include <vector>

namespace pipo {

// One uniform for (seed, seq, step, slot); exactly pipo_graphs.rng.uniform as float32.
float uniform(uint64_t seed, uint64_t seq, uint64_t step, uint64_t slot);

// The graph input `uniforms` for one step: [B, 2] float32 row-major, row r uses seqs[r];
// slot 0 is token1, slot 1 token2. step is 0 for prefill, n for the n-th decode step.
void step_uniforms(uint64_t seed, const std::vector<int64_t>& seqs, uint64_t step, float* out);

}  // namespace pipo
