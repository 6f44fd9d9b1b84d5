"""The onnx-reference backend: onnx's own reference evaluator (numpy). Slow and independent of
ONNX Runtime, for small models and parity checks. Needs the `onnx` package
(pip install 'pipo-runtime[reference]')."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipo_graphs.contract import (CONFIDENCE, DECODE, INPUT_PAIR, LENGTHS, ORT_ONNX_DOMAIN_OPS,
                                  PAIR, PAST, PREFILL, PRESENT, SAMPLING_INPUTS, UNIFORMS,
                                  present_to_past)
from pipo_graphs.errors import PipoUserError
from pipo_graphs.shapes import pair_axes

from pipo_runtime.backends.base import RunnerOptions, StepRunner, prefill_extras
from pipo_runtime.requests import GraphInput


def _reference_ops():
    """Replacements for onnx reference kernels with limits our graphs exceed."""
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        # onnx's version uses np.choose, which numpy caps at 64 choices along the axis
        def _run(self, data, indices, axis=None):
            axis = 0 if axis is None else axis
            return (np.take_along_axis(data, np.where(indices < 0, indices + data.shape[axis],
                                                      indices), axis=axis),)

    return [GatherElements]


def _graphs(graph):
    """A graph and every subgraph (If branches) under it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def _contrib_ops(model) -> list[str]:
    """The ONNX Runtime contrib ops an onnx ModelProto uses (subgraphs included), sorted."""
    return sorted({f"{n.domain}::{n.op_type}".lstrip(":") for g in _graphs(model.graph)
                   for n in g.node if n.domain not in ("", "ai.onnx")
                   or n.op_type in ORT_ONNX_DOMAIN_OPS})


def _refuse_contrib(path: Path, contrib: list[str]) -> None:
    if contrib:
        raise PipoUserError(f"{path.name} uses ONNX Runtime contrib ops ({', '.join(contrib)}),"
                            " which onnx's reference evaluator cannot run; compare the "
                            "--target tensorrt export (standard ops) on onnx-reference")


def check_standard_ops(folder: Path, manifest) -> None:
    """PipoUserError (one line) when a graph of the export in `folder` uses ONNX Runtime contrib
    ops, which this backend cannot run; reads the graphs without their weights."""
    import onnx
    for name in (PREFILL, DECODE):
        path = Path(folder) / manifest.graphs[name].file
        _refuse_contrib(path, _contrib_ops(onnx.load(str(path), load_external_data=False)))


class _Graph:
    """One graph in a ReferenceEvaluator: run(feeds) -> every output by name (numpy)."""

    def __init__(self, path: Path):
        import onnx
        from onnx.reference import ReferenceEvaluator
        try:
            model = onnx.load(str(path), load_external_data=True)
        except Exception as exc:  # protobuf DecodeError, a missing external file, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise PipoUserError(f"{path.name}: onnx cannot load it ({first}); re-export") \
                from None
        _refuse_contrib(path, _contrib_ops(model))
        self.evaluator = ReferenceEvaluator(model, new_ops=_reference_ops())
        self.output_names = [o.name for o in model.graph.output]
        self.inputs = [GraphInput(i.name, onnx.helper.tensor_dtype_to_np_dtype(
            i.type.tensor_type.elem_type).name, tuple(d.dim_param or d.dim_value
                                                      for d in i.type.tensor_type.shape.dim))
            for i in model.graph.input]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.evaluator.run(None, feeds)))


class OnnxReferenceStepRunner(StepRunner):
    """prefill/decode with numpy feeds and outputs; each step's outputs are the next's states
    (host_states/load_states are those numpy arrays: row operations copy nothing extra)."""

    name = "onnx-reference"
    concurrent = False  # onnx's ReferenceEvaluator makes no thread-safety promise

    def __init__(self, prefill_path: Path, decode_path: Path):
        try:
            self.pre, self.dec = _Graph(prefill_path), _Graph(decode_path)
        except ImportError as exc:
            raise PipoUserError(f"the onnx-reference backend needs the onnx package ({exc}); "
                                "pip install 'pipo-runtime[reference]'") from None
        self.pair_axes = pair_axes({PRESENT + i.name[len(PAST):]: i.shape
                                    for i in self.dec.inputs if i.name.startswith(PAST)})
        self.last = self.fixed = None

    def prefill(self, feeds):
        self.fixed = {n: feeds[n] for n, _ in SAMPLING_INPUTS}
        past = prefill_extras(self.pre.inputs, feeds, len(feeds[LENGTHS]))
        self.last = self.pre.run({**feeds, **{k: np.asarray(v) for k, v in past.items()}})
        return self.last[PAIR], self.last[CONFIDENCE]

    def decode(self, uniforms):
        self.last = self.dec.run({INPUT_PAIR: self.last[PAIR], **present_to_past(self.last),
                                  **self.fixed, UNIFORMS: uniforms})
        return self.last[PAIR], self.last[CONFIDENCE]

    def outputs(self):
        return dict(self.last)

    def host_states(self):
        if self.last is None:
            return {}
        return {**{k: v for k, v in self.last.items() if k.startswith(PRESENT) or k == PAIR},
                **self.fixed}

    def load_states(self, states):
        self.fixed = {n: states[n] for n, _ in SAMPLING_INPUTS} if states else None
        self.last = {k: v for k, v in states.items() if k not in self.fixed} if states else None

    def end(self):
        self.last = self.fixed = None


def load(folder: Path, manifest, options: RunnerOptions) -> OnnxReferenceStepRunner:
    return OnnxReferenceStepRunner(folder / manifest.graphs[PREFILL].file,
                                   folder / manifest.graphs[DECODE].file)
