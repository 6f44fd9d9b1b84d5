"""Validate an export against the torch reference (optimum style): same inputs, stated
tolerance, per-output error statistics (Polygraphy style).

The reference runs in float64: at depth the float32 torch model is itself up to ~1e-3 away from
the exact result (e.g. keys after q/k RMSNorm), so a float32-vs-float32 comparison would measure
two noises. Against float64 every output of a float32 export stays within 1e-4 x its scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipo_graphs.contract import PAST, PRESENT, SAMPLING_INPUTS, UNIFORMS, present_to_past
from pipo_runtime.runners import GraphRunner

from pipo_export.model.steps import PipoStep

TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (2e-2, 2e-2), "bfloat16": (5e-2, 5e-2)}


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
    import copy
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
    with torch.no_grad():
        pair, conf, states = step.prefill(t["input_ids"], t["lengths"], sp, t[UNIFORMS])
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


def validate_steps(step: PipoStep, prefill: GraphRunner, decode: GraphRunner, prefill_feeds: dict,
                   decode_steps: int, sampling_feeds: dict, uniforms, atol: float, rtol: float,
                   state_dtype=np.float32):
    """Prefill then `decode_steps` decode steps; each graph gets the torch reference's own states
    (cast to `state_dtype`) as input, so errors do not compound. -> [(step, [OutputError])].

    A step whose tokens differ only where the float64 reference itself is at a near-tie (see
    `near_tie_tokens`) is reported as one `near_tie` entry instead: its token-dependent outputs
    cannot be compared, and the next step starts from the reference's states again."""
    report = []
    with SampleRecorder() as calls:
        ref = run_torch_prefill(step, prefill_feeds)
    report.append((0, _step_errors(prefill.infer(prefill_feeds), ref, calls, step, atol, rtol)))
    for i in range(1, decode_steps + 1):
        feeds = {"input_pair": ref["pair"], **sampling_feeds, UNIFORMS: uniforms(i),
                 **present_to_past({k: _graph_state(k, v, state_dtype) for k, v in ref.items()})}
        with SampleRecorder() as calls:
            ref = run_torch_decode(step, feeds)
        report.append((i, _step_errors(decode.infer(feeds), ref, calls, step, atol, rtol)))
    return report


class SampleRecorder:
    """Records every `sample` call of the reference step (a reversible patch, optimum style)."""

    MODULES = ("pipo_export.model.steps", "pipo_export.model.regular")

    def __enter__(self) -> list:
        import importlib
        from pipo_export.model import sampling
        self.calls, self.saved = [], []

        def recording(*args):
            self.calls.append(args)
            return sampling.sample(*args)

        for name in self.MODULES:
            module = importlib.import_module(name)
            self.saved.append((module, module.sample))
            module.sample = recording
        return self.calls

    def __exit__(self, *exc):
        for module, fn in self.saved:
            module.sample = fn


def near_tie_tokens(calls: list, got_pair: np.ndarray, ref_pair: np.ndarray, conf: np.ndarray,
                    threshold: np.ndarray, pad_id: int, eps: float, draws: int = 16) -> bool:
    """True when every differing token is one the float64 reference could also have picked:
    its logits nudged by Gaussian noise of eps x max|logits| (a few draws) give the export's
    token, or (token2 PAD vs not) its confidence is within eps of the gate threshold.
    calls: the reference's `sample` calls this step, in slot order (token1, token2)."""
    from pipo_export.model.sampling import sample
    gen = torch.Generator().manual_seed(0)
    for row, slot in zip(*np.nonzero(got_pair != ref_pair)):
        if slot == 1 and pad_id in (got_pair[row, 1], ref_pair[row, 1]):
            if abs(float(conf[row]) - float(threshold[row])) <= eps:
                continue
            return False
        if slot >= len(calls):
            return False
        logits, sp, prompt_mask, output_mask, u, cap = calls[slot]
        one = lambda t: t[row:row + 1]  # noqa: E731
        row_sp = {k: one(v) for k, v in sp.items()}
        scale = eps * float(logits[row].abs().max())
        if not any(int(sample(one(logits) + scale * torch.randn(one(logits).shape, generator=gen,
                                                                   dtype=logits.dtype),
                              row_sp, one(prompt_mask), one(output_mask), one(u), cap)[0])
                   == int(got_pair[row, slot]) for _ in range(draws)):
            return False
    return True


def _step_errors(got: dict, ref: dict, calls: list, step, atol: float, rtol: float) -> list:
    errors = compare_outputs(got, ref, atol, rtol)
    if not np.array_equal(got["pair"], ref["pair"]) and calls:
        threshold = calls[0][1]["threshold"].numpy()
        if near_tie_tokens(calls, got["pair"], ref["pair"], ref["confidence"], threshold,
                           step.pad_id, eps=10 * atol):
            return [OutputError("near_tie", 0.0, 0.0, 0)]
    return errors
