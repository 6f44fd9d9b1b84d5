"""Our side of the peer bench: PIPO and regular-decoding exports of the checkpoint per precision
(fp32, and int8/int4 through the exporter's weight-only quantization), and one measurement of
an export through pipo_runtime (ONNX Runtime CPU)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import MANIFEST, Manifest, ManifestError, load_manifest

from pipo_export.bench import folder_bytes
from benchmarks.peers import Sample
from benchmarks.peers.machine import Meter
from benchmarks.peers.venvs import log

PRECISIONS = {"fp32": "float", "int8": "int8", "int4": "int4",  # --precisions -> weights
              "int4-head8": "int4"}
HEAD_WEIGHTS = {"int4-head8": "int8"}  # mixed precision: the lm_head's format (--head-weights)
MODES = ("pipo", "regular")
TOOLS = {"pipo": "pipo-export PIPO", "regular": "pipo-export regular"}
SEMANTICS = (
    "pipo-export (PIPO and regular): the export through pipo_runtime on ONNX Runtime CPU, "
    "greedy, tau < 0 (every token2 kept). TTFT = the prefill step (the prompt to the first "
    "pair for PIPO, to the first token for regular); ms/token = decode time / user tokens "
    "emitted after the prefill (GenerationResult.ms_per_token: a PIPO step emits two). int8/int4 "
    "= `export --weights int8|int4` (MatMulNBits, symmetric, accuracy_level 4; the embedding "
    "gather stays exact). Each measurement: load the session, one warm-up generation, one timed "
    "generation, close.")


@dataclass
class OurExport:
    """One export folder of one mode and precision."""

    mode: str  # pipo | regular
    precision: str  # fp32 | int8 | int4
    folder: Path
    bytes: int
    manifest: Manifest
    export_s: float | None = None  # None: reused

    @property
    def key(self) -> str:
        return f"{self.mode}-{self.precision}"


def supports_weights() -> bool:
    """Whether the installed exporter takes weight-only quantization (ExportOptions.weights)."""
    from pipo_export.export.options import ExportOptions
    return "weights" in {f.name for f in dataclasses.fields(ExportOptions)}


def needed_context(contexts: list[int], new_tokens: int) -> int:
    """max_context for the exports: the longest prompt (rounded to pairs) plus two tokens per
    step (what pipo_runtime checks), rounded up to 1,024. The caches a request uses do not
    depend on it today; sized to the bench, as the peers size theirs to prompt + new tokens."""
    need = max(contexts) + max(contexts) % 2 + 2 * new_tokens
    return -(-need // 1024) * 1024


def _reusable(folder: Path, weights: str, block_size: int, max_context: int,
              head_bits: int | None = None) -> Manifest | None:
    if not (folder / MANIFEST).is_file():
        return None
    try:
        manifest = load_manifest(folder, verify_files=False)
    except ManifestError:  # another contract or a broken file: export again
        return None
    stored = manifest.weights
    fmt = stored.format if stored else "float"
    if (fmt != weights or manifest.model.max_context < max_context
            or (weights != "float" and stored.block_size != block_size)
            or set((stored.bits_by_weight or {}).values()) != ({head_bits} if head_bits else set())):
        return None
    return manifest


def prepare(checkpoint: Path, root: Path, precisions: list[str], block_size: int,
            max_context: int, rebuild: bool) -> tuple[list[OurExport], list[dict]]:
    """Export (or reuse) PIPO and regular at every precision; a precision the installed
    exporter refuses is skipped with one line. -> (exports, skipped)."""
    from pipo_export.export.options import ExportOptions
    from pipo_export.export.pipeline import export
    from pipo_export.export.quantize import WeightFormat
    from pipo_graphs.contract import Mode

    exports, skipped = [], []
    quantizes = supports_weights()
    for precision in precisions:
        weights = PRECISIONS[precision]
        if weights != "float" and not quantizes:
            reason = "this pipo-export has no weight-only quantization (ExportOptions.weights)"
            log(f"skipping pipo-export {precision}: {reason}")
            skipped.append({"what": f"pipo-export {precision}", "reason": reason})
            continue
        made, head = [], HEAD_WEIGHTS.get(precision)
        for mode in MODES if head is None else ("pipo",):  # mixed: PIPO only (regular: int4)
            folder = root / f"{mode}-{precision}"
            head_bits = WeightFormat(head).bits if head else None
            manifest = None if rebuild else _reusable(folder, weights, block_size, max_context,
                                                      head_bits)
            seconds = None
            if manifest is None:
                log(f"exporting {mode} {precision} to {folder}")
                extra = {"weights": weights, "block_size": block_size} if quantizes else {}
                if head:
                    extra["head_weights"] = head
                t0 = time.perf_counter()
                try:
                    export(ExportOptions(
                        checkpoint=str(checkpoint), out=str(folder), mode=Mode(mode), force=True,
                        max_context=max_context, trace_cache=str(root / "trace-cache"), **extra))
                    manifest = load_manifest(folder)
                except PipoUserError as exc:  # the exporter refuses this precision
                    log(f"skipping pipo-export {precision}: {exc}")
                    skipped.append({"what": f"pipo-export {precision}", "reason": str(exc)})
                    made = []
                    break
                seconds = time.perf_counter() - t0
            else:
                log(f"reusing {folder} (--rebuild to export again)")
            made.append(OurExport(mode, precision, folder, folder_bytes(folder), manifest,
                                  seconds))
        exports += made
    return exports, skipped


def measure(export: OurExport, prompt: list[int], new_tokens: int, threads: int) -> Sample:
    """Load the session, one warm-up generation, one timed generation (greedy, tau < 0)."""
    from pipo_runtime import GenerationConfig, PipoSession

    t0 = time.perf_counter()
    session = PipoSession.load(export.folder, threads=threads)
    # the peers generate a fixed count (llama-bench ignores EOS): so do we, or random weights
    # that sample EOS first would time no decode step at all
    session.facts = replace(session.facts, eos_ids=frozenset())
    load_s = time.perf_counter() - t0
    try:
        config = GenerationConfig(max_new_tokens=new_tokens, threshold=-1.0)
        session.generate([prompt], config)  # warm-up
        meter = Meter().start()
        result = session.generate([prompt], config)
        others = meter.stop()
    finally:
        session.close()
    seq = result.sequences[0]
    return Sample(result.ttft_s * 1e3, result.ms_per_token, others,
                  extra={"ms_per_step": result.ms_per_step, "steps": result.steps,
                         "generated": len(seq.tokens), "commit_rate": seq.commit_rate,
                         "load_s": round(load_s, 3)})


def decode_bounds(checkpoint: Path, exports: list[OurExport], contexts: list[int],
                  new_tokens: int) -> dict:
    """Bytes a decode step reads (bench.measure.decode_bytes, per precision), at the cache size
    of each context's last step: -> {context: {precision: {pipo, regular}}} (part -> bytes).
    The model is the checkpoint's skeleton on the meta device (no weight is read)."""
    from pipo_export.bench.measure import decode_bytes
    from pipo_export.model.checkpoint import open_checkpoint, skeleton

    cfg, _, _ = open_checkpoint(checkpoint)
    model = skeleton(cfg)
    out: dict = {}
    for context in contexts:
        slots = {"pipo": context // 2 + new_tokens // 2, "regular": context + new_tokens}
        row = out.setdefault(str(context), {})
        for e in exports:
            row.setdefault(e.precision, {})[e.mode] = decode_bytes(model, e.manifest,
                                                                   slots[e.mode])
    return out
