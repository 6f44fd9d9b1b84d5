"""Typed options of `pipo-export export` (built once from argparse; the CLI reads its defaults
from here)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipo_graphs.contract import DEFAULT_SAMPLE_CAP, Mode, Target
from pipo_graphs.dtypes import DType

DEFAULT_OPSET = 18
OPSETS = range(18, 24)  # ai.onnx opsets torch's dynamo exporter (TORCHLIB_OPSET 18) converts to
MIN_CONTEXT = 4  # tokens: one prompt pair plus one generated pair (the smallest usable request)


@dataclass
class ExportOptions:
    checkpoint: str
    out: str
    target: Target = Target.ONNXRUNTIME
    dtype: DType = DType.FLOAT32
    max_context: int | None = None  # tokens; default: the config's max_position_embeddings
    force: bool = False
    opset: int = DEFAULT_OPSET
    sample_cap: int = DEFAULT_SAMPLE_CAP
    validate: bool = True
    mode: Mode = Mode.PIPO
    base: str | None = None  # the Qwen3.5 base folder when `checkpoint` is a PEFT adapter
    adapters: list[str] = field(default_factory=list)  # PEFT adapters over `base`, in merge
    # order, after `checkpoint` when that is an adapter folder too (checkpoint may then be "")
    trace_cache: str | None = None  # folder of traced pieces reused across exports
    weights: str = "float"  # float | int8 | int4 (pipo_export.export.quantize.WeightFormat)
    block_size: int = 32  # quantization block along K (int8/int4)
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fast), 0 = float32
    symmetric: bool = True  # int8/int4 without zero points (as ORT GenAI); False: asymmetric
    head_weights: str | None = None  # int8 | int4: the lm_head's own format (mixed precision);
    # None: the same as `weights`
