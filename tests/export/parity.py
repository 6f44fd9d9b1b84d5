"""Test helper: an export's graphs against the whole torch model run in float64, step by step
(each graph gets the reference's own states, so errors do not compound). An independent check
of the export for models small enough to hold in float64 (the export's own validation checks
piece by piece, for any size)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from pipo_graphs.contract import NEXT_TOKEN, PAST, PRESENT, SAMPLING_INPUTS, UNIFORMS, \
    present_to_past
from pipo_runtime.requests import empty_past, ort_inputs

from pipo_export.export.ties import SampleRecorder, near_tie_tokens
from pipo_export.model.steps import PipoStep


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float
    mismatches: int  # elements outside the tolerance (or unequal, for ints/bools)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


def compare_outputs(got: dict, ref: dict, atol: float, rtol: float) -> list[OutputError]:
    """Per-output error statistics of got vs ref (both name -> numpy array).

    Integers and bools must be equal. Floats pass where |got - ref| <= atol * scale + rtol * |ref|
    with scale = max(1, max|ref|) of that output: atol is relative to the tensor's magnitude, so
    a cache whose values reach 4 is held to the same relative precision as a probability.
    """
    errors = []
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            errors.append(OutputError(name, float("inf"), float("inf"), max(r.size, 1)))
        elif r.dtype.kind in "biu":
            errors.append(OutputError(name, float((g != r).any()), 0.0, int((g != r).sum())))
        else:
            diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
            rel = diff / np.maximum(np.abs(r.astype(np.float64)), 1e-12)
            scale = max(1.0, float(np.abs(r).max(initial=0)))
            bad = int((diff > atol * scale + rtol * np.abs(r)).sum())
            errors.append(OutputError(name, float(diff.max(initial=0)), float(rel.max(initial=0)),
                                      bad))
    return errors


def reference_step(model, step_cls=PipoStep, **kw) -> PipoStep:
    """A float64 copy of the model wrapped in a reference PipoStep (or RegularStep)."""
    return step_cls(copy.deepcopy(model).double(), **kw)


def torch_feeds(feeds: dict, dtype: torch.dtype) -> dict:
    """numpy feeds -> torch tensors; floating inputs in the reference's dtype."""
    out = {}
    for k, v in feeds.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.to(dtype) if t.is_floating_point() and k != UNIFORMS else t
    return out


def _dtype(step: PipoStep) -> torch.dtype:
    return step.model.lm_head.weight.dtype


def run_torch_prefill(step: PipoStep, feeds: dict) -> dict:
    t = torch_feeds(feeds, _dtype(step))
    sp = {n: t[n] for n, _ in SAMPLING_INPUTS}
    past = {k[len(PAST):]: v for k, v in t.items() if k.startswith(PAST)}
    with torch.no_grad():
        pair, conf, states = step.prefill(t["input_ids"], t["lengths"], sp, t[UNIFORMS],
                                          past or None, t.get(NEXT_TOKEN))
    return _pack(pair, conf, states)


def run_torch_decode(step: PipoStep, feeds: dict) -> dict:
    t = torch_feeds(feeds, _dtype(step))
    sp = {n: t[n] for n, _ in SAMPLING_INPUTS}
    past = {k[len(PAST):]: v for k, v in t.items() if k.startswith(PAST)}
    with torch.no_grad():
        pair, conf, states = step.decode(t["input_pair"], past, sp, t[UNIFORMS])
    return _pack(pair, conf, states)


def _pack(pair, conf, states) -> dict:
    out = {"pair": pair.numpy(), "confidence": conf.numpy()}
    out.update({PRESENT + k: v.numpy() for k, v in states.items()})
    return out



def _graph_state(name: str, value: np.ndarray, state_dtype) -> np.ndarray:
    """Reference state (float64) in the dtype the graph declares: recurrent states are float32,
    other float states follow the export dtype."""
    if value.dtype.kind != "f":
        return value
    return value.astype(np.float32 if name.startswith(PRESENT + "recurrent") else state_dtype)


def validate_steps(step: PipoStep, prefill, decode, prefill_feeds: dict,
                   decode_steps: int, sampling_feeds: dict, uniforms, atol: float, rtol: float,
                   state_dtype=np.float32):
    """Prefill then `decode_steps` decode steps; each graph gets the torch reference's own states
    (cast to `state_dtype`) as input, so errors do not compound. -> [(step, [OutputError])].

    A step whose tokens differ only where the float64 reference itself is at a near-tie (see
    `near_tie_tokens`) is reported as one `near_tie` entry instead: its token-dependent outputs
    cannot be compared, and the next step starts from the reference's states again."""
    report = []
    prefill_feeds = {**empty_past(prefill.inputs, len(prefill_feeds["lengths"])),
                     **prefill_feeds}
    with SampleRecorder() as calls:
        ref = run_torch_prefill(step, prefill_feeds)
    report.append((0, _step_errors(prefill.infer(prefill_feeds), ref, calls, step, atol, rtol)))
    for i in range(1, decode_steps + 1):
        feeds = {"input_pair": ref["pair"], **sampling_feeds, UNIFORMS: uniforms(i),
                 **graph_past(ref, state_dtype)}
        with SampleRecorder() as calls:
            ref = run_torch_decode(step, feeds)
        report.append((i, _step_errors(decode.infer(feeds), ref, calls, step, atol, rtol)))
    return report


def graph_past(ref: dict, state_dtype=np.float32) -> dict:
    """A reference step's outputs -> the next step's past.<state> feeds in the graph dtypes."""
    return present_to_past({k: _graph_state(k, v, state_dtype) for k, v in ref.items()})


def _step_errors(got: dict, ref: dict, calls: list, step, atol: float, rtol: float) -> list:
    errors = compare_outputs(got, ref, atol, rtol)
    if not np.array_equal(got["pair"], ref["pair"]) and calls:
        threshold = calls[0][1]["threshold"].numpy()
        if near_tie_tokens(calls, got["pair"], ref["pair"], ref["confidence"], threshold,
                           step.pad_id, eps=10 * atol):
            return [OutputError("near_tie", 0.0, 0.0, 0)]
    return errors


class OrtGraph:
    """One graph in an ONNX Runtime session: infer(feeds) -> every output by name."""

    def __init__(self, path):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.inputs = ort_inputs(self.session)

    def infer(self, feeds: dict) -> dict:
        return dict(zip(self.names, self.session.run(self.names, feeds)))
