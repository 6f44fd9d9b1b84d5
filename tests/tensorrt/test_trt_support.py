"""The TensorRT parser support table's lint on small hand-made models (no export, no TensorRT):
a clean graph with subgraphs, a TopK over the TensorRT limit, a contrib op and sequence ops."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper as h, numpy_helper

from pipo_export.onnx.trt_support import TOPK_MAX_K, lint_model


def vi(name, shape, et=TensorProto.FLOAT):
    return h.make_tensor_value_info(name, et, shape)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def test_clean_graph_with_if_and_scan_has_no_issue():
    then_g = h.make_graph([h.make_node("Relu", ["y"], ["t_out"])], "then", [], [vi("t_out", [2, 4])])
    else_g = h.make_graph([h.make_node("Neg", ["y"], ["e_out"])], "else", [], [vi("e_out", [2, 4])])
    body = h.make_graph([h.make_node("Add", ["s_in", "x_t"], ["s_out"]),
                         h.make_node("Identity", ["s_out"], ["y_t"])],
                        "scan_body", [vi("s_in", [4]), vi("x_t", [4])],
                        [vi("s_out", [4]), vi("y_t", [4])])
    model = h.make_model(h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["mm"]), h.make_node("Softmax", ["mm"], ["y"], axis=-1),
         h.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
         h.make_node("Scan", ["s0", "z"], ["s_final", "scan_out"], body=body, num_scan_inputs=1)],
        "clean", [vi("x", [2, 3]), vi("cond", [], TensorProto.BOOL), vi("s0", [4])],
        [vi("s_final", [4]), vi("scan_out", [2, 4])], [init("w", np.ones((3, 4), np.float32))]),
        opset_imports=[h.make_opsetid("", 17)])
    assert lint_model(model) == []


def test_topk_over_the_tensorrt_limit():
    model = h.make_model(h.make_graph(
        [h.make_node("TopK", ["x", "k"], ["vals", "idx"], axis=-1)], "topk", [vi("x", [1, 8000])],
        [vi("vals", [1, 5000]), vi("idx", [1, 5000], TensorProto.INT64)],
        [init("k", np.array([5000], np.int64))]), opset_imports=[h.make_opsetid("", 17)])
    (issue,) = lint_model(model)
    assert issue.op_type == "TopK" and issue.severity == "error"
    assert f"K=5000 exceeds the TensorRT TopK limit ({TOPK_MAX_K})" in issue.problem


def test_contrib_op_and_sequences():
    model = h.make_model(h.make_graph(
        [h.make_node("FusedGelu", ["x"], ["g"], domain="com.microsoft"),
         h.make_node("SplitToSequence", ["g"], ["seq"], axis=0),
         h.make_node("SequenceAt", ["seq", "pos"], ["y"])],
        "ms", [vi("x", [4, 4])], [vi("y", [1, 4])], [init("pos", np.array(0, np.int64))]),
        opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    issues = lint_model(model)
    assert [(i.op_type, i.severity) for i in issues] == [
        ("FusedGelu", "error"), ("SplitToSequence", "error"), ("SequenceAt", "error")]
    assert "non-default domain 'com.microsoft'" in issues[0].problem
    assert all("no sequence types" in i.problem for i in issues[1:])
