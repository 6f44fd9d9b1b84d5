"""The onnxruntime lowering's graph passes: norm fusion checked against numpy, and the shape of
an onnxruntime-target export (fused norms, the greedy-branch If)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipo_export.export.lowering.fusions import RMS_NORM_OP, fuse_rms_norms
from pipo_export.onnx.graph import iter_graphs

EPS = 1e-6
# SimplifiedLayerNormalization vs the numpy formula in float64: float32 rounding of a
# handful of reductions over 128 values
TOL = 2e-6


def _const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.asarray(value, np.float32 if np.asarray(value).dtype.kind == "f" else np.int64)))


def _norm_graph(kind: str, axis: int = -1, keepdims: int = 1) -> onnx.ModelProto:
    """x [2, 3, 128] -> the traced form of an RMSNorm ("rms": * (1 + w)), an unweighted RMSNorm
    ("plain"), an l2norm ("l2") or an l2norm times a weight ("l2w": the Mul stays its own)."""
    nodes = [_const("two", 2.0), _const("axes", [axis]), _const("eps", EPS)]
    if kind.startswith("l2"):
        nodes += [helper.make_node("Mul", ["x", "x"], ["sq"]),
                  helper.make_node("ReduceSum", ["sq", "axes"], ["red"], keepdims=keepdims)]
    else:
        nodes += [helper.make_node("Pow", ["x", "two"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq", "axes"], ["red"], keepdims=keepdims)]
    nodes += [helper.make_node("Add", ["red", "eps"], ["var"]),
              helper.make_node("Sqrt", ["var"], ["std"]),
              helper.make_node("Reciprocal", ["std"], ["inv"]),
              helper.make_node("Mul", ["x", "inv"], ["normed"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 128])]
    out = "normed"
    if kind == "rms":
        inputs.append(helper.make_tensor_value_info("w:norm.weight", TensorProto.FLOAT, [128]))
        nodes += [_const("one", 1.0), helper.make_node("Add", ["w:norm.weight", "one"], ["w1"]),
                  helper.make_node("Mul", ["normed", "w1"], ["y"])]
        out = "y"
    if kind == "l2w":
        inputs.append(helper.make_tensor_value_info("w:norm.weight", TensorProto.FLOAT, [128]))
        nodes.append(helper.make_node("Mul", ["normed", "w:norm.weight"], ["y"]))
        out = "y"
    nodes.append(helper.make_node("Identity", [out], ["out"]))
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _numpy(kind, x, w):
    x = x.astype(np.float64)
    if kind.startswith("l2"):
        y = x / np.sqrt((x * x).sum(-1, keepdims=True) + EPS)
        return y * w if kind == "l2w" else y
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    return y * (1.0 + w) if kind == "rms" else y


@pytest.mark.parametrize("kind", ["rms", "plain", "l2", "l2w"])
def test_norm_chains_fuse_into_one_op_with_the_same_values(kind):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 3, 128)) * 3).astype(np.float32)
    w = rng.normal(size=128).astype(np.float32) * 0.1
    feeds = {"x": x, **({"w:norm.weight": w} if kind in ("rms", "l2w") else {})}
    model = _norm_graph(kind)
    assert fuse_rms_norms(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(RMS_NORM_OP) == 1
    assert not {"Pow", "ReduceMean", "ReduceSum", "Sqrt", "Reciprocal"} & set(ops)
    assert ops.count("Mul") == (kind == "l2w")
    want = _numpy(kind, x, w)
    got = _run(model, feeds)
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()


@pytest.mark.parametrize("axis,keepdims", [(1, 1), (-1, 0)])
def test_other_reductions_are_left_alone(axis, keepdims):
    model = _norm_graph("plain", axis=axis, keepdims=keepdims)
    before = [n.op_type for n in model.graph.node]
    assert fuse_rms_norms(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def _ops(path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return [n.op_type for g in iter_graphs(model.graph) for n in g.node]


def test_onnxruntime_export_has_fused_norms_and_a_greedy_branch(ort_export, trt_export):
    """Every norm of the tiny model is one SimplifiedLayerNormalization in the onnxruntime
    target (tensorrt keeps the standard ops), and the decode graph's samplers sit in Ifs whose
    one branch is a lone ArgMax."""
    ops = _ops(ort_export / "decode_unfold.onnx")
    # decode norms of pipo-tiny-ref (4 layers: 3 Gated DeltaNet, 1 full attention): per layer
    # input + post-attention; DeltaNet: q/k l2norm + gated norm; attention: q/k norm;
    # head: final norm, MTP's 2 pre-fc norms, input + post-attention + q/k norms, its final
    # norm, the confidence norm
    want = 4 * 2 + 3 * 3 + 1 * 2 + 1 + 2 + 4 + 1 + 1
    assert ops.count(RMS_NORM_OP) == want
    assert "Reciprocal" not in ops
    assert RMS_NORM_OP not in _ops(trt_export / "decode_unfold.onnx")
    model = onnx.load(str(ort_export / "decode_unfold.onnx"), load_external_data=False)
    lone_argmax = 0
    for g in iter_graphs(model.graph):
        for node in g.node:
            if node.op_type == "If":
                branches = [[n.op_type for n in a.g.node] for a in node.attribute]
                lone_argmax += any([o for o in b if o not in ("Identity", "Cast")] == ["ArgMax"]
                                   for b in branches)
    assert lone_argmax == 2  # token1 and token2
