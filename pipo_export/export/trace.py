"""Trace PipoStep.prefill / PipoStep.decode into ONNX with torch.onnx (dynamo)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.export import Dim

from pipo_graphs.contract import SAMPLING_INPUTS, StateSpec

from pipo_export.errors import ExportError
from pipo_export.model.steps import PipoStep
from pipo_export.export.io_spec import GraphSpec

EXAMPLE_BATCH = 2
EXAMPLE_PROMPT_PAIRS = 130  # three 64-pair chunks: a one-chunk example would specialize the length
EXAMPLE_PAST_PAIRS = 7


class PrefillGraph(nn.Module):
    """Flat-argument wrapper: (input_ids, lengths, *sampling, uniforms) -> (pair, conf, *states)."""

    def __init__(self, step: PipoStep, states: list[StateSpec]):
        super().__init__()
        self.step, self.names = step, [s.name for s in states]

    def forward(self, input_ids, lengths, temperature, top_k, top_p, min_p, presence_penalty,
                repetition_penalty, threshold, uniforms):
        torch._check(input_ids.shape[1] // 2 >= 1)  # lets the tracer drop Max(1, T//2) strides
        sp = dict(zip([n for n, _ in SAMPLING_INPUTS], (temperature, top_k, top_p, min_p,
                                                         presence_penalty, repetition_penalty,
                                                         threshold)))
        pair, conf, states = self.step.prefill(input_ids, lengths, sp, uniforms)
        return (pair, conf, *[states[n] for n in self.names])


class DecodeGraph(nn.Module):
    """(input_pair, past_states tuple, *sampling, uniforms) -> (pair, conf, *states)."""

    def __init__(self, step: PipoStep, states: list[StateSpec]):
        super().__init__()
        self.step, self.names = step, [s.name for s in states]

    def forward(self, input_pair, past, temperature, top_k, top_p, min_p, presence_penalty,
                repetition_penalty, threshold, uniforms):
        sp = dict(zip([n for n, _ in SAMPLING_INPUTS], (temperature, top_k, top_p, min_p,
                                                         presence_penalty, repetition_penalty,
                                                         threshold)))
        pair, conf, states = self.step.decode(input_pair, dict(zip(self.names, past)), sp, uniforms)
        return (pair, conf, *[states[n] for n in self.names])


def sampling_example(batch: int) -> list[torch.Tensor]:
    vals = {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "min_p": 0.0, "presence_penalty": 0.5,
            "repetition_penalty": 1.1, "threshold": 0.5}
    return [torch.full((batch,), vals[n], dtype=getattr(torch, dt)) for n, dt in SAMPLING_INPUTS]


def _dims(batch: Dim, spec_shape: tuple, named: dict) -> dict:
    return {i: named[d] for i, d in enumerate(spec_shape) if isinstance(d, str)}


def export_graph(module: nn.Module, args: tuple, dynamic_shapes, spec: GraphSpec, path: Path,
                 opset: int) -> None:
    """Export `module(*args)` to path (weights as external data, unoptimized)."""
    with torch.no_grad(), _quiet_exporter():
        try:
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                     dynamic_shapes=dynamic_shapes, input_names=spec.input_names,
                                     output_names=spec.output_names, optimize=False,
                                     verbose=False, report=False)
        except Exception as exc:  # the exporter raises many types; keep the cause visible
            raise ExportError(f"tracing {spec.name} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    fold_small_constants(prog)
    prog.save(str(path), external_data=True)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter that is no news to our users: torchvision ops it skips,
    dim-name reuse notices and pytree deprecations. Errors still raise."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        try:
            yield
        finally:
            logger.setLevel(level)


FOLD_LIMIT = 4096  # elements: fold shape/axes arithmetic, never rewrite (and duplicate) weights


def fold_small_constants(prog) -> None:
    """Constant-fold what the tracer left computed (Reduce axes, shapes, masks), keeping every
    large weight as is so both graphs still share it byte for byte."""
    import onnxscript.optimizer

    prog.model = onnxscript.optimizer.optimize(prog.model, input_size_limit=FOLD_LIMIT,
                                               output_size_limit=FOLD_LIMIT)


def prefill_example(step: PipoStep, batch: int = EXAMPLE_BATCH, pairs: int = EXAMPLE_PROMPT_PAIRS):
    vocab = step.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, 2 * pairs), generator=gen)
    lengths = torch.tensor([2 * pairs - 1 - (pairs * i) // batch for i in range(batch)],
                           dtype=torch.long)  # mixed lengths, one odd
    uniforms = torch.rand(batch, 2, generator=gen)
    return (ids, lengths, *sampling_example(batch), uniforms)


def trace_prefill(step: PipoStep, spec: GraphSpec, states: list[StateSpec], path: Path, opset: int):
    batch, pairs = Dim("batch", min=1, max=4096), Dim("prompt_pairs", min=1, max=1 << 20)
    dyn = [{0: batch, 1: 2 * pairs}, {0: batch}] + [{0: batch}] * 7 + [{0: batch}]
    export_graph(PrefillGraph(step, states).eval(), prefill_example(step), tuple(dyn), spec,
                 path, opset)


def trace_decode(step: PipoStep, spec: GraphSpec, states: list[StateSpec], path: Path, opset: int):
    ex = prefill_example(step, EXAMPLE_BATCH, EXAMPLE_PAST_PAIRS)
    with torch.no_grad():
        pair, _, st = step.prefill(ex[0], ex[1], dict(zip([n for n, _ in SAMPLING_INPUTS], ex[2:9])),
                                   ex[9])
    batch, past = Dim("batch", min=1, max=4096), Dim("past_pairs", min=1, max=1 << 20)
    named = {"batch": batch, "past_pairs": past}
    past_dyn = tuple(_dims(batch, s.shape, named) for s in states)
    dyn = ({0: batch}, past_dyn) + ({0: batch},) * 7 + ({0: batch},)
    args = (pair, tuple(st[s.name] for s in states), *ex[2:])
    export_graph(DecodeGraph(step, states).eval(), args, dyn, spec, path, opset)
