"""`pipo-export build OUT`: TensorRT engines from a `--target tensorrt` export (no torch)."""
from __future__ import annotations


def command(ns) -> int:
    from pipo_export.tensorrt.build import BuildOptions, build
    from pipo_export.tensorrt.profiles import Precision, parse_profile_bounds

    build(BuildOptions(folder=ns.out, precision=Precision(ns.precision) if ns.precision else None,
                       max_batch=ns.max_batch, max_context=ns.max_context,
                       profiles=parse_profile_bounds(ns.profiles), timing_cache=ns.timing_cache,
                       force=ns.force, verbose=ns.verbose))
    return 0
