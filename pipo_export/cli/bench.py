"""`pipo-export bench`: PIPO against regular decoding and transformers eager (random weights);
with --peers, PIPO and regular decoding per precision against ONNX Runtime GenAI and llama.cpp."""
from __future__ import annotations


def command(ns) -> int:
    if ns.peers is not None:
        from pipo_export.bench.peers.suite import PeerBenchOptions, run_peer_bench

        defaults = PeerBenchOptions()
        return run_peer_bench(PeerBenchOptions(
            shape=ns.shape or defaults.shape, layers=ns.layers, contexts=ns.contexts,
            new_tokens=ns.new_tokens, repeats=ns.repeats,
            threads=defaults.threads if ns.threads is None else ns.threads,
            precisions=ns.precisions, block_size=ns.block_size, peers=ns.peers,
            genai_precisions=ns.genai_precisions, gguf_types=ns.gguf_types,
            peer_root=ns.peer_root, install=not ns.no_peer_install, wait_idle=ns.wait_idle,
            retries=ns.retries, workdir=ns.workdir, json_file=ns.json_file,
            plot_file=ns.plot_file, rebuild=ns.rebuild))
    from pipo_export.bench.run import BenchOptions, run_bench

    return run_bench(BenchOptions(shape=ns.shape or BenchOptions().shape, layers=ns.layers,
                                  contexts=ns.contexts, new_tokens=ns.new_tokens,
                                  repeats=ns.repeats, threshold=ns.threshold,
                                  threads=ns.threads or 0, workdir=ns.workdir,
                                  rebuild=ns.rebuild, json_file=ns.json_file,
                                  plot_file=ns.plot_file))
