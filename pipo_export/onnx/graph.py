"""Reading ONNX files: subgraph walks, symbolic dims, external weight references, op types.
Pure onnx (no torch): `check`, `build`, the exporter and the tests share these."""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto


def iter_graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If branches, Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def strip_metadata(model: onnx.ModelProto) -> None:
    """Drop per-node tracer metadata (torch stack traces): most of a graph file's bytes."""
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""


def weight_refs(path: Path) -> list[tuple[str, int, int]]:
    """(location, offset, length) of every external initializer of a model, subgraphs included."""
    model = onnx.load(str(path), load_external_data=False)
    refs = []
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                kv = {e.key: e.value for e in t.external_data}
                refs.append((kv["location"], int(kv.get("offset", 0)), int(kv["length"])))
    return refs


def symbolic_dims(path: Path) -> dict[str, list]:
    """Graph input/output name -> dims (str for symbolic, int for fixed)."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        out[vi.name] = [d.dim_param if d.dim_param else d.dim_value
                        for d in vi.type.tensor_type.shape.dim]
    return out


def op_types(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {n.op_type for g in iter_graphs(model.graph) for n in g.node}
