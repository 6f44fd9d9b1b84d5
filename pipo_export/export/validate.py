"""Validation that scales: every piece instance of an export checked locally against torch.

The export runs free in ONNX Runtime (a prefill and two decode steps on a mixed batch: one odd,
one short, one prompt spanning three delta-rule chunks; then a prefill that continues those
states, one row as a chunk that is not its prompt's last), from graphs that also output every
piece boundary. Then each piece instance (embed, every layer, head) is recomputed in torch from
*the export's own inputs to that piece* (teacher forced), so an error never compounds and only
one layer's weights are in memory at a time:

    err   = scaled_error(export, float64 reference)      (pipo_graphs.tolerance: the error over
    noise = scaled_error(torch in the export dtype, float64)   max(1, max |reference|))
    pass  when err <= max(NOISE_FACTOR * noise, FLOOR[dtype])

Tokens, masks and positions must be equal; a token may differ only where the float64 reference
is itself at a near-tie (`near_tie_tokens`), and then that head step is not compared.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from pipo_graphs import SamplingParams, step_uniforms
from pipo_graphs.contract import (CONFIDENCE, DECODE, INPUT_IDS, INPUT_PAIR, LENGTHS, Mode,
    NEXT_TOKEN, PAIR, PAST, PREFILL, PRESENT, UNIFORMS, present_to_past, state_name)
from pipo_graphs.tolerance import scaled_error
from pipo_runtime.requests import empty_past, sampling_rows

from pipo_export.errors import ExportError
from pipo_export.export.reference import References
from pipo_export.export.sessions import shared_sessions
from pipo_export.model.checkpoint import torch_dtype
from pipo_export.model.steps import HEAD_EXTRAS, LAYER_KINDS, LOGITS

CHECK = "check/"  # the piece-boundary outputs of validation graphs (pipeline.assemble)
NOISE_FACTOR = 10.0
# relative to each output's scale. int8/int4 exports are checked with MatMulNBits' exact path
# (no prepacking: dequantized weights times float32 activations) against a reference using the
# same dequantized weights, so a wrong or misplaced weight shows; what the fast kernel's int8
# activations (accuracy_level 4) cost is measured separately (pipo_export.export.accuracy).
FLOOR = {"float32": 2e-5, "float16": 5e-3}
VALIDATION_LENGTHS = (11, 2, 261)
CONTINUE_LENGTHS = (5, 1, 140)  # new tokens of the continued prefill (140: two delta-rule chunks)
DECODE_STEPS = 2
STEPS = DECODE_STEPS + 2  # prefill, decode steps, continued prefill


@dataclass
class Finding:
    piece: str  # "prefill/layers.3"
    output: str
    step: int
    err: float
    noise: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.err <= self.limit


# Batches beside the mixed one, so that every branch of every `If` runs at least once: the
# sampler's greedy-only branch (pipo_export.model.sampling.pick) and the decode step's tau >= 1
# skip of the MTP and confidence heads (steps._second_token). The mixed batch takes the
# other branch of each. Their head pieces are checked like the mixed batch's.
BRANCH_BATCHES = {
    "greedy-only": [(SamplingParams(), -1.0), (SamplingParams(), 0.5), (SamplingParams(), 0.0)],
    "all tau >= 1 (skip)": [(SamplingParams(), 1.0), (SamplingParams(), 1.0),
                            (SamplingParams(), 2.0)],
}


def validation_feeds(vocab: int, pad: int, lengths=VALIDATION_LENGTHS, seed: int = 0,
                     open_top_k: bool = True, rows=None):
    """Mixed-length batch -> (prefill feeds, sampling feeds, uniforms(step)): a greedy row, a
    top-k 20 row and (open_top_k) a row sampling from all of the sampler's candidates, else
    from the top 40. A float16 export uses top-k 40 there: which of 248K nearly equal random
    logits make the top `sample_cap` is decided by float16 rounding. `rows`: other
    [(SamplingParams, threshold)] (BRANCH_BATCHES), cycled over the batch."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths) + max(lengths) % 2), pad, np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(0, vocab - 1, n)
    rows = rows or [(SamplingParams(), -1.0),
                    (SamplingParams(0.9, 20, 0.95, 0.0, 1.5, 1.0), 0.5),
                    (SamplingParams(1.2, 0 if open_top_k else 40, 0.8, 0.05, 0.5, 1.2), 0.2)]
    b = len(lengths)
    sampling = sampling_rows([rows[r % len(rows)] for r in range(b)])
    seqs = list(range(b))
    feeds = {INPUT_IDS: ids, LENGTHS: np.array(lengths, np.int64), **sampling,
             UNIFORMS: step_uniforms(5, seqs, 0)}
    return feeds, sampling, lambda step: step_uniforms(5, seqs, step)


def continuation_feeds(vocab: int, pad: int, values: dict, sampling: dict, uniforms,
                       lengths=CONTINUE_LENGTHS, seed: int = 1) -> dict:
    """A prefill that continues the states of `values` (a step's outputs) with new tokens of
    `lengths`; the middle row is a chunk that is not its prompt's last (next_token >= 0)."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths) + max(lengths) % 2), pad, np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(0, vocab - 1, n)
    nxt = np.where(np.arange(len(lengths)) == len(lengths) // 2, rng.integers(0, vocab - 1), -1)
    return {INPUT_IDS: ids, LENGTHS: np.array(lengths, np.int64), **present_to_past(values),
            NEXT_TOKEN: nxt.astype(np.int64), **sampling, UNIFORMS: uniforms(0)}


def run_export(paths: dict, feeds: dict, sampling: dict, uniforms, steps: int,
               prepack: bool = False, float16: bool = False, then=None) -> list[dict]:
    """Free-running ORT: per step, its feeds and every output (numpy). then: values -> the
    feeds of one more prefill, continuing the last step's states (None: no continuation)."""
    sessions = shared_sessions(paths, prepack, float16)
    out, step_feeds = [], feeds
    for s in range(steps + 1 + (then is not None)):
        sess = sessions[DECODE if 0 < s <= steps else PREFILL]
        names = [o.name for o in sess.get_outputs()]
        values = dict(zip(names, sess.run(names, step_feeds)))
        out.append({**step_feeds, **values})
        step_feeds = {INPUT_PAIR: values[PAIR], **present_to_past(values), **sampling,
                      UNIFORMS: uniforms(s + 1)} if s < steps else then and then(values)
    del sessions
    return out


def _value(vals: dict, name: str, layer: int | None, n_layers: int) -> np.ndarray:
    """The export's value feeding a piece input `name` (of layer `layer`, or embed/head)."""
    if name == "x":
        prev = (layer if layer is not None else n_layers) - 1
        return vals[f"{CHECK}layers.{prev}/x" if prev >= 0 else f"{CHECK}embed/x"]
    if name.startswith(PAST) and name[len(PAST):] in LAYER_KINDS and layer is not None:
        return vals[PAST + state_name(name[len(PAST):], layer)]
    return vals[name] if name in vals else vals[f"{CHECK}embed/{name}"]


def _output(vals: dict, piece_kind: str, name: str, layer: int | None) -> np.ndarray:
    if piece_kind == "embed":
        return vals[f"{CHECK}embed/{name}"]
    if piece_kind == "layer":
        return vals[f"{CHECK}layers.{layer}/x" if name == "x" else PRESENT + state_name(name, layer)]
    if name in HEAD_EXTRAS:
        return vals[f"{CHECK}head/{name}"]
    return vals[name if name in (PAIR, CONFIDENCE) else PRESENT + name]


def _torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype) if t.is_floating_point() else t


class Checker:
    """Runs the reference pieces of both dtypes on the export's values and records findings."""

    def __init__(self, cfg, reader, mode: Mode, dtype: str, sample_cap: int, pad_id: int,
                 floor: float):
        export = torch_dtype(dtype)
        self.dtype, self.pad_id, self.floor = dtype, pad_id, floor
        big = {}  # the embedding (and an untied lm_head), held once in the export dtype
        self.ref = References(cfg, reader, mode, torch.float64, big)
        self.low = References(cfg, reader, mode, export, big)
        self.fns = {"ref": self.ref.pieces(sample_cap), "low": self.low.pieces(sample_cap)}
        self.ref.step().sample_cap = self.low.step().sample_cap = sample_cap
        self.findings: list[Finding] = []
        self.failures: list[str] = []  # in data-flow order: the first is the most telling
        self.near_ties: list[int] = []
        self.noise: dict[tuple[str, str], float] = {}  # (piece, output) -> largest measured

    def check(self, where: str, piece_kind: str, pieces: dict, owners: dict, steps: list[dict],
              layer: int | None, n_layers: int, graph_steps: list[int]) -> None:
        """Run piece (ref, low) on each step in graph_steps; compare every output."""
        from pipo_export.export.ties import SampleRecorder, near_tie_tokens
        for s in graph_steps:
            vals = steps[s]
            args = {k: [_torch(_value(vals, i.name, layer, n_layers),
                               torch.float64 if k == "ref" else torch_dtype(self.dtype))
                        for i in pieces[k].inputs] for k in pieces}
            with torch.no_grad(), SampleRecorder() as calls:
                ref = pieces["ref"].fn(owners["ref"], *args["ref"])
            low = [None] * len(ref)
            if owners.get("low") is not None:
                with torch.no_grad():
                    low = pieces["low"].fn(owners["low"], *args["low"])
            outs = {o.name: (r, l) for o, r, l in zip(pieces["ref"].outputs, ref, low)}
            if PAIR in outs:
                got = _output(vals, piece_kind, PAIR, layer)
                want = outs[PAIR][0].numpy()
                if not np.array_equal(got, want):
                    threshold = vals["threshold"]
                    if near_tie_tokens(calls, got, want, outs[CONFIDENCE][0].numpy(),
                                       threshold, self.pad_id, eps=self._logit_error(vals, outs)):
                        self.near_ties.append(s)
                        continue
                    self.failures.append(f"{where} step {s}: tokens {got.tolist()}, the torch "
                                         f"reference gives {want.tolist()}")
                    continue
            for name, (r, lo) in outs.items():
                self._compare(where, pieces["ref"].name, name, s,
                              _output(vals, piece_kind, name, layer), r, lo)

    def _logit_error(self, vals: dict, outs: dict) -> float:
        """The head's token1 logit error this step relative to max|logits| (at least the
        dtype's floor): how far the export's logits may put a token from the reference's."""
        ref = outs[LOGITS][0].numpy()
        got = _output(vals, "head", LOGITS, None).astype(np.float64)
        return max(10 * self.floor, 2 * float(np.abs(got - ref).max() / np.abs(ref).max()))

    def _compare(self, where, piece, name, step, got: np.ndarray, ref: torch.Tensor,
                 low: torch.Tensor | None):
        """low None: use the noise measured on other instances of the same piece."""
        ref = ref.numpy()
        if ref.dtype.kind in "biu":
            if not np.array_equal(got, ref):
                self.failures.append(f"{where} {name} (step {step}): {(got != ref).sum()} elements "
                                     "differ from the torch reference")
            return
        err = scaled_error(got, ref)
        if low is not None:
            noise = scaled_error(low.double().numpy(), ref)
            self.noise[piece, name] = max(noise, self.noise.get((piece, name), 0.0))
        noise = self.noise.get((piece, name), 0.0)
        f = Finding(where, name, step, err, noise, max(NOISE_FACTOR * noise, self.floor))
        self.findings.append(f)
        if not f.ok:
            self.failures.append(
                f"{where} {name} (step {step}): error {err:.3g} x scale, limit {f.limit:.3g} "
                f"(torch's own {self.dtype} noise {noise:.3g} x {NOISE_FACTOR:g}, floor "
                f"{self.floor:g})")


def _noise_layers(layer_types: list[str], dtype: str) -> set[int]:
    """Layers whose torch-in-export-dtype noise is measured: all in float32 (cheap); in float16
    (slow on CPU) the first and last of each layer type, the others reuse their type's noise."""
    if dtype == "float32":
        return set(range(len(layer_types)))
    out = set()
    for kind in set(layer_types):
        where = [i for i, t in enumerate(layer_types) if t == kind]
        out |= {where[0], where[-1]}
    return out


def validate_export(traced, cfg, reader, layer_types, weights, folder, opts, assemble_fn, specs,
                    log=lambda s: print(s, file=sys.stderr)) -> dict:
    """Validate the export in `folder` (see the module doc). Raises ExportError on failure;
    -> the report stored in the manifest."""
    paths = {}
    for graph, spec in zip((PREFILL, DECODE), specs):
        paths[graph] = folder / f".validate_{graph}.onnx"
        onnx.save(assemble_fn(graph, spec), str(paths[graph]))
    try:
        batches = {}
        for label, rows in {"mixed": None, **BRANCH_BATCHES}.items():
            feeds, sampling, uniforms = validation_feeds(cfg.vocab_size, cfg.pad_token_id,
                                                         open_top_k=opts.dtype.value == "float32",
                                                         rows=rows)
            feeds.update(empty_past(specs[0].inputs, len(VALIDATION_LENGTHS)))
            batches[label] = run_export(
                paths, feeds, sampling, uniforms, DECODE_STEPS,
                float16=opts.dtype.value == "float16",
                then=lambda values, s=sampling, u=uniforms: continuation_feeds(
                    cfg.vocab_size, cfg.pad_token_id, values, s, u))
        steps = batches.pop("mixed")
    finally:
        for p in paths.values():
            p.unlink(missing_ok=True)
    dtype = opts.dtype.value
    floor = FLOOR[dtype]
    checker = Checker(cfg, reader, opts.mode, dtype, opts.sample_cap, cfg.pad_token_id, floor)
    n = len(layer_types)
    ref_pieces, low_pieces = checker.fns["ref"], checker.fns["low"]
    graph_steps = {PREFILL: [0, DECODE_STEPS + 1], DECODE: list(range(1, DECODE_STEPS + 1))}
    heads = {"ref": checker.ref.step(), "low": checker.low.step()}
    for g, (rp, lp) in ((PREFILL, (ref_pieces.prefill_pieces(), low_pieces.prefill_pieces())),
                        (DECODE, (ref_pieces.decode_pieces(), low_pieces.decode_pieces()))):
        checker.check(f"{g}/embed", "embed", {"ref": rp[0], "low": lp[0]}, heads, steps, None, n,
                      graph_steps[g])
    by_type = {}
    sampled = _noise_layers(layer_types, dtype)
    for i in sorted(range(n), key=lambda i: i not in sampled):  # measured ones first
        kind = layer_types[i]
        owners = {"ref": checker.ref.layer(i),
                  "low": checker.low.layer(i) if i in sampled else None}
        if kind not in by_type:
            by_type[kind] = {k: checker.fns[k].layer_pieces(owners[k].layer) for k in owners}
        for g, j in ((PREFILL, 0), (DECODE, 1)):
            checker.check(f"{g}/layers.{i}", "layer", {k: by_type[kind][k][j] for k in owners},
                          owners, steps, i, n, graph_steps[g])
        log(f"  layer {i + 1}/{n} checked")
    for g, (rp, lp) in ((PREFILL, (ref_pieces.prefill_pieces(), low_pieces.prefill_pieces())),
                        (DECODE, (ref_pieces.decode_pieces(), low_pieces.decode_pieces()))):
        checker.check(f"{g}/head", "head", {"ref": rp[1], "low": lp[1]}, heads, steps, None, n,
                      graph_steps[g])
    near_ties = list(checker.near_ties)  # of the mixed batch
    for label, branch_steps in batches.items():  # the heads on the other If branches
        for g, (rp, lp) in ((PREFILL, (ref_pieces.prefill_pieces(), low_pieces.prefill_pieces())),
                            (DECODE, (ref_pieces.decode_pieces(), low_pieces.decode_pieces()))):
            checker.check(f"{g}/head ({label} batch)", "head", {"ref": rp[1], "low": lp[1]},
                          heads, branch_steps, None, n, graph_steps[g])
    if checker.failures:
        more = len(checker.failures) - 1
        raise ExportError(f"validation failed: {'; '.join(checker.failures[:3])}"
                          + (f"; {more - 2} more outputs outside" if more > 2 else "")
                          + "; the export was not written")
    if len(near_ties) == STEPS:
        raise ExportError("validation could not compare the head at any step: every step's "
                          "tokens sat at a near-tie of the float64 reference")
    worst = max(checker.findings, key=lambda f: f.err / f.limit)
    return {"method": "teacher-forced per piece vs torch float64", "steps": STEPS,
            "lengths": list(VALIDATION_LENGTHS), "continued": list(CONTINUE_LENGTHS),
            "noise_factor": NOISE_FACTOR, "floor": floor,
            "compared": len(checker.findings), "near_tie_steps": near_ties,
            "branch_batches": list(BRANCH_BATCHES),
            "max_error": max(f.err for f in checker.findings),
            "worst": {"piece": worst.piece, "output": worst.output, "step": worst.step,
                      "error": worst.err, "limit": worst.limit, "noise": worst.noise}}


__all__ = ["validate_export", "validation_feeds", "Finding", "math"]
