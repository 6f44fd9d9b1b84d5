"""Lowerings: how each export target expresses the model's kernels in ONNX.

A `Lowering` gives the torch implementations the pieces are traced with (`Kernels`: attention,
causal conv, delta rule, the sampler's greedy branch), plus what the ONNX exporter needs for
them: a custom translation table (torch custom op -> onnxscript function), extra opset imports
(e.g. com.microsoft), and graph passes run on every traced piece (e.g. norm fusion).
Adding a lowering is one module under this package defining `LOWERING`, plus one line in
`MODULES`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from pipo_graphs.contract import Target

from pipo_export.model.layers import Kernels

MODULES = {Target.ONNXRUNTIME: "pipo_export.export.lowering.onnxruntime",
           Target.TENSORRT: "pipo_export.export.lowering.standard"}


@dataclass(frozen=True)
class Lowering:
    name: str
    kernels: Kernels
    translation_table: dict = field(default_factory=dict)  # torch op overload -> onnxscript fn
    opset_imports: dict = field(default_factory=dict)  # extra ONNX domain -> version
    graph_passes: tuple = ()  # fn(onnx.ModelProto) -> None, in place, after tracing a piece

    @property
    def key(self) -> str:
        """Identifies the traced graphs this lowering produces (for the piece cache)."""
        return self.name


def lowering_for(target: Target) -> Lowering:
    """The lowering of an export target."""
    return importlib.import_module(MODULES[Target(target)]).LOWERING
