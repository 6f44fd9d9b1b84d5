"""ONNX Runtime sessions for the exporter's own runs (validation, the quantization accuracy
report): the two graphs of an export share one mapping of each weights file."""
from __future__ import annotations

import numpy as np
import onnx


def shared_sessions(paths: dict, prepack: bool, float16: bool) -> dict:
    """graph -> an ORT session on paths[graph]; the sessions read each external weights file
    through one mapping (no per-session copy). prepack: let kernels repack weights (MatMulNBits needs it; float MatMul would copy
    every weight per session). float16: basic graph optimizations without constant folding, so
    ORT keeps the float16 weights mapped instead of folding float32 copies of them, and a
    priority-based node order so each weight's float32 cast lives only until its MatMul."""
    import onnxruntime as ort
    from onnx import TensorProto
    from pipo_graphs.dtypes import numpy_dtype
    from pipo_export.onnx.graph import iter_graphs
    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
             TensorProto.UINT8: "uint8"}
    mapped: dict = {}
    sessions, keep = {}, []
    for graph, path in paths.items():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        disabled = []
        if float16:  # float16 runs through per-op casts on CPU: keep them short-lived
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # default runs every weight
            disabled = ["ConstantFolding"]  # cast first: all float32 copies alive at once
        model = onnx.load(str(path), load_external_data=False)
        for g in iter_graphs(model.graph):
            for t in g.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    kv = {e.key: e.value for e in t.external_data}
                    off, n = int(kv["offset"]), int(kv["length"])
                    if kv["location"] not in mapped:
                        mapped[kv["location"]] = np.memmap(path.parent / kv["location"],
                                                           dtype=np.uint8, mode="r")
                    arr = mapped[kv["location"]][off:off + n].view(numpy_dtype(names[t.data_type]))
                    keep.append(ort.OrtValue.ortvalue_from_numpy(arr.reshape(tuple(t.dims))))
                    so.add_initializer(t.name, keep[-1])
        sessions[graph] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                               disabled_optimizers=disabled)
    for session in sessions.values():  # the mapping must outlive every session using it
        session._pipo_weights = (mapped, keep)
    return sessions
