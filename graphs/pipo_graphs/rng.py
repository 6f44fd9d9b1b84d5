"""Counter-based uniform random numbers shared by every PIPO backend.

The decode graphs take their random numbers as an input (``uniforms [B, 2]``), so every
backend (torch reference, ONNX Runtime, TensorRT, the C++ runtime) produces the same tokens
for the same seed. The generator is a keyed splitmix64 chain, chosen because it is a few
lines in any language with 64-bit unsigned wrap-around arithmetic:

    mix(z)   = splitmix64 finaliser of z (all arithmetic modulo 2**64)
    h        = mix(seed + GOLDEN)
    h        = mix(h ^ (seq   + GOLDEN))
    h        = mix(h ^ (step  + GOLDEN))
    h        = mix(h ^ (slot  + GOLDEN))
    uniform  = (h >> 40) * 2**-24          # 24 bits: exact in float32, in [0, 1)

``seq`` is the row index of the sequence in its batch, ``step`` is 0 for prefill and n for the
n-th decode step, ``slot`` is 0 for token1 and 1 for token2.
"""
from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
SLOTS_PER_STEP = 2


def _mix(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def uniform(seed: int, seq: int, step: int, slot: int) -> float:
    """One uniform number in [0, 1) for (seed, sequence index, step, slot)."""
    h = _mix(seed + GOLDEN)
    for counter in (seq, step, slot):
        h = _mix(h ^ ((counter + GOLDEN) & MASK64))
    return (h >> 40) * (1.0 / (1 << 24))


def step_uniforms(seed: int, seqs: list[int], step: int) -> np.ndarray:
    """The graph input ``uniforms`` for one step: float32 [B, 2] (slot 0 token1, slot 1 token2)."""
    out = np.empty((len(seqs), SLOTS_PER_STEP), dtype=np.float32)
    for row, seq in enumerate(seqs):
        for slot in range(SLOTS_PER_STEP):
            out[row, slot] = uniform(seed, seq, step, slot)
    return out
