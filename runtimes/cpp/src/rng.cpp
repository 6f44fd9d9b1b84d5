#include "rng.h"

#include <cstddef>

namespace pipo {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kMul1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kMul2 = 0x94D049BB133111EBull;

// splitmix64 finaliser; unsigned arithmetic wraps modulo 2**64 like the Python masks.
inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * kMul1;
  z = (z ^ (z >> 27)) * kMul2;
  return z ^ (z >> 31);
}

}  // namespace

float uniform(uint64_t seed, uint64_t seq, uint64_t step, uint64_t slot) {
  uint64_t h = mix(seed + kGolden);
  h = mix(h ^ (seq + kGolden));
  h = mix(h ^ (step + kGolden));
  h = mix(h ^ (slot + kGolden));
  // 24 bits: exact in float32 (Python computes it in float64, then stores float32: same value)
  return float(h >> 40) * (1.0f / float(1 << 24));
}

void step_uniforms(uint64_t seed, const std::vector<int64_t>& seqs, uint64_t step, float* out) {
  for (std::size_t row = 0; row < seqs.size(); ++row) {
    for (uint64_t slot = 0; slot < 2; ++slot) {
      out[2 * row + slot] = uniform(seed, uint64_t(seqs[row]), step, slot);
    }
  }
}

}  // namespace pipo
