"""`pipo-export bench`: PIPO against regular decoding and transformers eager (random weights)."""
from __future__ import annotations


def command(ns) -> int:
    from pipo_export.bench.run import BenchOptions, run_bench

    return run_bench(BenchOptions(shape=ns.shape, layers=ns.layers, contexts=ns.contexts,
                                  new_tokens=ns.new_tokens, repeats=ns.repeats,
                                  threshold=ns.threshold, threads=ns.threads,
                                  workdir=ns.workdir, rebuild=ns.rebuild,
                                  json_file=ns.json_file, plot_file=ns.plot_file))
