"""Teacher forcing through an export's own graphs (torch-free: onnx, numpy, ONNX Runtime).

The shipped graphs sample in-graph and return tokens, so scoring a text needs three values of
the head that every export computes but does not output (pipo_graphs.contract.HEAD_EXTRAS):
token1's logits, token2's logits and the tokens the MTP reads. `eval_graph` exposes them on
the graph as written, nodes and weights untouched: the two logits become extra outputs, and the
MTP's tokens become an input (the graph otherwise takes them from its own sampled token1, so a
wrong guess would put a wrong token in the MTP's cache; teacher forcing feeds the true one).

`score` then runs one window of text as generation would, but always feeding the true pair:
prefill on pair 0, then one decode step per pair. Step i (pair i in, i = 0 .. L-2) gives
token1's distribution for t_2i+2, token2's for t_2i+3 (the MTP having read the true t_2i+2) and
the gate's confidence: exactly the quantities of PipoModel.teacher_forced, through the runtime.
Prefill on growing prefixes would cost O(n^2); a prefill over the whole window returns only its
last pair; decode steps cost one step each.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipo_graphs.contract import (CONFIDENCE, DECODE, HEAD_SCOPE, INPUT_IDS, INPUT_PAIR, LENGTHS,
    LOGITS, MTP_LOGITS, MTP_TOKENS, PREFILL, UNIFORMS, Mode, present_to_past)
from pipo_graphs.errors import PipoUserError
from pipo_graphs import SamplingParams
from pipo_runtime.folder import open_export
from pipo_runtime.requests import empty_past, ort_inputs, sampling_feeds

TOKEN1_LOGITS = f"{HEAD_SCOPE}/{LOGITS}"
TOKEN2_LOGITS = f"{HEAD_SCOPE}/{MTP_LOGITS}"
FORCED_TOKENS = f"{HEAD_SCOPE}/{MTP_TOKENS}"
THRESHOLD = -1.0  # every step runs the MTP and the confidence head (tau < 1)


def eval_graph(model, vocab: int):
    """An onnx ModelProto of prefill_compress or decode_unfold (an export's, or the exporter's
    own before writing) -> the same graph with token1's and token2's logits as outputs
    [batch, V] float32 and the MTP's tokens as input ("head/mtp_tokens" int64: [batch,
    prompt_pairs] at prefill, [batch, 1] at decode). In place; returns the model."""
    from onnx import TensorProto, helper
    graph = model.graph
    producers = [n for n in graph.node if FORCED_TOKENS in n.output]
    produced = {o for n in graph.node for o in n.output}
    if not producers or TOKEN1_LOGITS not in produced or TOKEN2_LOGITS not in produced:
        raise PipoUserError(f"{graph.name}: the graph lacks the head values eval reads "
                            f"({TOKEN1_LOGITS}, {TOKEN2_LOGITS}, {FORCED_TOKENS}): it was "
                            "exported by an older pipo-export; re-export it")
    for node in producers:  # the sampled token1 now goes nowhere; the input feeds the MTP
        node.output[:] = [o + ".sampled" if o == FORCED_TOKENS else o for o in node.output]
    slots = "prompt_pairs" if graph.name == PREFILL else 1
    graph.input.append(helper.make_tensor_value_info(FORCED_TOKENS, TensorProto.INT64,
                                                     ["batch", slots]))
    for name in (TOKEN1_LOGITS, TOKEN2_LOGITS):
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                          ["batch", vocab]))
    return model


def eval_sessions(paths: dict, vocab: int, threads: int = 0, prepack: bool | None = None) -> dict:
    """graph name -> ONNX Runtime session of eval_graph(paths[graph]), the weights mapped once
    by pipo_runtime as for generation (the rewritten graph runs from memory; its weights are
    the file's)."""
    import onnx
    from pipo_runtime.backends.base import RunnerOptions
    from pipo_runtime.backends.onnxruntime import shared_sessions
    models = [eval_graph(onnx.load(str(p), load_external_data=False), vocab).SerializeToString()
              for p in paths.values()]
    options = RunnerOptions(threads=threads, prepack=prepack)
    return dict(zip(paths, shared_sessions([Path(p) for p in paths.values()], options, models)))


@dataclass
class ExportScorer:
    """Scores windows of text through an export folder's graphs (see the module doc)."""

    sessions: dict
    vocab_size: int
    max_context: int
    label: str
    tokenizer_path: Path | None = None  # the sealed tokenizer.json (None: the seal has none)

    @classmethod
    def load(cls, folder: str | Path, threads: int = 0) -> "ExportScorer":
        """Verify the export (manifest seal, every file's sha256) and open its eval graphs."""
        folder = Path(folder)
        export = open_export(folder)  # the runtimes' loader: every file it names checked
        manifest = export.manifest
        if manifest.export.mode != Mode.PIPO:
            raise PipoUserError(f"{folder}: a --mode {manifest.export.mode.value} export has no "
                                "MTP or confidence head; eval scores PIPO exports")
        vocab = manifest.model.vocab_size
        paths = {g: folder / manifest.graphs[g].file for g in (PREFILL, DECODE)}
        return cls(eval_sessions(paths, vocab, threads), vocab, manifest.model.max_context,
                   f"export {folder}", export.tokenizer)

    def score(self, ids: np.ndarray, step=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids [B, T] int64 (T even >= 4) -> token1 logits [B, L-1, V], token2 logits
        [B, L-1, V] (float32), confidence [B, L-1] with L = T/2. step(): called per graph
        run."""
        return score_sessions(self.sessions, ids, step)


def score_sessions(sessions: dict, ids: np.ndarray, step=None):
    """`ExportScorer.score` over sessions of eval graphs (graph name -> session)."""
    b, t = ids.shape
    n = t // 2 - 1
    sampling = {**sampling_feeds(SamplingParams(), THRESHOLD, b),
                UNIFORMS: np.zeros((b, 2), np.float32)}
    conf = np.empty((b, n), np.float32)
    cut = lambda lo, hi: np.ascontiguousarray(ids[:, lo:hi], np.int64)  # noqa: E731
    feeds = {INPUT_IDS: cut(0, 2), LENGTHS: np.full(b, 2, np.int64), **sampling,
             **empty_past(ort_inputs(sessions[PREFILL]), b)}  # contract 1.1: a fresh past
    for i in range(n):
        sess = sessions[PREFILL if i == 0 else DECODE]
        feeds[FORCED_TOKENS] = cut(2 * i + 2, 2 * i + 3)
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(names, feeds)))
        if i == 0:
            vocab = out[TOKEN1_LOGITS].shape[-1]
            logits1, logits2 = (np.empty((b, n, vocab), np.float32) for _ in range(2))
        logits1[:, i], logits2[:, i], conf[:, i] = (out[TOKEN1_LOGITS], out[TOKEN2_LOGITS],
                                                    out[CONFIDENCE])
        feeds = {INPUT_PAIR: cut(2 * i + 2, 2 * i + 4), **present_to_past(out), **sampling}
        if step:
            step()
    return logits1, logits2, conf
