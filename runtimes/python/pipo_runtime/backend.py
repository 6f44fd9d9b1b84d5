"""Backends a PIPO generation can run on."""
from enum import Enum


class Backend(str, Enum):
    TORCH = "torch"  # pipo_export's reference decoder (needs torch; never imported by the runtime)
    ONNXRUNTIME = "onnxruntime"
    ONNX_REFERENCE = "onnx-reference"
    TENSORRT = "tensorrt"
