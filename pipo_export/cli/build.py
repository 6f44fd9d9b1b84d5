"""`pipo-export build OUT`: TensorRT engines from a `--target tensorrt` export (no torch)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="default: the export's dtype")
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens (prompt + generated); default: the export's max_context")
    p.add_argument("--profiles", default="",
                   help="context sizes in tokens where a new optimization profile starts, "
                        "e.g. 512,4096")
    p.add_argument("--timing-cache", default=None, metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace existing engines")
    p.add_argument("--verbose", action="store_true", help="show Polygraphy's and TensorRT's log")


def command(ns: argparse.Namespace) -> int:
    from pipo_export.tensorrt.build import BuildOptions, build
    from pipo_export.tensorrt.profiles import Precision, parse_profile_bounds

    build(BuildOptions(folder=ns.out, precision=Precision(ns.precision) if ns.precision else None,
                       max_batch=ns.max_batch, max_context=ns.max_context,
                       profiles=parse_profile_bounds(ns.profiles), timing_cache=ns.timing_cache,
                       force=ns.force, verbose=ns.verbose))
    return 0
