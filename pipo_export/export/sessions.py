"""ONNX Runtime sessions for the exporter's own runs (validation, the quantization accuracy
report): pipo_runtime's shared_sessions (one mapping of each weights file for both graphs)."""
from __future__ import annotations


def shared_sessions(paths: dict, prepack: bool, float16: bool) -> dict:
    """graph -> an ORT session on paths[graph], weights mapped once. prepack: let kernels repack
    weights (MatMulNBits' fast path; off = its exact dequantized path). float16: ORT keeps the
    float16 weights mapped (no constant folding) and casts each one just before its use."""
    from pipo_runtime.backends.base import OrtOptimization, RunnerOptions
    from pipo_runtime.backends.onnxruntime import shared_sessions as ort_sessions
    options = RunnerOptions(prepack=prepack, optimization=OrtOptimization.MAPPED if float16
                            else OrtOptimization.ALL)
    return dict(zip(paths, ort_sessions(list(paths.values()), options)))
