"""Measurements behind `pipo-export bench`: latency through pipo_runtime and transformers eager,
bytes moved per decode step, and the machine's memory bandwidth."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from pipo_graphs.contract import OUTPUT_MASK, PROMPT_MASK, Mode
from pipo_graphs.manifest import Manifest
from pipo_graphs.shapes import state_bytes, state_nbytes
from pipo_runtime import GenerationConfig, PipoSession

from pipo_export.export.io_spec import model_dims


@dataclass
class Latency:
    """One method at one context: per-repeat TTFT and time per output token (ms)."""

    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    commit_rate: float | None = None

    def summary(self) -> dict:
        def stat(xs):
            return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None
        return {"ttft_ms": stat(self.ttft_ms), "tpot_ms": stat(self.tpot_ms),
                "ms_per_step": stat(self.step_ms), "commit_rate": self.commit_rate}


def run_session(session: PipoSession, prompt: list[int], new_tokens: int, threshold: float,
                into: Latency) -> None:
    """Greedy generation of `new_tokens` user tokens. TTFT = prefill (the first pair or token);
    TPOT = decode time / tokens emitted after the prefill."""
    r = session.generate([prompt], GenerationConfig(max_new_tokens=new_tokens,
                                                    threshold=threshold))
    seq = r.sequences[0]
    into.ttft_ms.append(r.ttft_s * 1e3)
    into.tpot_ms.append(r.ms_per_token)
    into.step_ms.append(r.ms_per_step)
    into.commit_rate = seq.commit_rate


def run_hf(hf, prompt: list[int], new_tokens: int, into: Latency) -> None:
    """transformers eager `generate` (greedy, its own cache). A stopping criterion timestamps
    every generated token: TTFT = first token - start, TPOT = (last - first) / (N - 1)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    clock = Clock()
    with torch.no_grad():
        start = time.perf_counter()
        hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, stopping_criteria=StoppingCriteriaList([clock]))
    into.ttft_ms.append((clock.times[0] - start) * 1e3)
    into.tpot_ms.append((clock.times[-1] - clock.times[0]) * 1e3 / (len(clock.times) - 1))
    into.step_ms.append(into.tpot_ms[-1])


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Best large-copy bandwidth (bytes read + written per second, GB/s) with numpy."""
    src = np.ones(mib * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def weight_widths(manifest: Manifest) -> dict[str, float]:
    """Stored bytes per element of each weight written quantized (MatMulNBits: packed
    bits/8, a float32 scale and, unless symmetric, a packed bits-wide zero point per block
    along K)."""
    stored = manifest.weights
    if stored is None or stored.format == "float":
        return {}
    block = stored.block_size

    def width(bits: int) -> float:
        return bits / 8 + 4 / block + (0 if stored.symmetric else bits / 8 / block)
    return {name: width(stored.bits_by_weight.get(name, stored.bits)) for name in stored.quantized}


def decode_bytes(model, manifest: Manifest, past_slots: int) -> dict:
    """Bytes a decode step must read at least, by part (batch 1): every weight it multiplies
    with, the lm_head once per sampled token, and every cache/state it reads (attention caches
    over past_slots slots; Gated DeltaNet states are read and written). Weights count at their
    stored width: the export dtype, or the MatMulNBits width of weight-only quantized ones.

    model: the PipoModel (the meta-device skeleton is enough); manifest: its export's manifest
    (mode, states, dtype, weights)."""
    width = manifest.export.dtype.itemsize
    quantized = weight_widths(manifest)
    pipo = manifest.export.mode == Mode.PIPO
    dims = model_dims(model)

    def n(prefix: str, module) -> float:
        return sum(p.numel() * quantized.get(f"{prefix}.{name}", width)
                   for name, p in module.named_parameters())

    lm_width = quantized.get("lm_head.weight", quantized.get("model.embed_tokens.weight", width))
    lm_head = dims.vocab_size * dims.hidden_size * lm_width
    parts = {"backbone_layers": n("model.layers", model.model.layers),
             "lm_head": lm_head * (2 if pipo else 1)}
    if pipo:
        parts["pipo_heads"] = (n("compressor", model.compressor) + n("mtp", model.mtp)
                               + n("confidence_head", model.confidence_head))
    cache = 0
    for s in manifest.states:
        size = state_nbytes(s, 1, past_slots)
        if s.kind in ("conv_window", "recurrent"):
            size *= 2  # read and written back
        cache += size if s.kind not in (PROMPT_MASK, OUTPUT_MASK) else 0
    parts["caches_and_states"] = cache
    parts["total"] = sum(parts.values())
    return parts


def cache_bytes(manifest: Manifest, slots: int) -> int:
    """Bytes of every state at `slots` cache slots (batch 1): the memory a context costs."""
    return state_bytes(manifest.states, 1, slots)
