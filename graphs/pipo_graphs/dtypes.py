"""Tensor dtypes of the contract: names as written in manifests, byte sizes, numpy types, ONNX
TensorProto codes and safetensors names.

The one table of element sizes every component uses (state sizes, bytes-moved models, device
buffers). bfloat16 has no numpy type; it is stored as uint16 bits where numpy must hold it.
The ONNX codes are plain ints (TensorProto.DataType values), so readers need no onnx import.
"""
from __future__ import annotations

from enum import Enum

import numpy as np


class DType(str, Enum):
    """Floating dtypes an export computes and stores its weights in (`export --dtype`)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.value]


ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
            "int8": 1, "uint8": 1, "bool": 1}
NUMPY = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
         "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8,
         "bool": np.bool_}


# contract dtype name -> onnx TensorProto.DataType, and back
ONNX_CODES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9,
              "float16": 10, "float64": 11, "bfloat16": 16}
ONNX_NAMES = {code: name for name, code in ONNX_CODES.items()}
# safetensors header dtype -> contract dtype name
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def itemsize(name: str) -> int:
    """Bytes per element of a contract dtype name ("float32", "bool", ...)."""
    return ITEMSIZE[str(name)]


def numpy_dtype(name: str):
    """The numpy storage type of a contract dtype name (bfloat16 as uint16 bits)."""
    return NUMPY[str(name)]
