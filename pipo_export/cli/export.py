"""`pipo-export export CKPT -o OUT`: compile a checkpoint into the two ONNX graphs."""
from __future__ import annotations

from pipo_graphs.contract import Mode, Target
from pipo_graphs.dtypes import DType

from pipo_export.export.options import ExportOptions


def command(ns) -> int:
    from pipo_export.export.pipeline import export

    export(ExportOptions(checkpoint=ns.checkpoint or "", out=ns.out, target=Target(ns.target),
                         dtype=DType(ns.dtype), max_context=ns.max_context, force=ns.force,
                         opset=ns.opset, sample_cap=ns.sample_cap,
                         validate=not ns.no_validate, mode=Mode(ns.mode),
                         base=ns.base, adapters=list(ns.adapters),
                         trace_cache=ns.trace_cache,
                         weights=ns.weights, block_size=ns.block_size,
                         accuracy_level=ns.accuracy_level,
                         symmetric=not ns.asymmetric))
    return 0
