"""split_wide_gemms: a float16 lm_head-like Gemm split by vocabulary rows gives the same logits
in ONNX Runtime (independent computation: numpy float64 of the same float16 weights)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pipo_export.onnx.graph import split_wide_gemms


def _model(w: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.shape[1]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w.shape[0]])
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
             helper.make_node("Gemm", ["xh", "w"], ["yh"], transB=1, name="lm_head"),
             helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_split_gemm_equals_whole_and_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1003, 64)).astype(np.float16)  # rows not a multiple of the parts
    x = rng.standard_normal((3, 64)).astype(np.float32)
    whole = _model(w)
    split = _model(w)
    assert split_wide_gemms(split, max_bytes=60_000) == 1  # 256,768 B as float32: 5 parts
    ops = [n.op_type for n in split.graph.node]
    assert ops.count("Gemm") == 5 and ops.count("Slice") == 5 and "Concat" in ops
    onnx.checker.check_model(split)
    want = x.astype(np.float16).astype(np.float64) @ w.astype(np.float64).T
    # ORT may keep the split Gemms' outputs in float32 (its casts move), so both are held to
    # numpy: float16 rounding of logits of magnitude <= ~30 is <= 2**-11 relative, 0.016 absolute
    for got in (_run(whole, x), _run(split, x)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-2)
    assert split_wide_gemms(_model(w.astype(np.float32))) == 0  # float32 weights untouched
    assert split_wide_gemms(_model(w)) == 0  # under the default limit
