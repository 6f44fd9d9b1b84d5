"""`python -m benchmarks.peers`: PIPO and regular decoding next to ONNX Runtime GenAI and llama.cpp.

Not part of the shipped package (it makes venvs and builds llama.cpp): run it from a checkout,
at the repository root, with pipo-export installed (`python -m benchmarks.peers --help`; the
command line is in __main__). `pipo-export bench` (PIPO against regular decoding) is the
package's own.

Modules:

- `machine`: CPU load of other processes, from /proc/stat (wait for idle cores, flag disturbed runs);
- `venvs`: the peers' own venvs under build/ (idempotent: existing ones are checked and reused);
- `hf_folder`: the plain Qwen3.5 Hugging Face folder the peers convert (same backbone weights as
  the PIPO checkpoint, synthetic byte-level BPE tokenizer);
- `ours`: PIPO and regular exports per precision (fp32/int8/int4) and their timed runs;
- `ortgenai` (+ `ortgenai_child`, run in the peer venv): the GenAI model builder and timed runs;
- `llamacpp` (+ `gguf_child`, run in the peer venv): convert_hf_to_gguf, llama-quantize, llama-bench;
- `suite`: preparation, interleaved rounds, the report; `report`: markdown table, bounds, plot.

A peer that cannot be installed, converted or run is skipped with one line (`PeerUnavailable`);
the bench goes on with the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BUSY_CORES = 0.25  # cores used by other processes that make a measurement suspect


class PeerUnavailable(Exception):
    """A peer cannot be set up, converted or run; the message is the one line printed."""


@dataclass
class Sample:
    """One timed run of one method at one context.

    ttft_ms: the prompt's prefill up to the first generated token; ms_per_token: decode time per
    generated token after it (see each tool's SEMANTICS). cpu_others: cores other processes used
    while it ran (>= BUSY_CORES: flagged); cpu_busy_before: the idle check before it."""

    ttft_ms: float
    ms_per_token: float
    cpu_others: float = 0.0
    cpu_busy_before: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return self.cpu_others >= BUSY_CORES
