"""Stitch traced pieces into one ONNX graph: embed -> layer 0 .. layer N-1 -> head.

Each instance of a piece gets its nodes and internal values prefixed (``layers.3/...``); its
inputs are bound to values already in the graph (graph inputs, or outputs of earlier pieces)
and its outputs either become graph outputs under their contract names or stay internal. Weight
inputs (``w:<param>``) are bound to initializers named by checkpoint name whose bytes live in the
shared external file (`WeightRef`): every layer of a type is the same traced piece with other
weights, and a weight two graphs use is stored once. Piece constants are added once per piece.
Names inside subgraphs (If branches, Scan bodies) are renamed with the same map, so references
to outer values stay intact.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from pipo_graphs.dtypes import ONNX_CODES

from pipo_export.errors import ExportError
from pipo_export.export.io_spec import GraphSpec, TensorSpec
from pipo_export.export.pieces import Piece, weight_input

ONNX_DTYPES = ONNX_CODES  # contract dtype name -> TensorProto.DataType


@dataclass(frozen=True)
class WeightRef:
    """Where a weight's bytes are: `length` bytes at `offset` of the external file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


def _rename_graph(graph: onnx.GraphProto, rename) -> None:
    """Apply `rename` to every value and node name of `graph` and its subgraphs, in place."""
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        vi.name = rename(vi.name)
    for init in graph.initializer:
        init.name = rename(init.name)
    for node in graph.node:
        node.input[:] = [rename(n) if n else n for n in node.input]
        node.output[:] = [rename(n) if n else n for n in node.output]
        node.name = rename(node.name) if node.name else node.name
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_graph(attr.g, rename)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _rename_graph(sub, rename)


class GraphAssembler:
    """Builds one graph from piece instances; `values` maps a logical name (``x``, ``valid``,
    ``past.key.3``, ...) to the graph value currently carrying it."""

    def __init__(self, spec: GraphSpec, weights: dict[str, WeightRef], data_file: str):
        self.spec, self.weights, self.data_file = spec, weights, data_file
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.opsets: dict[str, int] = {}
        self.ir_version = 0
        self.constants_added: set[str] = set()
        self.values = {t.name: t.name for t in spec.inputs}

    def add(self, piece: Piece, proto: onnx.ModelProto, prefix: str, layer: int | None = None,
            bind: dict[str, str] | None = None, outputs: dict[str, str] | None = None) -> None:
        """Instantiate `piece` (traced as `proto`). Inputs read `values[bind.get(name, name)]`;
        output k becomes graph value `outputs[k]` if given (a contract output name), else
        `prefix/k`, and is recorded in `values` under its piece name."""
        bind, outputs = bind or {}, outputs or {}
        graph = onnx.GraphProto()
        graph.CopyFrom(proto.graph)
        n_in, n_out = len(piece.inputs), len(piece.outputs)
        if any(weight_input(vi.name) for vi in graph.input[:n_in]) or len(graph.output) != n_out:
            raise ExportError(f"{piece.name}: traced graph has {len(graph.input)} inputs and "
                              f"{len(graph.output)} outputs, expected {n_in} activations first "
                              f"and {n_out} outputs")
        mapping: dict[str, str] = {}
        for spec, vi in zip(piece.inputs, graph.input[:n_in]):
            key = bind.get(spec.name, spec.name)
            if key not in self.values:
                raise ExportError(f"{piece.name}: input {spec.name} needs value {key}, which no "
                                  "earlier piece produced")
            mapping[vi.name] = self.values[key]
        for name, vi in zip(weight_names(piece, proto, layer), graph.input[n_in:]):
            mapping[vi.name] = self._weight(name)
        constants = {init.name for init in graph.initializer}
        for name in constants:
            mapping[name] = f"{piece.name}/{name}"
        aliases = []  # outputs that are inputs (or another output) in the traced piece
        produced: dict[str, str] = {}
        for spec, vi in zip(piece.outputs, graph.output):
            final = outputs.get(spec.name, f"{prefix}/{spec.name}")
            if vi.name in mapping or vi.name in produced:
                aliases.append((produced.get(vi.name) or mapping[vi.name], final))
            else:
                mapping[vi.name] = produced[vi.name] = final
            self.values[spec.name] = final

        def rename(name: str) -> str:
            return mapping.get(name, f"{prefix}/{name}")

        _rename_graph(graph, rename)
        for init in graph.initializer:
            if init.name not in self.constants_added:
                self.constants_added.add(init.name)
                self.initializers[init.name] = init
        self.nodes.extend(graph.node)
        for source, final in aliases:
            self.nodes.append(helper.make_node("Identity", [source], [final],
                                               name=f"{prefix}/alias/{final}"))
        for f in proto.functions:
            self.functions.setdefault((f.domain, f.name), f)
        for op in proto.opset_import:
            have = self.opsets.setdefault(op.domain, op.version)
            if have != op.version:
                raise ExportError(f"{piece.name}: opset {op.domain or 'ai.onnx'} {op.version}, "
                                  f"other pieces use {have}")
        self.ir_version = max(self.ir_version, proto.ir_version)

    def _weight(self, name: str) -> str:
        if name not in self.initializers:
            ref = self.weights.get(name)
            if ref is None:
                raise ExportError(f"weight {name} was not written to {self.data_file}")
            t = onnx.TensorProto(name=name, data_type=ONNX_DTYPES[ref.dtype], dims=ref.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.data_file), ("offset", str(ref.offset)),
                         ("length", str(ref.length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            self.initializers[name] = t
        return name

    def alias(self, value: str, final: str) -> None:
        """Make graph output `final` carry logical value `value` (an Identity)."""
        self.nodes.append(helper.make_node("Identity", [self.values[value]], [final],
                                           name=f"alias/{final}"))

    def model(self, extra_outputs: tuple[TensorSpec, ...] = ()) -> onnx.ModelProto:
        """The assembled model; graph I/O typed and shaped from the contract spec."""
        def vi(t: TensorSpec):
            return helper.make_tensor_value_info(t.name, ONNX_DTYPES[t.dtype], list(t.shape))
        graph = helper.make_graph(self.nodes, self.spec.name, [vi(t) for t in self.spec.inputs],
                                  [vi(t) for t in self.spec.outputs + extra_outputs],
                                  list(self.initializers.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                        for d, v in sorted(self.opsets.items())],
                                  functions=list(self.functions.values()))
        model.ir_version = self.ir_version
        return model


def weight_names(piece: Piece, proto: onnx.ModelProto, layer: int | None = None) -> list[str]:
    """Stored names of the weights an instance of `piece` reads, in input order: the checkpoint
    name plus the suffix of the weight input's form (transposed, quantized parts)."""
    out = []
    for vi in proto.graph.input[len(piece.inputs):]:
        param, suffix = weight_input(vi.name)
        out.append(piece.global_name(param, layer) + suffix)
    return out


__all__ = ["GraphAssembler", "WeightRef", "weight_names", "WEIGHT"]
