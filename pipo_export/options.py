"""Typed options of the compiler commands (built once from argparse)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Target(str, Enum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Mode(str, Enum):
    PIPO = "pipo"  # pair in, pair out (the model)
    REGULAR = "regular"  # the backbone as a plain causal LM, one token per step (baseline)


class DType(str, Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)


@dataclass
class ExportOptions:
    checkpoint: str
    out: str
    target: Target = Target.ONNXRUNTIME
    dtype: DType = DType.FLOAT32
    max_context: int | None = None  # tokens; default: the config's max_position_embeddings
    force: bool = False
    opset: int = 18
    sample_cap: int = 1024
    mtp_context: str = "full"
    validate: bool = True
    mode: Mode = Mode.PIPO
