"""Reading ONNX files: subgraph walks, symbolic dims, external weight references, op types.
Pure onnx (no torch): `check`, `build`, the exporter and the tests share these."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


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


# float32 bytes one float16 weight may occupy once ONNX Runtime CPU casts it for its Gemm
WIDE_GEMM_BYTES = 256 << 20


def _row_parts(rows: int, need: int, most: int = 64) -> int:
    """The smallest number of equal row slices >= need that divides rows (0: none up to most)."""
    return next((p for p in range(max(need, 2), most + 1) if rows % p == 0), 0)


def split_wide_gemms(model: onnx.ModelProto, max_bytes: int = WIDE_GEMM_BYTES) -> int:
    """Rewrite every `Gemm(A [B, H], W [V, H], transB=1)` (no bias) whose float16 weight W would
    exceed `max_bytes` as float32 into a Scan over N equal row slices of W (one Gemm per slice,
    outputs stacked and reshaped to [B, V]): the same numbers (each output column is the same
    dot product), but ONNX Runtime CPU, which casts float16 weights to float32 per use, then
    casts one slice per iteration instead of a whole tied embedding (2.5 GB for Qwen3.5-4B).
    A Scan, not Slice nodes: ORT hoists the cast above a Slice (a precision-free op) and casts
    the whole table anyway. V must split into equal parts (up to 64). Subgraphs included.
    Returns the number of Gemms split."""
    from onnx import helper
    weights = {t.name: t for g in iter_graphs(model.graph) for t in g.initializer
               if t.data_type == TensorProto.FLOAT16 and len(t.dims) == 2}
    split = 0
    for graph in iter_graphs(model.graph):
        nodes = []
        for node in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            w = weights.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) == 2 \
                else None
            if w is None or attrs.get("transB") != 1 or attrs.get("transA", 0) \
                    or attrs.get("alpha", 1.0) != 1.0:
                nodes.append(node)
                continue
            rows, cols = w.dims
            need = -(-rows * cols * 4 // max_bytes)
            parts = _row_parts(rows, need) if need > 1 else 0
            if parts < 2:
                nodes.append(node)
                continue
            base = f"{node.name or node.output[0]}/split"
            names = {k: f"{base}.{k}" for k in ("shape", "slices", "stacked", "out_shape",
                                                "w", "y")}
            body = helper.make_graph(
                [helper.make_node("Gemm", [node.input[0], names["w"]], [names["y"]], transB=1)],
                f"{base}.body",
                [helper.make_tensor_value_info(names["w"], TensorProto.FLOAT16,
                                               [rows // parts, cols])],
                [helper.make_tensor_value_info(names["y"], TensorProto.FLOAT16, None)])
            for k, v in (("shape", [parts, rows // parts, cols]), ("out_shape", [0, -1])):
                nodes.append(helper.make_node("Constant", [], [names[k]], value=helper.
                                              make_tensor(names[k], TensorProto.INT64, [len(v)],
                                                          v)))
            nodes += [helper.make_node("Reshape", [w.name, names["shape"]], [names["slices"]]),
                      # y [B, parts, rows/parts]: slice i's product stacked on axis 1
                      helper.make_node("Scan", [names["slices"]], [names["stacked"]], body=body,
                                       num_scan_inputs=1, scan_output_axes=[1]),
                      helper.make_node("Reshape", [names["stacked"], names["out_shape"]],
                                       list(node.output))]
            split += 1
        del graph.node[:]
        graph.node.extend(nodes)
    return split


class GraphScope:
    """Names visible in one graph (constants, types, producers), chained to the enclosing
    graph's scope: what a subgraph node sees."""

    def __init__(self, graph: onnx.GraphProto, name: str, parent: Optional["GraphScope"] = None):
        self.graph, self.name, self.parent = graph, name, parent
        self.consts: dict[str, object] = {}  # name -> TensorProto | Constant NodeProto
        self.types: dict[str, onnx.TypeProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.WhichOneof("value") is not None:
                self.types[vi.name] = vi.type
        for init in graph.initializer:
            self.consts[init.name] = init
            self.types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
        for n in graph.node:
            for o in n.output:
                self.producer[o] = n
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
                self.consts[n.output[0]] = n

    def _find(self, attr: str, name: str):
        s = self
        while s is not None and name not in getattr(s, attr):
            s = s.parent
        return getattr(s, attr)[name] if s is not None else None

    def is_const(self, name: str) -> bool:
        return bool(name) and self._find("consts", name) is not None

    def const_value(self, name: str) -> Optional[np.ndarray]:
        c = self._find("consts", name) if name else None
        if isinstance(c, TensorProto):
            return numpy_helper.to_array(c)
        if isinstance(c, onnx.NodeProto) and c.attribute:
            v = helper.get_attribute_value(c.attribute[0])
            return numpy_helper.to_array(v) if isinstance(v, TensorProto) else np.asarray(v)
        return None

    def elem_type(self, name: str) -> Optional[int]:
        t = self._find("types", name) if name else None
        return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else None


def known_to_onnx() -> None:
    """Register the schemas of ONNX Runtime's ONNX-domain ops (pipo_graphs.contract
    .ORT_ONNX_DOMAIN_OPS) with onnx, once per process, so its checker accepts them."""
    from onnx import defs
    from pipo_graphs.contract import ORT_ONNX_DOMAIN_OPS
    s = defs.OpSchema
    opt = s.FormalParameterOption.Optional
    schemas = {"SimplifiedLayerNormalization": s(  # y = x / rms(x) * scale, along axis
        "SimplifiedLayerNormalization", "", 1,
        inputs=[s.FormalParameter("X", "T"), s.FormalParameter("scale", "T")],
        outputs=[s.FormalParameter("Y", "T"),
                 s.FormalParameter("inv_std_var", "T", param_option=opt)],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[s.Attribute(a, kind, "", required=False) for a, kind in
                    (("axis", s.AttrType.INT), ("epsilon", s.AttrType.FLOAT),
                     ("stash_type", s.AttrType.INT))])}
    for name in ORT_ONNX_DOMAIN_OPS:
        if not defs.has(name, ""):
            defs.register_schema(schemas[name])
