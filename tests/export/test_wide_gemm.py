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
    # 256,768 B as float32 needs 5 parts; 1003 = 17 x 59 rows split into 17 equal parts
    assert split_wide_gemms(split, max_bytes=60_000) == 1
    ops = [n.op_type for n in split.graph.node]
    assert "Gemm" not in ops and ops.count("Scan") == 1
    scan = next(n for n in split.graph.node if n.op_type == "Scan")
    body = scan.attribute[0].g
    assert [n.op_type for n in body.node] == ["Gemm"]
    assert [d.dim_value for d in body.input[0].type.tensor_type.shape.dim] == [59, 64]
    onnx.checker.check_model(split)
    want = x.astype(np.float16).astype(np.float64) @ w.astype(np.float64).T
    # ORT may keep the split Gemms' outputs in float32 (its casts move), so both are held to
    # numpy: float16 rounding of logits of magnitude <= ~30 is <= 2**-11 relative, 0.016 absolute
    for got in (_run(whole, x), _run(split, x)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-2)
    assert split_wide_gemms(_model(w.astype(np.float32))) == 0  # float32 weights untouched
    assert split_wide_gemms(_model(w)) == 0  # under the default limit
    prime = rng.standard_normal((1009, 64)).astype(np.float16)
    assert split_wide_gemms(_model(prime), max_bytes=60_000) == 0  # 1009 rows: no equal parts


def test_split_gemm_casts_one_slice_at_a_time(tmp_path):
    """Peak memory a run adds, in a fresh process with pipo_runtime's sessions (weights mapped,
    float16 casts per use): a 128 MB float16 lm_head-like Gemm (256 MB as float32) split in 4
    slices saves at least half of the whole cast (it casts one 64 MB slice at a time; slices
    above glibc's 32 MB mmap threshold, as at real sizes, go back to the system when freed)."""
    import subprocess
    import sys
    w = np.random.default_rng(1).standard_normal((50_000, 1280)).astype(np.float16)
    whole, split = _model(w), _model(w)
    assert split_wide_gemms(split, max_bytes=64 << 20) == 1
    peaks = {}
    for name, model in (("whole", whole), ("split", split)):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location=f"{name}.data")
        code = PEAK.format(path=str(path))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split()
        peaks[name] = int(out[1]) - int(out[0])  # kB the run added to the high-water mark
    assert peaks["whole"] - peaks["split"] > 128 << 10, peaks  # kB


PEAK = """
import numpy as np
from pipo_runtime.backends.onnxruntime import shared_sessions
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
s, = shared_sessions(["{path}"])  # float16 weights: the mapped optimization (no folding)
before = hwm()
s.run(None, {{"x": np.ones((1, 1280), np.float32)}})
print(before, hwm())
"""
