"""Graph passes of the ONNX Runtime lowering: rewrites of traced pieces into fused kernels.

`fuse_rms_norms`: the norms as traced (Qwen3.5's RMSNorm ``x * rsqrt(mean(x^2) + eps) * w``,
the gated norm's first half, and the Gated DeltaNet's q/k l2norm ``x * rsqrt(sum(x^2) + eps)``)
are 6-8 elementwise kernels each; ONNX Runtime's own fusion does not match the rsqrt form. Each
becomes one SimplifiedLayerNormalization (ONNX Runtime's RMSNorm kernel, ONNX domain, float
math). The l2norm is the same op with epsilon eps/D and scale 1/sqrt(D):
``x * rsqrt(sum(x^2) + eps) = x * rsqrt(mean(x^2) + eps/D) / sqrt(D)``.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipo_export.export.pieces import WEIGHT, WEIGHT_T
from pipo_export.onnx.graph import GraphScope, iter_graphs

RMS_NORM_OP = "SimplifiedLayerNormalization"  # ONNX Runtime's, in the ONNX domain (since 1)


class _Index:
    """Producers, consumers, constants and known shapes over a model and all its subgraphs."""

    def __init__(self, model: onnx.ModelProto):
        self.graphs = list(iter_graphs(model.graph))
        self.producer, self.users, self.consts, self.shapes = {}, {}, {}, {}
        for g in iter_graphs(_inferred(model).graph):
            for vi in list(g.input) + list(g.value_info) + list(g.output):
                dims = vi.type.tensor_type.shape.dim
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                        for d in dims]
        self.weights = set()  # stored tensors: piece weight inputs, external initializers
        for g in self.graphs:
            self.weights.update(vi.name for vi in g.input if vi.name.startswith((WEIGHT, WEIGHT_T)))
            scope = GraphScope(g, g.name)  # constants: initializers and Constant nodes
            for name, const in scope.consts.items():
                if isinstance(const, TensorProto) and const.data_location == TensorProto.EXTERNAL:
                    self.weights.add(name)
                    self.shapes[name] = list(const.dims)
                else:
                    self.consts[name] = scope.const_value(name)
            for node in g.node:
                for out in node.output:
                    self.producer[out] = (node, g)
                for name in node.input:
                    self.users.setdefault(name, []).append(node)

    def node(self, name: str, op: str):
        """The node producing `name` if it is an `op`, else None."""
        got = self.producer.get(name)
        return got[0] if got and got[0].op_type == op else None

    def only_user(self, name: str):
        users = self.users.get(name, [])
        return users[0] if len(users) == 1 else None

    def last_dim(self, name: str) -> int | None:
        """The last dim of `name`: inferred, or the constant shape of the Reshape producing it."""
        shape = self.shapes.get(name)
        if shape and shape[-1]:
            return shape[-1]
        reshape = self.node(name, "Reshape")
        target = self.consts.get(reshape.input[1]) if reshape is not None else None
        return int(target[-1]) if target is not None and target.size and target[-1] > 0 else None

    def scalar(self, name: str) -> float | None:
        value = self.consts.get(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def last_axis(self, node) -> bool:
        """A Reduce* node over the last axis only, keepdims=1 (axes as input, opset >= 18)."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = self.consts.get(node.input[1]) if len(node.input) > 1 else None
        rank = len(self.shapes.get(node.input[0], [])) or None
        return (attrs.get("keepdims", 1) == 1 and axes is not None and axes.size == 1
                and (int(axes[0]) == -1 or (rank is not None and int(axes[0]) == rank - 1)))

    def vector_width(self, name: str) -> int | None:
        """D when `name` is a weight input of shape [D], optionally plus a scalar constant."""
        add = self.node(name, "Add")
        if add is not None:
            weights = [i for i in add.input if i not in self.consts]
            if len(weights) != 1 or len(add.input) != 2:
                return None
            name = weights[0]
        shape = self.shapes.get(name)
        is_weight = name in self.weights or name in self.consts
        return shape[0] if is_weight and shape and len(shape) == 1 and shape[0] else None


def _match(ix: _Index, recip) -> dict | None:
    """Reciprocal(Sqrt(Add(Reduce(x*x), eps))) consumed by Mul(x, .) -> the pieces, or None."""
    sqrt = ix.node(recip.input[0], "Sqrt")
    add = sqrt and ix.node(sqrt.input[0], "Add")
    if add is None:
        return None
    eps = [ix.scalar(i) for i in add.input]
    reduce_out = add.input[1] if eps[0] is not None else add.input[0]
    eps = eps[0] if eps[0] is not None else eps[1]
    red = ix.node(reduce_out, "ReduceMean") or ix.node(reduce_out, "ReduceSum")
    if eps is None or red is None or not ix.last_axis(red):
        return None
    sq = ix.producer.get(red.input[0], (None,))[0]
    if sq is None or sq.op_type not in ("Pow", "Mul"):
        return None
    x = sq.input[0]
    eps_type = ix.consts[add.input[0] if reduce_out == add.input[1] else add.input[1]].dtype
    if eps_type != np.float32:  # Add's operands share a type: x is float32
        return None
    if sq.op_type == "Pow" and ix.scalar(sq.input[1]) != 2.0 or \
            sq.op_type == "Mul" and sq.input[1] != x:
        return None
    mul = ix.only_user(recip.output[0])
    if mul is None or mul.op_type != "Mul" or set(mul.input) != {x, recip.output[0]}:
        return None
    chain = [sq, red, add, sqrt, recip]
    if any(ix.only_user(n.output[0]) is None for n in chain):
        return None
    mean = red.op_type == "ReduceMean"
    scale_mul, width = (ix.only_user(mul.output[0]) if mean else None), None  # l2norm: no weight
    if scale_mul is not None and scale_mul.op_type == "Mul":
        other = [i for i in scale_mul.input if i != mul.output[0]]
        width = ix.vector_width(other[0]) if len(other) == 1 else None
    if width is None:
        scale_mul = None
        width = ix.last_dim(x)
    if not width:
        return None
    return {"x": x, "eps": eps, "mean": mean, "width": width,
            "nodes": chain + [mul] + ([scale_mul] if scale_mul else []),
            "scale": other[0] if scale_mul else None,
            "out": (scale_mul or mul).output[0]}


def fuse_rms_norms(model: onnx.ModelProto) -> int:
    """Rewrite every RMSNorm / l2norm chain of `model` (subgraphs included) into one
    SimplifiedLayerNormalization, in place. -> the number of norms fused."""
    ix, fused = _Index(model), 0
    for graph in ix.graphs:
        for recip in [n for n in graph.node if n.op_type == "Reciprocal"]:
            m = _match(ix, recip)
            if m is None or any(ix.producer[n.output[0]][1] is not graph for n in m["nodes"]):
                continue
            name, scale, width = m["out"] + "/rms", m["scale"], int(m["width"])
            new = []
            if scale is None:  # no weight: ones (RMSNorm) or 1/sqrt(D) (l2norm)
                scale = name + "/scale"
                value = np.full(width, 1.0 if m["mean"] else 1.0 / np.sqrt(width), np.float32)
                new.append(helper.make_node("Constant", [], [scale], name + "/scale",
                                            value=numpy_helper.from_array(value)))
            eps = m["eps"] if m["mean"] else m["eps"] / width
            new.append(helper.make_node(RMS_NORM_OP, [m["x"], scale], [m["out"]], name, axis=-1,
                                        epsilon=eps, stash_type=1))
            nodes = list(graph.node)
            at = nodes.index(m["nodes"][-1])  # every input of the fused node is defined by now
            at -= sum(nodes.index(n) < at for n in m["nodes"])
            for n in m["nodes"]:
                graph.node.remove(n)
            for i, n in enumerate(new):
                graph.node.insert(at + i, n)
            fused += 1
    return fused


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with ONNX's shape inference filled in (contrib ops just stop it)."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 (inference is a hint: without it fewer norms fuse)
        return model
