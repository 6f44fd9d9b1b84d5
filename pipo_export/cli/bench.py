"""`pipo-export bench`: PIPO against regular decoding and transformers eager (random weights).
The comparison against ONNX Runtime GenAI and llama.cpp is not shipped: `python -m
benchmarks.peers` in a checkout."""
from __future__ import annotations

import argparse

from pipo_export.bench.options import BENCH_SHAPES, BenchOptions
from pipo_export.cli.flags import ids

DEFAULTS = BenchOptions()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=BENCH_SHAPES, default=DEFAULTS.shape)
    p.add_argument("--layers", type=int, default=DEFAULTS.layers,
                   help="cut the model to its first N layers")
    p.add_argument("--contexts", type=ids, default=DEFAULTS.contexts,
                   help="prompt lengths in tokens, comma-separated (default "
                        f"{','.join(map(str, DEFAULTS.contexts))})")
    p.add_argument("--new-tokens", type=int, default=DEFAULTS.new_tokens,
                   help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=DEFAULTS.repeats,
                   help="measured rounds (after one warm-up round)")
    p.add_argument("--threshold", type=float, default=DEFAULTS.threshold,
                   help="tau of the gated PIPO run")
    p.add_argument("--threads", type=int, default=DEFAULTS.threads,
                   help="ONNX Runtime intra-op threads (default 0: ONNX Runtime's default)")
    p.add_argument("--workdir", default=DEFAULTS.workdir,
                   help="where checkpoints and exports are written and reused")
    p.add_argument("--rebuild", action="store_true", help="export again even if present")
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE")
    p.add_argument("--plot", dest="plot_file", default=None, metavar="FILE.png")


def command(ns: argparse.Namespace) -> int:
    from pipo_export.bench.run import run_bench
    return run_bench(BenchOptions(shape=ns.shape, layers=ns.layers,
                                  contexts=ns.contexts, new_tokens=ns.new_tokens,
                                  repeats=ns.repeats, threshold=ns.threshold,
                                  threads=ns.threads, workdir=ns.workdir,
                                  rebuild=ns.rebuild, json_file=ns.json_file,
                                  plot_file=ns.plot_file))
