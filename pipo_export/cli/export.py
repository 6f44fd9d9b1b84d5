"""`pipo-export export CKPT -o OUT`: compile a checkpoint into the two ONNX graphs."""
from __future__ import annotations

import argparse

from pipo_graphs.contract import Mode, Target
from pipo_graphs.dtypes import DType

from pipo_export.cli.flags import DTYPES, add_source_flags
from pipo_export.export.options import ExportOptions

DEFAULTS = ExportOptions(checkpoint="", out="")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_flags(p)
    p.add_argument("-o", "--out", required=True, help="export folder to write")
    p.add_argument("--target", choices=[t.value for t in Target], default=DEFAULTS.target.value)
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype.value)
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens (prompt + generated) the export accepts; default: the config's "
                        "max_position_embeddings")
    p.add_argument("--opset", type=int, default=DEFAULTS.opset)
    p.add_argument("--sample-cap", type=int, default=DEFAULTS.sample_cap,
                   help=f"top candidates the in-graph sampler draws from (default "
                        f"{DEFAULTS.sample_cap})")
    p.add_argument("--mode", choices=[m.value for m in Mode], default=DEFAULTS.mode.value,
                   help="regular: the backbone alone as a plain causal LM, one token per step "
                        "(the baseline `bench` compares PIPO against)")
    p.add_argument("--weights", choices=("float", "int8", "int4"), default=DEFAULTS.weights,
                   help="weight-only quantization of every MatMul weight (ONNX Runtime "
                        "MatMulNBits; needs --target onnxruntime --dtype float32)")
    p.add_argument("--block-size", type=int, default=DEFAULTS.block_size,
                   help=f"quantization block along K (default {DEFAULTS.block_size})")
    p.add_argument("--accuracy-level", type=int, default=DEFAULTS.accuracy_level,
                   help="MatMulNBits compute (int8/int4): 4 = int8 activations (fast, default), "
                        "0 = float32")
    p.add_argument("--asymmetric", action="store_true",
                   help="int8/int4 with a zero point per block (default: symmetric, as ONNX "
                        "Runtime GenAI's int4)")
    p.add_argument("--head-weights", choices=("int8", "int4"), default=DEFAULTS.head_weights,
                   help="the lm_head's own format in an int8/int4 export (mixed precision: "
                        "int8 keeps it at 8 bits while the rest is int4, as llama.cpp's Q4_K_M "
                        "keeps its output layer at 6; the embedding gather stays float); "
                        "default: as --weights")
    p.add_argument("--trace-cache", default=None, metavar="DIR",
                   help="reuse traced pieces from DIR (same architecture, dtype, target, opset); "
                        "written there when missing")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the ONNX Runtime vs torch check at the end of the export")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")


def command(ns: argparse.Namespace) -> int:
    from pipo_export.export.pipeline import export

    export(ExportOptions(checkpoint=ns.checkpoint or "", out=ns.out, target=Target(ns.target),
                         dtype=DType(ns.dtype), max_context=ns.max_context, force=ns.force,
                         opset=ns.opset, sample_cap=ns.sample_cap,
                         validate=not ns.no_validate, mode=Mode(ns.mode),
                         base=ns.base, adapters=list(ns.adapters),
                         trace_cache=ns.trace_cache,
                         weights=ns.weights, block_size=ns.block_size,
                         accuracy_level=ns.accuracy_level,
                         symmetric=not ns.asymmetric, head_weights=ns.head_weights))
    return 0
